"""Item images from a folder: safe path resolution, verification and the missing-image policy.

An image is ``<image_root>/<item_id>.<jpg|jpeg|png|webp>`` or the path given by the items
table's image column, always relative to the image root. A path that would leave the root
(absolute, containing ``..``, or a symlink resolving outside) is refused with
`UnsafeImagePathError`, whatever the policy. Every image is **decoded in full** at prepare time
(a file cut short, or text saved as ``.jpg``, fails here rather than in the middle of training);
a missing or corrupt one follows ``missing_image_policy``: ``error`` (raise), ``placeholder``
(a generated grey image) or ``text-only`` (no image).

An image of more than ``max_image_pixels`` pixels (width x height) follows
``large_image_policy``: ``error`` (raise, naming the item and its size) or ``downscale`` (a copy
that fits the limit is written to ``<output_dir>/images/`` and the item points at it, as
``<prepared>/images/<name>``). Its size is read from the header before anything is decoded, and
an image above Pillow's decompression-bomb limit (~179 Mpx) is refused under either policy.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from hanorec.data.errors import DataFileError
from hanorec.data.tables import Catalogue

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
PLACEHOLDER_IMAGE = "<placeholder>"
PLACEHOLDER_FILE = "placeholder.png"
PREPARED_PREFIX = "<prepared>/"
RESIZED_DIR = "images"


class UnsafeImagePathError(ValueError):
    """An image path that would escape the image root."""


class UnsafeCatalogueImageError(DataFileError, UnsafeImagePathError):
    """An unsafe image path read from a catalogue file, located by file, line and field."""


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
    if not text or text.startswith("/") or os.path.isabs(text) or (len(text) > 1
                                                                   and text[1] == ":"):
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


def inspect_image(path: Path, max_pixels: int | None = None) -> tuple[str, str]:
    """Decode an image fully and classify it.

    Args:
        path: The image file.
        max_pixels: Largest accepted width x height (None: no limit); checked on the header,
            before decoding.

    Returns:
        ``("ok", "")``, ``("corrupt", why)``, ``("large", "<w>x<h>")`` or ``("huge", why)``
        (above Pillow's decompression-bomb limit: never decoded).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    return "large", f"{width}x{height}"
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # JPEG: cheaper
                image.load()  # every byte is decoded: a truncated file fails here
    except Image.DecompressionBombError as error:
        return "huge", str(error)
    except Exception as error:  # noqa: BLE001 - PIL raises many types for corrupt files
        return "corrupt", str(error) or type(error).__name__
    return "ok", ""


def image_is_valid(path: Path) -> bool:
    """True when PIL can open and fully decode the file."""
    return inspect_image(path)[0] == "ok"


def write_placeholder(path: str | Path, size: tuple[int, int] = (224, 336)) -> Path:
    """Write the grey placeholder image (used by the ``placeholder`` policy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (128, 128, 128)).save(path, format="PNG")
    return path


@dataclass
class ImageCheck:
    """Result of :func:`check_images`.

    Attributes:
        images: Per item: relative path, ``PLACEHOLDER_IMAGE``, ``<prepared>/images/<name>``
            (a downscaled copy still to write) or None.
        counts: ``images_found``, ``images_missing``, ``images_corrupt``, ``images_downscaled``.
        resize: ``{name in <output_dir>/images: source file}`` for :func:`write_resized`.
    """

    images: list[str | None]
    counts: dict[str, int]
    resize: dict[str, Path] = field(default_factory=dict)


def _too_large(catalogue: Catalogue, index: int, full: Path, problem: str, detail: str,
               max_pixels: int, policy: str) -> DataFileError:
    item = catalogue.item_id[index]
    if problem == "huge":
        why = f"is too large to decode safely ({detail})"
    else:
        why = (f"is {detail} pixels, above max_image_pixels {max_pixels} (large_image_policy: "
               f"{policy}); shrink it or set large_image_policy: downscale")
    return DataFileError(catalogue.source, catalogue.line[index],
                         f"image {full} of item {item!r} {why}", "image")


def check_images(catalogue: Catalogue, image_root: str | Path | None, policy: str, *,
                 max_pixels: int | None = None, large_policy: str = "error") -> ImageCheck:
    """Find, fully decode and resolve each item's image.

    Args:
        catalogue: Items; `catalogue.image` holds explicit relative paths or None.
        image_root: The image folder; None makes every item text-only.
        policy: ``error``, ``placeholder`` or ``text-only`` for missing/corrupt images.
        max_pixels: Largest accepted width x height (None: no limit).
        large_policy: ``error`` or ``downscale`` for images above `max_pixels`.

    Raises:
        UnsafeImagePathError: A path leaves the root.
        DataFileError: A missing or corrupt image under the ``error`` policy; an image above
            the limit under ``large_policy: error`` (or too large to decode at all).
    """
    counts = {"images_found": 0, "images_missing": 0, "images_corrupt": 0,
              "images_downscaled": 0}
    if image_root is None:
        return ImageCheck([None] * len(catalogue), counts)
    folder = scan_image_folder(image_root)
    result = ImageCheck([], counts)
    for index, item_id in enumerate(catalogue.item_id):
        relative = catalogue.image[index] or folder.get(item_id)
        problem, detail = "missing", ""
        if relative is not None:
            try:
                full = safe_image_path(image_root, relative)
            except UnsafeImagePathError as error:
                raise UnsafeCatalogueImageError(catalogue.source, catalogue.line[index],
                                                str(error), "image") from None
            problem, detail = ("missing", "") if not full.is_file() else inspect_image(
                full, max_pixels)
        if problem == "huge" or (problem == "large" and large_policy == "error"):
            raise _too_large(catalogue, index, full, problem, detail, max_pixels or 0,
                             large_policy)
        if problem == "large":
            name = hashlib.sha256(relative.encode()).hexdigest()[:20] + full.suffix.lower()
            result.resize[name] = full
            result.images.append(f"{PREPARED_PREFIX}{RESIZED_DIR}/{name}")
            counts["images_found"] += 1
            counts["images_downscaled"] += 1
            continue
        if problem == "ok":
            counts["images_found"] += 1
            result.images.append(relative.replace("\\", "/"))
            continue
        counts[f"images_{problem}"] += 1
        if policy == "error":
            why = f" ({detail})" if detail else ""
            raise DataFileError(catalogue.source, catalogue.line[index],
                                f"{problem} image for item {item_id!r} under {image_root}{why} "
                                "(missing_image_policy: error)", "image")
        result.images.append(PLACEHOLDER_IMAGE if policy == "placeholder" else None)
    return result


def write_resized(jobs: dict[str, Path], folder: Path, max_pixels: int) -> None:
    """Write a copy of each source image that fits in `max_pixels` into `folder`.

    Raises:
        DataFileError: A source that cannot be decoded after all.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in jobs.items():
        try:
            with Image.open(source) as image:
                scale = math.sqrt(max_pixels / (image.size[0] * image.size[1]))
                size = (max(1, int(image.size[0] * scale)), max(1, int(image.size[1] * scale)))
                image.draft("RGB", size)
                small = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        except Exception as error:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise DataFileError(source, None, f"cannot downscale this image: {error}") from None
        small.save(folder / name, format="JPEG" if name.endswith((".jpg", ".jpeg")) else "PNG",
                   quality=95)


def attach_images(catalogue: Catalogue, image_root: str | Path | None,
                  policy: str) -> tuple[list[str | None], dict[str, int]]:
    """:func:`check_images` without a pixel limit: the image entry per item and its counts.

    Returns:
        The image entry per item (relative path, `PLACEHOLDER_IMAGE` or None) and the counts
        ``images_found``, ``images_missing`` and ``images_corrupt``.
    """
    result = check_images(catalogue, image_root, policy)
    result.counts.pop("images_downscaled")
    return result.images, result.counts
