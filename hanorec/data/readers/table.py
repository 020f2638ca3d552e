"""Plain tables (CSV, TSV or Parquet) with configurable column names: the escape hatch
for MicroLens, Netflix Prize exports or anything else.

The delimiter follows the extension: ``.csv`` -> ``,`` (with ``"`` quoting), ``.tsv``/
``.txt`` -> tab, ``.parquet`` -> Parquet. Row ``i`` of a text table is line ``i + 2``
(a header line is required); for Parquet the "line" is the row number ``i + 1``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hanorec.cli import short_repr
from hanorec.data.errors import DataFileError
from hanorec.data.readers.common import CatalogueBuilder, interactions_from_table
from hanorec.data.readers.delimited import read_delimited
from hanorec.data.readers.text import require_file
from hanorec.data.tables import Catalogue, Interactions


def _read_parquet(path: Path) -> pa.Table:
    require_file(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataFileError(path, None, f"not a readable Parquet file ({error})") from None
    if len(set(table.column_names)) < len(table.column_names):
        twice = next(n for n in table.column_names if table.column_names.count(n) > 1)
        raise DataFileError(path, None, f"column {twice!r} appears twice")
    columns = []
    for column in table.schema:
        try:
            columns.append(table.column(column.name).cast(pa.string()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataFileError(path, None, f"column of type {column.type} cannot be read as "
                                "text; ids, titles, timestamps and ratings must be scalar "
                                "values", column.name) from None
    return pa.table(columns, names=table.column_names)


def read_any_table(path: str | Path, encoding: str | None = None) -> tuple[pa.Table, int]:
    """Read a table as string columns; returns it and the source line of row 0."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path), 1
    if suffix not in (".csv", ".tsv", ".txt"):
        raise DataFileError(path, None, "table format needs a .csv, .tsv, .txt or .parquet file")
    table, _ = read_delimited(path, delimiter="," if suffix == ".csv" else "\t",
                              quoting=suffix == ".csv", encoding=encoding or "utf-8")
    return table, 2


def read_table_interactions(path: str | Path, *, user: str, item: str, timestamp: str,
                            rating: str | None, encoding: str | None = None) -> Interactions:
    """Read interactions from the named columns."""
    table, first_line = read_any_table(path, encoding)
    return interactions_from_table(table, path, first_line, user=user, item=item,
                                   timestamp=timestamp, rating=rating)


def read_table_items(path: str | Path, *, item_id: str, title: str, genres: str | None,
                     genres_separator: str, image: str | None,
                     encoding: str | None = None) -> Catalogue:
    """Read the catalogue from the named columns (genres split on `genres_separator`)."""
    table, first_line = read_any_table(path, encoding)
    for name in (item_id, title, genres, image):
        if name is not None and name not in table.column_names:
            raise DataFileError(path, None, f"missing column {name!r}; have "
                                f"{short_repr(table.column_names, 200)}")
    ids, titles = table.column(item_id).to_pylist(), table.column(title).to_pylist()
    genre_values = table.column(genres).to_pylist() if genres else [None] * len(ids)
    images = table.column(image).to_pylist() if image else [None] * len(ids)
    builder = CatalogueBuilder(path)
    for row, identifier in enumerate(ids):
        names = (genre_values[row] or "").split(genres_separator)
        builder.add(first_line + row, identifier or "", titles[row],
                    [g.strip() for g in names], (images[row] or "").strip() or None)
    return builder.build()
