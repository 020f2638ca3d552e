"""The error raised on bad input data."""

from __future__ import annotations

from pathlib import Path


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
