"""RecBole atomic files (`.inter`, `.item`): tab-separated with a ``name:type`` header.

The ML-100K files shipped in ``recbole==1.2.1`` have the headers
``user_id:token  item_id:token  rating:float  timestamp:float`` and
``item_id:token  movie_title:token_seq  release_year:token  class:token_seq``
(``token_seq`` fields are space-separated; the title is kept whole).
"""

from __future__ import annotations

from pathlib import Path

from hanorec.cli import short_repr
from hanorec.data.errors import DataFileError
from hanorec.data.readers.common import CatalogueBuilder, interactions_from_table, with_year
from hanorec.data.readers.delimited import read_delimited
from hanorec.data.tables import Catalogue, Interactions

_TITLE_FIELDS = ("movie_title", "title", "name")
_GENRE_FIELDS = ("class", "genre", "genres", "categories")


def _strip_types(names: list[str]) -> list[str]:
    return [name.split(":", 1)[0] for name in names]


def read_atomic_inter(path: str | Path, encoding: str | None = None) -> Interactions:
    """Read a ``.inter`` file (needs ``user_id``, ``item_id``, ``timestamp``; ``rating``
    optional)."""
    table, _ = read_delimited(path, delimiter="\t", encoding=encoding or "utf-8")
    table = table.rename_columns(_strip_types(table.column_names))
    rating = "rating" if "rating" in table.column_names else None
    return interactions_from_table(table, path, 2, user="user_id", item="item_id",
                                   timestamp="timestamp", rating=rating)


def read_atomic_item(path: str | Path, encoding: str | None = None) -> Catalogue:
    """Read a ``.item`` file; the title gets the release year appended: ``"Toy Story (1995)"``."""
    path = Path(path)
    table, _ = read_delimited(path, delimiter="\t", encoding=encoding or "utf-8")
    names = _strip_types(table.column_names)
    title_field = next((n for n in _TITLE_FIELDS if n in names), None)
    if "item_id" not in names or title_field is None:
        raise DataFileError(path, 1, f"header needs item_id and one of {_TITLE_FIELDS}: "
                            f"{short_repr(names, 200)}")
    genre_field = next((n for n in _GENRE_FIELDS if n in names), None)
    columns = {n: table.column(i).to_pylist() for i, n in enumerate(names)}
    years = columns.get("release_year", [""] * table.num_rows)
    builder = CatalogueBuilder(path)
    for row, item_id in enumerate(columns["item_id"]):
        genres = columns[genre_field][row].split() if genre_field else []
        builder.add(row + 2, item_id, with_year(columns[title_field][row].strip(), years[row]),
                    genres)
    return builder.build()
