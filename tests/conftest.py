"""Shared test fixtures: tiny built-in backbones and a small catalogue with real image files.

Fixtures (reuse them; do not rebuild models in individual tests):

* ``tiny_backbone_dirs`` (session) — ``{name: folder}`` for ``tiny-llava``, ``tiny-qwen2-vl``
  and ``tiny-idefics3``, each built ONCE per test session into a temporary folder with
  :func:`hanorec.models.tiny.build_tiny_backbone` (seeded, ~0.3 s each) and saved with
  ``save_pretrained`` (safetensors + processor files).
* ``tiny_model_config`` (function) — a factory ``tiny_model_config(name, **overrides)`` returning
  a :class:`hanorec.models.config.ModelConfig` that points at the prebuilt folder, so
  ``load_backbone(cfg)`` runs the real loading path without building anything.
* ``tiny_catalog`` (session) — a :class:`hanorec.data.catalog.Catalog` of 12 items (``i0`` …
  ``i11``) with titles ``"Title k (1990+k)"``; items ``i0``–``i9`` have a 40×48 PNG each (solid
  colour, non-square on purpose), ``i10``–``i11`` are text-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_NAMES = ("tiny-llava", "tiny-qwen2-vl", "tiny-idefics3")


@pytest.fixture(scope="session")
def tiny_backbone_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build each tiny backbone once per session; return ``{name: save_pretrained folder}``."""
    from hanorec.models.tiny import build_tiny_backbone

    root = tmp_path_factory.mktemp("tiny_backbones")
    return {name: build_tiny_backbone(name, root / name) for name in TINY_NAMES}


@pytest.fixture
def tiny_model_config(tiny_backbone_dirs: dict[str, Path]) -> Callable[..., object]:
    """Factory: ``tiny_model_config("tiny-llava", use_lora=False)`` → ModelConfig on the prebuilt folder."""
    from hanorec.models.config import ModelConfig

    def make(name: str = "tiny-llava", **overrides: object) -> ModelConfig:
        return ModelConfig(model_name_or_path=str(tiny_backbone_dirs[name]), **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory: pytest.TempPathFactory):
    """A 12-item catalogue; items i0–i9 have a 40×48 PNG, i10–i11 are text-only."""
    from PIL import Image

    from hanorec.data.catalog import Catalog

    root = tmp_path_factory.mktemp("tiny_images")
    ids = [f"i{k}" for k in range(12)]
    images: list[str | None] = []
    for k, item_id in enumerate(ids):
        if k < 10:
            Image.new("RGB", (40, 48), (20 * k, 255 - 20 * k, 128)).save(root / f"{item_id}.png")
            images.append(f"{item_id}.png")
        else:
            images.append(None)
    titles = [f"Title {k} ({1990 + k})" for k in range(12)]
    return Catalog(ids, titles, images, image_root=root, item_noun="movie")
