"""MovieLens raw files: ml-100k (`u.data`, `u.item`, `u.genre`) and ml-1m (`*.dat`).

Formats (GroupLens README):
- ``u.data``: ``user \\t item \\t rating \\t timestamp``, no header.
- ``u.item``: ``|``-separated, latin-1: id | title | release date | video release date |
  IMDb URL | 19 genre flags (names and order from ``u.genre``).
- ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``; ``movies.dat``:
  ``MovieID::Title::Genres`` with ``Genres`` as ``A|B``, latin-1.
"""

from __future__ import annotations

from pathlib import Path

from hanorec.data.errors import DataFileError
from hanorec.data.readers.common import CatalogueBuilder, interactions_from_table
from hanorec.data.readers.delimited import read_delimited
from hanorec.data.tables import Catalogue, Interactions

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
_RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def _read_ratings(path: str | Path, delimiter: str) -> Interactions:
    table, _ = read_delimited(path, delimiter=delimiter, names=_RATING_COLUMNS,
                              encoding="latin-1")
    return interactions_from_table(table, path, 1, user="user_id", item="item_id",
                                   timestamp="timestamp", rating="rating")


def read_ml100k_interactions(path: str | Path) -> Interactions:
    """Read ``u.data`` (tab-separated user, item, rating, timestamp)."""
    return _read_ratings(path, "\t")


def read_ml1m_interactions(path: str | Path) -> Interactions:
    """Read ``ratings.dat`` (``::``-separated user, item, rating, timestamp)."""
    return _read_ratings(path, "::")


def _ml100k_genre_names(item_path: Path) -> list[str]:
    genre_file = item_path.with_name("u.genre")
    if not genre_file.is_file():
        return ML100K_GENRES
    pairs = [line.rsplit("|", 1) for line in genre_file.read_text("latin-1").splitlines()
             if line.strip()]
    return [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]


def read_ml100k_items(path: str | Path) -> Catalogue:
    """Read ``u.item``; genres come from the 19 trailing flags named by ``u.genre``."""
    path = Path(path)
    genres = _ml100k_genre_names(path)
    builder = CatalogueBuilder(path)
    for number, line in enumerate(path.read_text("latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5 + len(genres):
            raise DataFileError(path, number, f"expected {5 + len(genres)} '|'-separated "
                                f"fields, got {len(fields)}")
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataFileError(path, number, f"genre flags must be 0/1: {flags}", "genres")
        builder.add(number, fields[0], fields[1],
                    [name for name, flag in zip(genres, flags) if flag == "1"])
    return builder.build()


def read_ml1m_items(path: str | Path) -> Catalogue:
    """Read ``movies.dat`` (``MovieID::Title::Genres``)."""
    path = Path(path)
    builder = CatalogueBuilder(path)
    for number, line in enumerate(path.read_text("latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) != 3:
            raise DataFileError(path, number, f"expected 3 '::'-separated fields, got "
                                f"{len(fields)}")
        builder.add(number, fields[0], fields[1], fields[2].split("|"))
    return builder.build()
