"""Helpers shared by the readers: building `Interactions` and checking catalogue entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from hanorec.cli import short_repr
from hanorec.data.errors import DataFileError
from hanorec.data.readers.delimited import float_column, id_column
from hanorec.data.readers.text import check_id, clean_title
from hanorec.data.tables import Catalogue, Interactions


def interactions_from_table(table: pa.Table, path: str | Path, first_line: int, *, user: str,
                            item: str, timestamp: str, rating: str | None) -> Interactions:
    """Convert a string table to `Interactions` (row i is source line ``first_line + i``).

    Raises:
        DataFileError: Empty or damaged ids, non-numeric or NaN timestamps/ratings, with their
            line; a table without rows.
    """
    for name in (user, item, timestamp, rating):
        if name is not None and name not in table.column_names:
            raise DataFileError(path, None, f"missing column {name!r}; have "
                                f"{short_repr(table.column_names, 200)}")
    if table.num_rows == 0:
        raise DataFileError(path, None, "no interactions (the file has no data rows)")
    return Interactions(
        user=id_column(table, user, path, first_line),
        item=id_column(table, item, path, first_line),
        timestamp=float_column(table, timestamp, path, first_line),
        rating=None if rating is None else float_column(table, rating, path, first_line),
        line=np.arange(first_line, first_line + table.num_rows, dtype=np.int64),
        source=str(path),
    )


class CatalogueBuilder:
    """Collects catalogue entries, rejecting empty titles, damaged and duplicated ids with their
    line; titles are cleaned by :func:`hanorec.data.readers.text.clean_title` (counted)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.rows: dict[str, tuple[str, list[str], str | None, int]] = {}
        self.titles_cleaned = 0

    def add(self, line: int, item_id: str, title: str, genres: list[str],
            image: str | None = None) -> None:
        """Add one item read from `line`."""
        item_id, raw_title = str(item_id).strip(), str(title or "").strip()
        if not item_id:
            raise DataFileError(self.path, line, "empty item id", "item_id")
        check_id(self.path, line, "item_id", item_id)
        title = clean_title(raw_title)
        self.titles_cleaned += title != raw_title
        genres = [clean_title(str(g)) for g in genres]
        if not title:
            raise DataFileError(self.path, line, f"empty title for item {item_id!r}", "title")
        if item_id in self.rows:
            first = self.rows[item_id][3]
            raise DataFileError(self.path, line, f"item {item_id!r} already defined on line "
                                f"{first}", "item_id")
        self.rows[item_id] = (title, [g for g in genres if g], image or None, line)

    def build(self) -> Catalogue:
        """The collected catalogue, in source order."""
        if not self.rows:
            raise DataFileError(self.path, None, "no items")
        values = list(self.rows.values())
        return Catalogue(item_id=list(self.rows), title=[v[0] for v in values],
                         genres=[v[1] for v in values], image=[v[2] for v in values],
                         line=[v[3] for v in values], source=self.path,
                         stats={"titles_cleaned": self.titles_cleaned})


def with_year(title: str, year: str) -> str:
    """``"Toy Story", "1995"`` -> ``"Toy Story (1995)"`` (unchanged when the year is empty)."""
    year, title = year.strip(), title.strip()
    if not title or not year or title.endswith(f"({year})"):
        return title
    return f"{title} ({year})"
