"""MMSafe-PO format (arXiv 2503.14189): reader, writer and conversion to ``general`` pairs.

A row of an MMSafe-PO file (JSON list, JSON Lines, or Parquet) has

* ``prompt`` — text with ``<image>`` placeholders, usually a LLaVA ``USER: … ASSISTANT:``
  conversation (possibly multi-turn);
* ``image`` — a path relative to the image root (or a list of them, or null for text only);
  it must stay under the root (:func:`hanorec.data.images.safe_image_path`) and exist;
* ``chosen`` — the preferred response (non-empty text);
* ``rejected`` — the dispreferred response (text, or a non-empty list of texts);
* any other column — metadata, kept unchanged.

A malformed row is a :class:`MMSafeRowError` (a ``ValueError``) naming the file, the 1-based row
number and the field: a missing field, an empty ``chosen`` / ``rejected``, an image path that
escapes the root or does not exist, an image that does not decode in full or has more than
``max_image_pixels`` pixels, more ``<image>`` placeholders than images, a conversation that does
not end with a user turn (or an empty ``ASSISTANT:``), or a number of rejected responses that
differs from the first row's (DPO batches them). A file without rows is an error too. Like the
recommendation readers, a UTF-8 byte-order mark is removed and undecodable bytes are reported
with their line.

:func:`convert_mmsafe` turns a file into a folder that the preference loop reads like prepared
recommendation data: ``pairs/general`` (a ``DatasetDict`` with ``train`` and ``validation``),
an empty ``items/`` catalogue and a ``manifest.json`` with the image root. Train on it with
``python -m hanorec.dpo --preference-data <folder> --dpo-protocols general``.

    python -m hanorec.data.mmsafe convert --input data.jsonl --image-root imgs --out converted
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow

from hanorec.cli import ArgumentParser, run
from hanorec.data.errors import DataFileError
from hanorec.data.images import inspect_image, safe_image_path
from hanorec.data.prompts import GENERAL, IMAGE_PLACEHOLDER, conversation_turns
from hanorec.data.readers.text import read_text, require_file

REQUIRED_FIELDS = ("prompt", "image", "chosen", "rejected")
MAX_IMAGE_PIXELS = 16_000_000
ITEM_FEATURES = datasets.Features({
    "item_id": datasets.Value("string"), "title": datasets.Value("string"),
    "genres": datasets.Sequence(datasets.Value("string")), "image": datasets.Value("string"),
    "popularity": datasets.Value("int64"),
})


class MMSafeRowError(DataFileError):
    """A malformed MMSafe-PO row: ``<file>, row <n>, field '<f>': <what>``."""

    def __init__(self, path: str | Path, row: int, message: str, field: str | None = None) -> None:
        where = f"{path}, row {row}" + (f", field {field!r}" if field else "")
        ValueError.__init__(self, f"{where}: {message}")
        self.path, self.line, self.field = str(path), row, field


def _load_raw(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.json`` (list or JSON Lines), ``.jsonl`` or ``.parquet`` file, in file order."""
    require_file(path)
    if path.suffix == ".parquet":
        try:
            return datasets.Dataset.from_parquet(str(path)).to_list()
        except (pyarrow.ArrowException, OSError, ValueError) as err:
            raise DataFileError(path, None, f"not a readable Parquet file ({err})") from None
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unsupported extension {path.suffix!r} (use .json, .jsonl or "
                         ".parquet)")
    text = read_text(path, "utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFileError(path, err.lineno,
                                f"invalid JSON: {err.msg} (column {err.colno})") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise MMSafeRowError(path, number, f"invalid JSON: {err}") from err
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise MMSafeRowError(path, number, f"expected an object, got {type(row).__name__}")
    return rows


def image_list(value: Any) -> list[str]:
    """The ``image`` field as a list of relative paths (None / "" → no image)."""
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def rejected_list(value: Any) -> list[str]:
    """The ``rejected`` field as a list of texts."""
    return [value] if isinstance(value, str) else list(value)


def _check_image(full: Path, path: Path, number: int, max_pixels: int) -> None:
    status, detail = inspect_image(full, max_pixels)
    if status == "corrupt":
        raise MMSafeRowError(path, number, f"{full} is not a readable image ({detail})", "image")
    if status in ("large", "huge"):
        raise MMSafeRowError(path, number, f"{full} is too large ({detail} pixels; the limit is "
                             f"{max_pixels}): shrink it", "image")


def validate_row(row: Mapping[str, Any], path: Path, number: int, image_root: Path, *,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Check one row (module docstring); raise :class:`MMSafeRowError` on the first fault."""
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise MMSafeRowError(path, number, "missing field", name)
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise MMSafeRowError(path, number, "must be non-empty text", "prompt")
    if not isinstance(row["chosen"], str) or not row["chosen"].strip():
        raise MMSafeRowError(path, number, "must be non-empty text", "chosen")
    rejected = row["rejected"]
    if not isinstance(rejected, (str, list)) or not rejected_list(rejected) or not all(
            isinstance(r, str) and r.strip() for r in rejected_list(rejected)):
        raise MMSafeRowError(path, number, "must be non-empty text or a non-empty list of texts",
                             "rejected")
    images = row["image"]
    if images is not None and not isinstance(images, (str, list)):
        raise MMSafeRowError(path, number, f"expected a path or a list of paths, got {images!r}",
                             "image")
    for relative in image_list(images):
        if not isinstance(relative, str) or not relative.strip():
            raise MMSafeRowError(path, number, f"expected a path, got {relative!r:.60}", "image")
        try:
            full = safe_image_path(image_root, relative)
        except ValueError as err:
            raise MMSafeRowError(path, number, str(err), "image") from err
        if not full.is_file():
            what = "is a folder, not an image" if full.is_dir() else "does not exist"
            raise MMSafeRowError(path, number, f"{full} {what}", "image")
        _check_image(full, path, number, max_pixels)
    placeholders = row["prompt"].count(IMAGE_PLACEHOLDER)
    if placeholders > len(image_list(images)):
        raise MMSafeRowError(path, number, f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                             f"{len(image_list(images))} image(s)", "prompt")
    try:
        turns = conversation_turns(row["prompt"])
    except ValueError as err:
        raise MMSafeRowError(path, number, str(err), "prompt") from None
    if not image_list(images) and not any(body.strip() for _, body in turns):
        raise MMSafeRowError(path, number, "the conversation has no text and no image", "prompt")


def read_mmsafe(path: str | Path, image_root: str | Path, *,
                max_pixels: int = MAX_IMAGE_PIXELS) -> list[dict[str, Any]]:
    """Read and validate an MMSafe-PO file; rows come back as in the file (metadata kept).

    Raises:
        MMSafeRowError: A malformed row (file, row number and field in the message).
        ValueError: A missing, empty or undecodable file, or an unsupported extension.
    """
    path, root = Path(path), Path(image_root)
    rows = _load_raw(path)
    if not rows:
        raise DataFileError(path, None, "no rows: an MMSafe-PO file needs at least one row")
    for number, row in enumerate(rows, 1):
        validate_row(row, path, number, root, max_pixels=max_pixels)
        count, first = len(rejected_list(row["rejected"])), len(rejected_list(rows[0]["rejected"]))
        if count != first:
            raise MMSafeRowError(path, number, f"{count} rejected response(s), but row 1 has "
                                 f"{first}; every row needs the same number", "rejected")
    return rows


def write_mmsafe(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows in the MMSafe-PO format (by extension: ``.json``, ``.jsonl``, ``.parquet``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        try:
            datasets.Dataset.from_list([dict(r) for r in rows]).to_parquet(str(tmp))
        except (TypeError, pyarrow.ArrowInvalid) as err:  # e.g. `image` mixing paths and lists
            raise ValueError(f"{path}: Parquet needs one type per column: {err}") from err
    elif path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                       encoding="utf-8")
    elif path.suffix == ".json":
        tmp.write_text(json.dumps(list(rows), ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r} (use .json, .jsonl or "
                         ".parquet)")
    tmp.replace(path)
    return path


def to_general_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``general`` pair rows: ``user_id`` (the row's ``id`` or its number), ``prompt``, ``images``,
    ``chosen``, ``rejected`` (list) and ``metadata`` (the other columns as a JSON string)."""
    out = []
    for number, row in enumerate(rows, 1):
        extra = {k: v for k, v in row.items() if k not in REQUIRED_FIELDS}
        out.append({"user_id": str(row.get("id", number)), "prompt": row["prompt"],
                    "images": image_list(row["image"]), "chosen": row["chosen"],
                    "rejected": rejected_list(row["rejected"]),
                    "metadata": json.dumps(extra, ensure_ascii=False, sort_keys=True, default=str)})
    return out


def _check_out_dir(out: Path) -> None:
    """``out`` may be new, empty, or an earlier conversion (it is replaced); nothing else."""
    if out.exists() and not out.is_dir():
        raise DataFileError(out, None, "--out is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = out / "manifest.json"
        try:
            earlier = json.loads(manifest.read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier != "mmsafe-po":
            raise DataFileError(out, None, "--out is a non-empty folder that is not an earlier "
                                "conversion; it would be replaced, so choose a new folder")


def convert_mmsafe(path: str | Path, image_root: str | Path, out_dir: str | Path, *,
                   validation_fraction: float = 0.1, max_pixels: int = MAX_IMAGE_PIXELS) -> Path:
    """Read, validate and save an MMSafe-PO file as a preference-data folder (written atomically).

    The last ``max(1, round(validation_fraction · N))`` rows form the validation split (none
    when N = 1). Returns ``out_dir``, which holds ``pairs/general``, ``items/`` (empty) and
    ``manifest.json``.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    _check_out_dir(Path(out_dir))
    rows = to_general_rows(read_mmsafe(path, image_root, max_pixels=max_pixels))
    held = 0 if len(rows) < 2 else max(1, round(validation_fraction * len(rows)))
    out, tmp = Path(out_dir), Path(str(out_dir) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[: len(rows) - held]),
                                   "validation": datasets.Dataset.from_list(rows[len(rows)
                                                                                 - held:])})
    splits.save_to_disk(str(tmp / "pairs" / GENERAL))
    empty = {name: [] for name in ITEM_FEATURES}
    # 0 shards do not load back
    datasets.Dataset.from_dict(empty,
                               features=ITEM_FEATURES).save_to_disk(str(tmp / "items"),
                                                                    num_shards=1)
    manifest = {"format": "mmsafe-po", "source": str(Path(path).resolve()),
                "image_root": str(Path(image_root).resolve()),
                "item_noun": "item", "rows": len(rows), "train": len(rows) - held,
                "validation": held}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    """``convert``: MMSafe-PO file -> preference-data folder; returns the folder."""
    parser = ArgumentParser(prog="python -m hanorec.data.mmsafe", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert",
                             help="MMSafe-PO file -> preference-data folder (pairs/general)")
    convert.add_argument("--input", required=True, help="MMSafe-PO .json / .jsonl / .parquet file")
    convert.add_argument("--image-root", required=True,
                         help="Folder the rows' image paths are relative to")
    convert.add_argument("--out", required=True,
                         help="Output folder (pass it to hanorec.dpo --preference-data)")
    convert.add_argument("--validation-fraction", type=float, default=0.1)
    convert.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                         help="Largest image (width x height) a row may use (default: %(default)s)")
    convert.add_argument("--debug", action="store_true", help="Show the traceback of an error")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = convert_mmsafe(args.input, args.image_root, args.out,
                         validation_fraction=args.validation_fraction,
                         max_pixels=args.max_image_pixels)
    print(f"converted {args.input} -> {out}")
    return out


if __name__ == "__main__":
    run(main)
