"""Image folder handling: safe paths, verification and the missing-image policies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from hanorec.data.errors import DataFileError
from hanorec.data.images import (
    PLACEHOLDER_IMAGE,
    UnsafeImagePathError,
    attach_images,
    safe_image_path,
    scan_image_folder,
)
from hanorec.data.tables import Catalogue


def _catalogue(ids: list[str], images: list[str | None] | None = None) -> Catalogue:
    return Catalogue(item_id=ids, title=[f"T{i}" for i in ids], genres=[[] for _ in ids],
                     image=images or [None] * len(ids), line=list(range(2, len(ids) + 2)),
                     source="items.csv")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """a.png and b.jpg are valid, c.png is corrupt (truncated bytes), d has no file."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "a.png")
    Image.new("RGB", (8, 8), "blue").save(root / "b.jpg")
    (root / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "notes.txt").write_text("ignored")
    return root


def test_safe_paths(tmp_path: Path, folder: Path) -> None:
    """Relative paths resolve under the root; '..', absolute paths and outward symlinks fail."""
    assert safe_image_path(folder, "a.png") == (folder / "a.png").resolve()
    for bad in ["../secret.png", "sub/../../x.png", "/etc/passwd", str(folder / "a.png"),
                "..\\x.png", ""]:
        with pytest.raises(UnsafeImagePathError):
            safe_image_path(folder, bad)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, folder / "link.png")
    with pytest.raises(UnsafeImagePathError, match="outside"):
        safe_image_path(folder, "link.png")
    assert isinstance(UnsafeImagePathError("x"), ValueError)


def test_scan_prefers_first_extension(folder: Path) -> None:
    """Stems map to file names; .jpg beats .png for the same stem; other files are ignored."""
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    found = scan_image_folder(folder)
    assert found == {"a": "a.jpg", "b": "b.jpg", "c": "c.png"}


@pytest.mark.parametrize("policy, expected", [
    ("placeholder", ["a.png", "b.jpg", PLACEHOLDER_IMAGE, PLACEHOLDER_IMAGE]),
    ("text-only", ["a.png", "b.jpg", None, None]),
])
def test_policies(folder: Path, policy: str, expected: list[str | None]) -> None:
    """c (corrupt) and d (missing) follow the policy; both are counted."""
    images, counts = attach_images(_catalogue(["a", "b", "c", "d"]), folder, policy)
    assert images == expected
    assert counts == {"images_found": 2, "images_missing": 1, "images_corrupt": 1}


def test_error_policy_names_item(folder: Path) -> None:
    """The error policy fails on the first bad image, naming the catalogue line and item."""
    with pytest.raises(DataFileError, match=r"items\.csv, line 4.*corrupt image for item 'c'"):
        attach_images(_catalogue(["a", "b", "c"]), folder, "error")
    with pytest.raises(DataFileError, match="missing image for item 'd'"):
        attach_images(_catalogue(["a", "d"]), folder, "error")


def test_mapping_column_and_no_root(folder: Path) -> None:
    """An explicit image column wins; an unsafe one is refused whatever the policy."""
    images, _ = attach_images(_catalogue(["x"], ["b.jpg"]), folder, "error")
    assert images == ["b.jpg"]
    with pytest.raises(UnsafeImagePathError):
        attach_images(_catalogue(["x"], ["../a.png"]), folder, "text-only")
    assert attach_images(_catalogue(["a"]), None, "error")[0] == [None]
