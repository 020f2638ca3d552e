"""Text-level rules every reader follows: byte-order marks, encodings, ids and titles.

* **Byte-order mark.** A UTF-8 BOM (``EF BB BF``) at the start of a file is removed, whatever
  the format and the declared encoding, so a file saved by a spreadsheet reads like any other.
* **Encoding.** Files are decoded with the configured ``encoding`` (default UTF-8; latin-1 for
  MovieLens ``u.item`` / ``movies.dat``). A byte sequence that is not valid in it is an error
  naming the file, the line and the column, never a bare ``UnicodeDecodeError``.
* **Ids.** A user or item id containing a control character (NUL, tab, line break, any Unicode
  ``Cc`` character, U+2028/U+2029) is an error naming the line and field: such an id is a
  damaged file, and accepting it would create a new user or item.
* **Titles.** A line break or tab inside a title (CR, LF, VT, FF, NEL, U+2028/U+2029, with the
  spaces around it) becomes one space, other control characters are dropped; such titles are
  counted as ``titles_cleaned``. Every prompt shows one title per line, so a title never spans
  lines.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hanorec.cli import short_repr
from hanorec.data.errors import DataFileError

BOM = b"\xef\xbb\xbf"
UTF8_NAMES = ("utf8", "utf_8", "ascii", "usascii")
_BREAKS = "\t\n\v\f\r\x1c\x1d\x1e\x1f\x85\u2028\u2029"
_BREAK_RUN = re.compile(f"[ ]*[{_BREAKS}]+[ ]*")
_OTHER_CONTROLS = re.compile("[\x00-\x08\x0e-\x1b\x7f]")
_ID_CONTROL_RE2 = r"[\x00-\x1f\x7f-\x9f\x{2028}\x{2029}]"


def is_utf8(encoding: str) -> bool:
    """True for UTF-8 and its ASCII subset (bytes that need no re-encoding)."""
    return encoding.lower().replace("-", "").replace(" ", "") in UTF8_NAMES


def require_file(path: str | Path) -> Path:
    """``path`` as a Path when it is an existing regular file.

    Raises:
        DataFileError: It does not exist or is a folder.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(path, None, "is a folder, not a file" if path.is_dir()
                            else "file not found")
    return path


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes without a leading UTF-8 byte-order mark.

    Raises:
        DataFileError: The file does not exist or is not a regular file.
    """
    data = require_file(path).read_bytes()
    return data[len(BOM):] if data.startswith(BOM) else data


def decode(path: str | Path, data: bytes, encoding: str, *, first_line: int = 1) -> str:
    """Decode ``data`` read from ``path``; a bad byte is an error naming its line and column.

    Args:
        path: The source file (for messages).
        data: The bytes (BOM already removed).
        encoding: The codec name.
        first_line: Line number of the first byte of ``data``.
    """
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        if first_line == 1 and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DataFileError(path, None, "the file is UTF-16 (it starts with a UTF-16 "
                                "byte-order mark); save it as UTF-8 or set data.encoding: "
                                "utf-16") from None
        start = data.rfind(b"\n", 0, error.start) + 1
        line = first_line + data.count(b"\n", 0, error.start)
        raise DataFileError(path, line, f"byte 0x{data[error.start]:02x} at column "
                            f"{error.start - start + 1} is not valid {encoding} text; set "
                            "data.encoding (e.g. latin-1 or cp1252) or convert the file to "
                            "UTF-8") from None


def read_text(path: str | Path, encoding: str) -> str:
    """The decoded text of a file (BOM removed; errors located)."""
    return decode(path, read_bytes(path), encoding)


def check_id(path: str | Path, line: int | None, field: str, value: str) -> str:
    """Return ``value`` when it holds no control character, else raise naming line and field."""
    for char in value:
        if unicodedata.category(char) == "Cc" or char in "\u2028\u2029":
            raise DataFileError(path, line, f"id {short_repr(value)} contains the control "
                                f"character U+{ord(char):04X}; ids must be printable text "
                                "(a damaged or mis-encoded file?)", field)
    return value


def check_id_column(column: pa.Array, path: str | Path, first_line: int, field: str) -> None:
    """Vectorised :func:`check_id` over a string column (row ``i`` is ``first_line + i``)."""
    bad = pc.match_substring_regex(column, _ID_CONTROL_RE2).to_numpy(zero_copy_only=False)
    bad = np.asarray(bad, dtype=object) == True  # noqa: E712 - nulls are not matches
    if bad.any():
        row = int(np.argmax(bad))
        check_id(path, first_line + row, field, column[row].as_py())


def clean_title(title: str) -> str:
    """Apply the title rule of the module docstring (breaks -> one space, controls dropped)."""
    text = _BREAK_RUN.sub(" ", title)
    return _OTHER_CONTROLS.sub("", text).strip()


def truncate_title(title: str, limit: int) -> str:
    """Cut ``title`` to at most ``limit`` characters, at a word boundary when one is near the
    end, and mark the cut with an ellipsis."""
    if len(title) <= limit:
        return title
    head = title[: limit - 1]
    space = head.rfind(" ")
    if space >= limit // 2:
        head = head[:space]
    return head.rstrip(" ,;:-") + "…"
