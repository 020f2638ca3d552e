"""Amazon Reviews 2023 (McAuley lab) JSON-lines files.

- ``<Category>.jsonl``: one review per line with ``user_id``, ``parent_asin`` (the item),
  ``rating`` and ``timestamp`` (Unix milliseconds; kept as is, only the order matters).
- ``meta_<Category>.jsonl``: one item per line with ``parent_asin``, ``title``,
  ``categories`` (list of str) and ``images`` (list of dicts with ``thumb``/``large``/
  ``hi_res`` URLs). URLs cannot be fetched here: images come from ``image_root``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hanorec.cli import short_repr
from hanorec.data.errors import DataFileError
from hanorec.data.readers.common import CatalogueBuilder
from hanorec.data.readers.text import BOM, check_id, decode, require_file
from hanorec.data.tables import Catalogue, Interactions


def _records(path: Path, encoding: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    with require_file(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if not raw.strip():
                continue
            line = decode(path, raw, encoding or "utf-8", first_line=number)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFileError(path, number, f"malformed JSON: {error}") from None
            if not isinstance(record, dict):
                raise DataFileError(path, number, "expected a JSON object")
            yield number, record


def _number(path: Path, number: int, record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataFileError(path, number, f"not a number: {short_repr(value)}", key)
    try:
        result = float(value)
    except ValueError:
        raise DataFileError(path, number, f"not a number: {short_repr(value)}", key) from None
    if not np.isfinite(result):
        raise DataFileError(path, number, f"not a finite number: {value!r}", key)
    return result


def _text(path: Path, number: int, record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, (str, int)) or not str(value).strip():
        raise DataFileError(path, number, f"missing or empty {key}", key)
    return check_id(path, number, key, str(value).strip())


def read_amazon_reviews(path: str | Path, encoding: str | None = None) -> Interactions:
    """Read ``<Category>.jsonl`` reviews as interactions (item = ``parent_asin``)."""
    path = Path(path)
    users, items, times, ratings, lines = [], [], [], [], []
    for number, record in _records(path, encoding):
        users.append(_text(path, number, record, "user_id"))
        items.append(_text(path, number, record, "parent_asin"))
        times.append(_number(path, number, record, "timestamp"))
        ratings.append(_number(path, number, record, "rating"))
        lines.append(number)
    if not lines:
        raise DataFileError(path, None, "no reviews")
    return Interactions(user=pa.array(users, pa.string()), item=pa.array(items, pa.string()),
                        timestamp=np.asarray(times, np.float64),
                        rating=np.asarray(ratings, np.float64),
                        line=np.asarray(lines, np.int64), source=str(path))


def read_amazon_meta(path: str | Path, encoding: str | None = None) -> Catalogue:
    """Read ``meta_<Category>.jsonl``; genres are the ``categories`` list."""
    path = Path(path)
    builder = CatalogueBuilder(path)
    for number, record in _records(path, encoding):
        categories = record.get("categories") or []
        if not isinstance(categories, list):
            raise DataFileError(path, number, "categories must be a list", "categories")
        title = record.get("title")
        builder.add(number, _text(path, number, record, "parent_asin"),
                    title if isinstance(title, str) else "", [str(c) for c in categories])
    return builder.build()
