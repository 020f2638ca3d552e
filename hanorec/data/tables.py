"""In-memory columnar forms shared by every reader: interactions and catalogue."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class Interactions:
    """One row per (user, item, timestamp) event, in source-file order.

    Attributes:
        user: User ids (arrow strings).
        item: Item ids (arrow strings).
        timestamp: Event times (float64; any unit, only the order matters).
        rating: Ratings (float64) or None when the source has none.
        line: 1-based source line of each row (the tie-break of last resort and the
            locator of error messages).
        source: The file the rows came from.
    """

    user: pa.Array
    item: pa.Array
    timestamp: np.ndarray
    rating: np.ndarray | None
    line: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> Interactions:
        """Rows at `index` (numpy integer or boolean array)."""
        if index.dtype == bool:
            index = np.flatnonzero(index)
        arrow_index = pa.array(index, pa.int64())
        return Interactions(
            user=self.user.take(arrow_index), item=self.item.take(arrow_index),
            timestamp=self.timestamp[index],
            rating=None if self.rating is None else self.rating[index],
            line=self.line[index], source=self.source,
        )


@dataclass
class Catalogue:
    """The item catalogue: one entry per item id, in source order.

    Attributes:
        item_id: Item ids.
        title: Display titles (MovieLens titles carry the year: ``"Toy Story (1995)"``).
        genres: Genre / category names per item.
        image: Image path per item, relative to the image root (None: text-only).
        line: 1-based source line of each item.
        source: The file the items came from.
        stats: Counts of what the reader or a policy changed (``titles_cleaned``, ...).
    """

    item_id: list[str]
    title: list[str]
    genres: list[list[str]]
    image: list[str | None]
    line: list[int]
    source: str
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item_id)

    def subset(self, index: np.ndarray) -> Catalogue:
        """Items at integer positions `index`, in that order."""
        pick = [int(i) for i in index]
        return Catalogue(
            item_id=[self.item_id[i] for i in pick], title=[self.title[i] for i in pick],
            genres=[self.genres[i] for i in pick], image=[self.image[i] for i in pick],
            line=[self.line[i] for i in pick], source=self.source, stats=dict(self.stats),
        )
