"""`Catalog`: fast item-id lookups of titles and image paths over a prepared ``items/``."""

from __future__ import annotations

from pathlib import Path

from hanorec.data.images import (
    PLACEHOLDER_FILE,
    PLACEHOLDER_IMAGE,
    PREPARED_PREFIX,
    safe_image_path,
)
from hanorec.data.prepared import read_items, read_manifest


class Catalog:
    """Titles and images by item id.

    Args:
        item_ids: Item ids (row ``i`` is item index ``i``).
        titles: Display titles.
        images: Image per item: path relative to `image_root`, ``"<placeholder>"`` (the
            prepared dir's ``placeholder.png``) or None (text-only).
        image_root: Folder the relative image paths live in.
        placeholder: Path of the placeholder image, if any.
        item_noun: Noun used in prompts (``movie``, ``product``...).
        genres: Optional genre lists.
        prepared_dir: The prepared folder that ``<prepared>/...`` images (downscaled copies)
            are relative to.
    """

    def __init__(self, item_ids: list[str], titles: list[str],
                 images: list[str | None] | None = None,
                 image_root: str | Path | None = None, placeholder: str | Path | None = None,
                 item_noun: str = "item", genres: list[list[str]] | None = None,
                 prepared_dir: str | Path | None = None) -> None:
        self.item_ids, self.titles = list(item_ids), list(titles)
        self.images = list(images) if images is not None else [None] * len(self.item_ids)
        self.genres = genres
        self.image_root = None if image_root is None else Path(image_root)
        self.placeholder = None if placeholder is None else Path(placeholder)
        self.item_noun = item_noun
        self.prepared_dir = None if prepared_dir is None else Path(prepared_dir)
        self.index = {item_id: i for i, item_id in enumerate(self.item_ids)}

    @classmethod
    def from_prepared(cls, prepared_dir: str | Path,
                      image_root: str | Path | None = None) -> Catalog:
        """Load ``items/`` (image root and noun from ``manifest.json`` unless overridden)."""
        prepared = Path(prepared_dir)
        columns = read_items(prepared).to_dict()
        manifest = read_manifest(prepared)
        return cls(columns["item_id"], columns["title"], columns["image"],
                   image_root if image_root is not None else manifest.get("image_root"),
                   prepared / PLACEHOLDER_FILE, manifest.get("item_noun", "item"),
                   columns["genres"], prepared_dir=prepared)

    def __len__(self) -> int:
        return len(self.item_ids)

    def position(self, item_id: str) -> int:
        """Row index of `item_id` (KeyError with the id when unknown)."""
        try:
            return self.index[item_id]
        except KeyError:
            raise KeyError(f"item {item_id!r} is not in the catalogue") from None

    def title(self, item_id: str) -> str:
        """Display title of `item_id`."""
        return self.titles[self.position(item_id)]

    def image_path(self, item_id: str) -> Path | None:
        """Absolute image path of `item_id` (checked to stay under the root), or None."""
        image = self.images[self.position(item_id)]
        if image is None:
            return None
        if image == PLACEHOLDER_IMAGE:
            return self.placeholder
        if image.startswith(PREPARED_PREFIX):
            if self.prepared_dir is None:
                raise ValueError(f"item {item_id!r} has the prepared image {image!r} but the "
                                 "catalog has no prepared_dir")
            return safe_image_path(self.prepared_dir, image[len(PREPARED_PREFIX):])
        if self.image_root is None:
            raise ValueError(f"item {item_id!r} has image {image!r} but the catalog has no "
                             "image_root")
        return safe_image_path(self.image_root, image)
