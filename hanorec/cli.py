"""The error convention shared by every ``python -m hanorec.*`` entry point.

A user error (a wrong recipe, flag or input file) ends the process with one line on stderr and
exit status 2, never with a traceback::

    error: <file>[, line N][, field F]: <what is wrong and what to do>

User errors are the ``ValueError`` family (``ConfigError``, ``DataFileError``, decoding and JSON
errors) and ``OSError`` (missing files, permissions); anything else is a bug and keeps its
traceback. ``--debug`` on the command line (or ``HANOREC_DEBUG=1`` in the environment) shows the
traceback of a user error too. Messages are folded onto one line and cut to
``MAX_MESSAGE_CHARS`` characters, so a pathological value never floods the terminal.

After a user error the process leaves with ``os._exit`` once stdout and stderr are flushed:
interpreter shutdown is skipped, so a worker thread of a native library that is still alive
(Arrow's reader pool, a progress-bar monitor) can never turn a clean exit 2 into an abort.

Use it in a module's ``__main__`` guard; ``main`` itself keeps raising, so code and tests that
call ``main(argv)`` see the exception::

    if __name__ == "__main__":
        run(main)
"""

from __future__ import annotations

import argparse
import os
import reprlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HANOREC_DEBUG"
EXIT_USER_ERROR = 2
MAX_MESSAGE_CHARS = 1000
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)

# How the process ends after a user error; tests that run a ``__main__`` guard in-process swap
# it for ``sys.exit``.
hard_exit: Callable[[int], Any] = os._exit


def short_repr(value: Any, limit: int = 60) -> str:
    """A repr of ``value`` of at most ``limit`` characters (``…`` marks a cut).

    Containers are abbreviated before they are rendered (``reprlib``), so even a value built by
    a YAML alias bomb costs microseconds.

    Args:
        value: Any value.
        limit: Maximum length of the result.
    """
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = max(limit, 12)
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 6
    shortener.maxlevel = 3
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Fold ``text`` onto one line and cut it to ``limit`` characters."""
    text = str(text)
    head = text[: 4 * limit]  # never fold megabytes
    folded = " ".join(part.strip() for part in head.splitlines() if part.strip())
    if len(folded) <= limit and len(head) == len(text):
        return folded
    return f"{folded[:limit]}… (message cut, {len(text)} characters in all)"


def describe(error: BaseException) -> str:
    """The message of a user error, leading with the file it concerns when the error knows it.

    Args:
        error: A ``ValueError`` or ``OSError`` (or any exception: its text is used).
    """
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, UnicodeDecodeError):
        return (f"text is not valid {error.encoding} (byte 0x{error.object[error.start]:02x} at "
                f"offset {error.start}); convert the file to UTF-8 or set its encoding")
    return str(error) or type(error).__name__


def debug_requested(argv: Sequence[str]) -> bool:
    """True when ``--debug`` is among the arguments or ``HANOREC_DEBUG`` is set (not ``0``)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` (one line) and leave with exit status 2."""
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    hard_exit(EXIT_USER_ERROR)
    raise SystemExit(EXIT_USER_ERROR)  # only reached when hard_exit returns (tests)


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Run an entry point's ``main`` under the error convention (see the module docstring).

    Args:
        main: The entry point; called with the arguments minus ``--debug``.
        argv: The arguments (default ``sys.argv[1:]``).

    Returns:
        Never: exits 0 (or ``main``'s integer result) on success, 2 on a user error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    try:
        result = main([a for a in args if a != DEBUG_FLAG])
    except USER_ERRORS as error:
        if debug:
            raise
        fail(describe(error))
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` without prefix matching of long flags (``--num-candidate``
    is not ``--num-candidates``), whose usage errors are one ``error:`` line and exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Report a usage error on one line (argparse prints the whole usage block)."""
        sys.stdout.flush()
        print(f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
