"""The error raised on bad input data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A problem in a source file, located by file, line and field.

    Args:
        path: The offending file.
        line: 1-based line number (None when the problem is not tied to a line).
        message: What is wrong.
        field: The column or field name, when known.
    """

    def __init__(self, path: str | Path, line: int | None, message: str,
                 field: str | None = None) -> None:
        where = str(path) + (f", line {line}" if line is not None else "")
        where += f", field {field!r}" if field else ""
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = str(path), line, field


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a damaged one is a :class:`DataFileError` naming its line.

    Raises:
        DataFileError: Missing, unreadable, not UTF-8 or not valid JSON.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataFileError(path, None, f"cannot be read: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFileError(path, error.lineno, f"not valid JSON ({error.msg}, column "
                            f"{error.colno})") from None
