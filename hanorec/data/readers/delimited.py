"""Fast delimited-text parsing (pyarrow) with errors that name the file and line.

The fast path hands the whole file to ``pyarrow.csv``; only when it fails do we rescan
the file in Python to find the first malformed line. Row ``i`` of a parsed table is line
``i + 1 + header_lines`` (blank lines inside a file are malformed; trailing ones are ignored).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from hanorec.cli import short_repr
from hanorec.data.errors import DataFileError
from hanorec.data.readers.text import check_id_column, decode, is_utf8, read_bytes

_SEP = "\x1f"  # stands in for multi-character delimiters such as MovieLens-1M's "::"


def _load_text(path: Path, delimiter: str, encoding: str) -> tuple[bytes, str]:
    data = read_bytes(path)
    if not data.strip():
        raise DataFileError(path, None, "the file is empty")
    text = decode(path, data, encoding)
    if not is_utf8(encoding):
        data = text.encode("utf-8")
    if len(delimiter) > 1:
        data, delimiter = data.replace(delimiter.encode(), _SEP.encode()), _SEP
    if b"\r" in data:  # Windows (CRLF) or classic Mac (CR) line ends: read as LF
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    data = data.rstrip(b"\n") + b"\n"
    unix = b"\n" + data
    blank = unix.find(b"\n\n")
    if blank >= 0:
        raise DataFileError(path, unix[:blank].count(b"\n") + 1,
                            "malformed line: blank line inside the file")
    return data, delimiter


def _first_bad_line(data: bytes, delimiter: str, expected: int, quoting: bool,
                    header_lines: int) -> tuple[int, str]:
    text = io.StringIO(data.decode("utf-8"), newline="")
    rows = csv.reader(text, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoting
                      else csv.QUOTE_NONE)
    for number, fields in enumerate(rows, start=1):
        if number > header_lines and len(fields) != expected:
            return number, (f"expected {expected} fields, got {len(fields)}: "
                            f"{short_repr(fields, 120)}")
    return 0, "unparseable content"


def _unique_names(path: Path, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise DataFileError(path, 1, f"column {name!r} appears twice in the header")
        seen.add(name)


def read_delimited(path: str | Path, *, delimiter: str, names: list[str] | None = None,
                   encoding: str = "utf-8", quoting: bool = False) -> tuple[pa.Table, int]:
    """Parse a delimited file into a table of string columns.

    Args:
        path: The file.
        delimiter: Field separator (may be several characters, e.g. ``"::"``).
        names: Column names when the file has no header; None reads them from line 1.
        encoding: Text encoding (MovieLens raw files are latin-1); a UTF-8 byte-order mark is
            removed first, and undecodable bytes are an error naming their line.
        quoting: Honour ``"`` quoting (CSV); off for the tab/pipe formats.

    Returns:
        The table (all columns ``string``) and the number of header lines (0 or 1).

    Raises:
        DataFileError: Missing or empty file, bytes not valid in `encoding`, or a line with the
            wrong number of fields.
    """
    path = Path(path)
    data, delimiter = _load_text(path, delimiter, encoding)
    header_lines = 0 if names else 1
    if names is None:
        first = data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")
        names = next(csv.reader([first], delimiter=delimiter))
        _unique_names(path, names)
    read = pacsv.ReadOptions(column_names=names, skip_rows=header_lines, block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False,
                               ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        table = pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse,
                               convert_options=convert)
    except pa.ArrowInvalid as error:
        line, why = _first_bad_line(data, delimiter, len(names), quoting, header_lines)
        raise DataFileError(path, line or None,
                            f"malformed line: {why} ({str(error)[:120]})") from None
    return table.combine_chunks(), header_lines


def float_column(table: pa.Table, name: str, path: str | Path, first_line: int) -> np.ndarray:
    """Column `name` as float64; a non-numeric or NaN value raises with its line.

    Args:
        table: Parsed string table.
        name: Column to convert.
        path: Source file (for messages).
        first_line: Source line of row 0.
    """
    column = table.column(name).combine_chunks()
    _no_nulls(column, name, path, first_line)
    try:
        values = pc.cast(pc.utf8_trim_whitespace(column), pa.float64()).to_numpy(
            zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for row, text in enumerate(column.to_pylist()):
            try:
                float(text)
            except (TypeError, ValueError):
                raise DataFileError(path, first_line + row,
                                    f"not a number: {short_repr(text)}", name) from None
        raise
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        row = int(bad[0])
        raise DataFileError(path, first_line + row,
                            f"not a finite number: {column[row].as_py()!r}", name)
    return values


def _no_nulls(column: pa.Array, name: str, path: str | Path, first_line: int) -> None:
    if column.null_count:
        row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise DataFileError(path, first_line + row, "missing value (null)", name)


def id_column(table: pa.Table, name: str, path: str | Path, first_line: int) -> pa.Array:
    """Column `name` as trimmed, non-empty strings without control characters; a missing,
    empty or damaged id raises with its line."""
    column = table.column(name).combine_chunks()
    _no_nulls(column, name, path, first_line)
    column = pc.utf8_trim_whitespace(column)
    empty = pc.equal(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)
    if empty.any():
        raise DataFileError(path, first_line + int(np.argmax(empty)), "empty id", name)
    check_id_column(column, path, first_line, name)
    return column
