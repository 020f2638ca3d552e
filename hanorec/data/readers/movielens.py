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
from hanorec.data.readers.text import read_text
from hanorec.data.tables import Catalogue, Interactions

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
_RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def _read_ratings(path: str | Path, delimiter: str, encoding: str | None) -> Interactions:
    table, _ = read_delimited(path, delimiter=delimiter, names=_RATING_COLUMNS,
                              encoding=encoding or "latin-1")
    return interactions_from_table(table, path, 1, user="user_id", item="item_id",
                                   timestamp="timestamp", rating="rating")


def read_ml100k_interactions(path: str | Path, encoding: str | None = None) -> Interactions:
    """Read ``u.data`` (tab-separated user, item, rating, timestamp)."""
    return _read_ratings(path, "\t", encoding)


def read_ml1m_interactions(path: str | Path, encoding: str | None = None) -> Interactions:
    """Read ``ratings.dat`` (``::``-separated user, item, rating, timestamp)."""
    return _read_ratings(path, "::", encoding)


def _ml100k_genre_names(item_path: Path, encoding: str) -> list[str]:
    genre_file = item_path.with_name("u.genre")
    if not genre_file.is_file():
        return ML100K_GENRES
    pairs = []
    for number, line in enumerate(read_text(genre_file, encoding).splitlines(), start=1):
        name, _, index = line.strip().rpartition("|")
        if not line.strip():
            continue
        if not name or not index.isdigit():
            raise DataFileError(genre_file, number, f"expected 'name|index', got {line!r:.80}")
        pairs.append((name, int(index)))
    return [name for name, _ in sorted(pairs, key=lambda p: p[1])]


def read_ml100k_items(path: str | Path, encoding: str | None = None) -> Catalogue:
    """Read ``u.item``; genres come from the 19 trailing flags named by ``u.genre``."""
    path = Path(path)
    text = read_text(path, encoding or "latin-1")
    genres = _ml100k_genre_names(path, encoding or "latin-1")
    builder = CatalogueBuilder(path)
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: NEL in titles
        line = line.rstrip("\r")
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


def read_ml1m_items(path: str | Path, encoding: str | None = None) -> Catalogue:
    """Read ``movies.dat`` (``MovieID::Title::Genres``)."""
    path = Path(path)
    builder = CatalogueBuilder(path)
    for number, line in enumerate(read_text(path, encoding or "latin-1").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) != 3:
            raise DataFileError(path, number, f"expected 3 '::'-separated fields, got "
                                f"{len(fields)}")
        builder.add(number, fields[0], fields[1], fields[2].split("|"))
    return builder.build()
