"""The one reader of a prepared folder (``python -m hanorec.data prepare``, ``mmsafe convert``).

Every stage, the catalogue, the known-sequence rebuild and the collaborative recommender read a
prepared folder through these functions (the layout is in ``docs/architecture.md``, "Prepared
data"):

* :func:`read_manifest` — ``manifest.json`` (``{}`` for a folder written without one);
* :func:`read_items` — ``items/``, row ``i`` is catalogue item ``i``;
* :func:`read_protocol` — ``<protocol>/`` or ``pairs/<protocol>/``, a ``DatasetDict``;
* :func:`read_rows` — one split of it as a list of row dicts.

Errors name the folder and say how to make what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from hanorec.data.errors import DataFileError, read_json

ITEMS = "items"
PAIRS = "pairs"
MANIFEST = "manifest.json"


def read_manifest(prepared: str | Path) -> dict[str, Any]:
    """``manifest.json`` of a prepared folder, or ``{}`` when the folder has none.

    Raises:
        DataFileError: A manifest that is not a JSON object (or not JSON at all).
    """
    path = Path(prepared) / MANIFEST
    manifest = read_json(path) if path.is_file() else {}
    if not isinstance(manifest, dict):
        raise DataFileError(path, None, "expected a JSON object; prepare again")
    return manifest


def read_items(prepared: str | Path) -> datasets.Dataset:
    """The catalogue table ``items/`` (``item_id``, ``title``, ``genres``, ``image``, ...).

    Raises:
        DataFileError: The folder holds no ``items/`` (it is not a prepared folder).
    """
    folder = Path(prepared) / ITEMS
    if not folder.is_dir():
        raise DataFileError(Path(prepared), None, "not a prepared data folder (no items/); run "
                            "`python -m hanorec.data prepare` or `hanorec.data.mmsafe convert`")
    return datasets.load_from_disk(str(folder))


def read_protocol(prepared: str | Path, protocol: str, *, pairs: bool = False,
                  splits: tuple[str, ...] = ()) -> datasets.DatasetDict:
    """A protocol's splits (``pairs=True``: its preference pairs, ``pairs/<protocol>/``).

    Args:
        prepared: The prepared folder.
        protocol: ``hit1``, ``hit3``, ``candidates``, ``full`` (or ``general`` pairs).
        pairs: Read the preference pairs instead of the rows.
        splits: Splits that must be present.

    Raises:
        ValueError: The protocol was not prepared, or a required split is missing.
    """
    folder = Path(prepared) / (PAIRS if pairs else "") / protocol
    if not folder.exists():
        raise ValueError(f"{folder} does not exist: add {protocol!r} to the data section's "
                         "protocols")
    parts = datasets.load_from_disk(str(folder))
    for name in splits:
        if name not in parts:
            raise ValueError(f"{folder}: missing split {name!r}")
    return parts


def read_rows(prepared: str | Path, protocol: str, split: str, *,
              pairs: bool = False) -> list[dict[str, Any]]:
    """The rows of one split of a protocol (or of its pairs), as dicts in stored order."""
    return read_protocol(prepared, protocol, pairs=pairs, splits=(split,))[split].to_list()
