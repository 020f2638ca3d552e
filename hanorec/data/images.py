"""Item images from a folder: safe path resolution, verification and the missing-image policy.

An image is ``<image_root>/<item_id>.<jpg|jpeg|png|webp>`` or the path given by the items
table's image column, always relative to the image root. A path that would leave the root
(absolute, containing ``..``, or a symlink resolving outside) is refused with
`UnsafeImagePathError`, whatever the policy. Every image is checked with PIL ``verify()``
at prepare time; a missing or corrupt one follows ``missing_image_policy``:
``error`` (raise), ``placeholder`` (a generated grey image) or ``text-only`` (no image).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from hanorec.data.errors import DataFileError
from hanorec.data.tables import Catalogue

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
PLACEHOLDER_IMAGE = "<placeholder>"
PLACEHOLDER_FILE = "placeholder.png"


class UnsafeImagePathError(ValueError):
    """An image path that would escape the image root."""


def safe_image_path(root: str | Path, relative: str) -> Path:
    """Resolve `relative` under `root`, refusing anything that leaves it.

    Args:
        root: The image root.
        relative: A path relative to it (``/`` or ``\\`` separators).

    Returns:
        The absolute, resolved path (it may not exist).

    Raises:
        UnsafeImagePathError: Absolute path, a ``..`` component, or a symlink pointing out.
    """
    text = str(relative).replace("\\", "/")
    if not text or text.startswith("/") or os.path.isabs(text) or (len(text) > 1 and text[1] == ":"):
        raise UnsafeImagePathError(f"image path {relative!r} must be relative to {root}")
    if ".." in text.split("/"):
        raise UnsafeImagePathError(f"image path {relative!r} must not contain '..'")
    root_real = Path(root).resolve()
    full = (root_real / text).resolve()
    if not full.is_relative_to(root_real):
        raise UnsafeImagePathError(f"image path {relative!r} resolves to {full}, outside {root}")
    return full


def scan_image_folder(root: str | Path) -> dict[str, str]:
    """Map file stem -> file name for every image file directly in `root`.

    When several extensions exist for one stem the first of `IMAGE_EXTENSIONS` wins.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFileError(root, None, "image_root is not a directory")
    found: dict[str, str] = {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in rank:
                old = found.get(stem)
                if old is None or rank[ext.lower()] < rank[os.path.splitext(old)[1].lower()]:
                    found[stem] = entry.name
    return found


def image_is_valid(path: Path) -> bool:
    """True when PIL can open and verify the file."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt files
        return False


def write_placeholder(path: str | Path, size: tuple[int, int] = (224, 336)) -> Path:
    """Write the grey placeholder image (used by the ``placeholder`` policy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (128, 128, 128)).save(path, format="PNG")
    return path


def attach_images(catalogue: Catalogue, image_root: str | Path | None,
                  policy: str) -> tuple[list[str | None], dict[str, int]]:
    """Find, check and resolve each item's image.

    Args:
        catalogue: Items; `catalogue.image` holds explicit relative paths or None.
        image_root: The image folder; None makes every item text-only.
        policy: ``error``, ``placeholder`` or ``text-only`` for missing/corrupt images.

    Returns:
        The image entry per item (relative path, `PLACEHOLDER_IMAGE` or None) and counts.

    Raises:
        UnsafeImagePathError: A path leaves the root.
        DataFileError: A missing or corrupt image under the ``error`` policy.
    """
    counts = {"images_found": 0, "images_missing": 0, "images_corrupt": 0}
    if image_root is None:
        return [None] * len(catalogue), counts
    folder = scan_image_folder(image_root)
    images: list[str | None] = []
    for index, item_id in enumerate(catalogue.item_id):
        relative = catalogue.image[index] or folder.get(item_id)
        problem = "missing"
        if relative is not None:
            full = safe_image_path(image_root, relative)
            problem = "missing" if not full.is_file() else (
                None if image_is_valid(full) else "corrupt")
        if problem is None:
            counts["images_found"] += 1
            images.append(relative.replace("\\", "/"))
            continue
        counts[f"images_{problem}"] += 1
        if policy == "error":
            raise DataFileError(catalogue.source, catalogue.line[index],
                                f"{problem} image for item {item_id!r} under {image_root} "
                                "(missing_image_policy: error)", "image")
        images.append(PLACEHOLDER_IMAGE if policy == "placeholder" else None)
    return images, counts
