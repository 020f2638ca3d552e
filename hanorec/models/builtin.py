"""Built-in backbone names and their one-time materialisation into the cache folder.

A built-in name (``tiny-llava``, ``tiny-qwen2-vl``, ``tiny-idefics3``, ``smollm2-llava``) is
turned into an ordinary ``save_pretrained`` folder once, then loaded like any local model. The
folder name carries a build version so that a change of the builders never reuses stale files.
Builds write into a temporary sibling folder and are renamed into place, so two processes
(e.g. two ``accelerate`` ranks) never see a half-written model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hanorec.models.smollm2 import SMOLLM2_LLAVA, build_smollm2_llava
from hanorec.models.tiny import TINY_BUILDERS, build_tiny_backbone

BUILD_VERSION = "v2"
_DONE = ".hanorec-built"


def _builders() -> dict[str, Callable[[Path], Path]]:
    builders: dict[str, Callable[[Path], Path]] = {
        name: (lambda out, name=name: build_tiny_backbone(name, out)) for name in TINY_BUILDERS
    }
    builders[SMOLLM2_LLAVA] = build_smollm2_llava
    return builders


def is_builtin(name: str) -> bool:
    """Return whether ``name`` is a built-in backbone name."""
    return name in _builders()


def builtin_folder(name: str, cache_dir: str | Path) -> Path:
    """Return the folder where the built-in ``name`` lives (built or not)."""
    return Path(cache_dir) / f"{name}-{BUILD_VERSION}"


def ensure_builtin(name: str, cache_dir: str | Path) -> Path:
    """Build the built-in backbone ``name`` into ``cache_dir`` unless already there.

    Args:
        name: A built-in backbone name.
        cache_dir: Cache root (``ModelConfig.builtin_cache_dir``).

    Returns:
        The ``save_pretrained`` folder of the backbone.

    Raises:
        ValueError: If ``name`` is not built-in.
    """
    builders = _builders()
    if name not in builders:
        raise ValueError(f"{name!r} is not a built-in backbone; built-ins: {sorted(builders)}")
    target = builtin_folder(name, cache_dir)
    if (target / _DONE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builders[name](staging)
        (staging / _DONE).write_text(BUILD_VERSION + "\n")
        # mkdtemp makes it private; the cache is shared like ~/.cache/huggingface
        staging.chmod(0o755)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _DONE).exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
