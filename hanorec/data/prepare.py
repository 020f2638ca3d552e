"""`prepare`: source files -> prepared datasets, pairs, items and manifest.json.

Output layout (docs/architecture.md, "Prepared data"): ``items/``, ``<protocol>/``
(``DatasetDict`` train/validation/test), ``pairs/<protocol>/`` (train/validation),
``placeholder.png`` (only with the placeholder policy) and ``manifest.json``, written last.
A second run whose fingerprint (config + source sizes and SHA-256 + image listing) equals
the manifest's reuses the output. With one seed the output is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from hanorec.data.checks import (
    apply_title_policy,
    check_output_dir,
    check_ratings,
    check_sampling_sizes,
    check_splits,
    load_manifest,
    summary_lines,
)
from hanorec.data.config import MODEL_NEGATIVES, DataConfig
from hanorec.data.fetch import sha256_file
from hanorec.data.images import (
    PLACEHOLDER_FILE,
    PLACEHOLDER_IMAGE,
    PREPARED_PREFIX,
    RESIZED_DIR,
    check_images,
    write_placeholder,
    write_resized,
)
from hanorec.data.pairs import pair_columns
from hanorec.data.protocols import (
    SamplingContext,
    base_columns,
    build_rows,
    rows_to_arrow,
    stream,
)
from hanorec.data.readers import read_source
from hanorec.data.sequences import Sequences, build_sequences
from hanorec.data.splits import SPLITS, make_splits, training_popularity
from hanorec.data.tables import Catalogue

FORMAT_VERSION = 1
PAIR_SPLITS = ("train", "validation")


@contextmanager
def _stage(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def source_record(config: DataConfig) -> dict[str, Any]:
    """Size and SHA-256 of each source file, plus a digest of the image folder listing."""
    record: dict[str, Any] = {}
    for key in ("interactions_path", "items_path"):
        path = config.path(getattr(config, key))
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "file not found"
            raise ValueError(f"{path}: {what} (data.{key})")
        record[key] = {"path": str(path), "size": path.stat().st_size,
                       "sha256": sha256_file(path)}
    root = config.path(config.image_root)
    if root is not None and root.is_dir():
        digest = hashlib.sha256()
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            stat = entry.stat()
            digest.update(f"{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        record["image_root"] = {"path": str(root), "listing_sha256": digest.hexdigest()}
    return record


def fingerprint(config: DataConfig, sources: dict[str, Any]) -> str:
    """SHA-256 of the format version, the config and the source record (model-drawn negative
    strategies prepare exactly what ``random`` does, so they share its fingerprint)."""
    settings = asdict(config)
    if settings["negative_sampling"] in MODEL_NEGATIVES:
        settings["negative_sampling"] = "random"
    blob = json.dumps({"version": FORMAT_VERSION, "config": settings, "sources": sources},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _reusable(output: Path, expected: str, *, quiet: bool = False) -> dict[str, Any] | None:
    """The manifest of a complete preparation with fingerprint `expected`, else None; a
    damaged or incomplete manifest (a killed run) is reported and means a rebuild."""
    manifest = output / "manifest.json"
    if manifest.is_file():
        data, problem = load_manifest(manifest)
        if data is None:
            if not quiet:
                print(f"note: {manifest} is unusable ({problem}); rebuilding {output}")
            return None
        complete = all((output / name).is_dir() for name in ["items", *data["counts"]])
        if data.get("fingerprint") == expected and complete:
            return data
    return None


def is_current(config: DataConfig) -> bool:
    """True when ``config.output_dir`` holds a complete preparation of exactly this config and
    these source files (the check :func:`prepare` makes before reusing a folder)."""
    output = config.path(config.output_dir)
    if not (output / "manifest.json").is_file():
        return False
    return _reusable(output, fingerprint(config, source_record(config)), quiet=True) is not None


def _save(table: pa.Table, path: Path, name: str, digest: str) -> None:
    fp = hashlib.sha256(f"{digest}/{name}".encode()).hexdigest()[:16]
    datasets.Dataset(table, fingerprint=fp).save_to_disk(str(path))


def _save_dict(tables: dict[str, pa.Table], path: Path, name: str, digest: str) -> None:
    fp = hashlib.sha256(f"{digest}/{name}".encode()).hexdigest()
    datasets.DatasetDict({
        split: datasets.Dataset(table, fingerprint=f"{fp[:14]}{i:02d}")
        for i, (split, table) in enumerate(tables.items())
    }).save_to_disk(str(path))


def _prune_catalogue(sequences: Sequences, catalogue: Catalogue,
                     images: list[str | None]) -> tuple[Catalogue, list[str | None], int]:
    present = np.unique(sequences.items)
    remap = np.full(len(catalogue), -1, dtype=np.int64)
    remap[present] = np.arange(len(present))
    sequences.items = remap[sequences.items]
    return catalogue.subset(present), [images[i] for i in present], len(catalogue) - len(present)


def _items_table(catalogue: Catalogue, images: list[str | None],
                 popularity: np.ndarray) -> pa.Table:
    return pa.table({
        "item_id": pa.array(catalogue.item_id, pa.string()),
        "title": pa.array(catalogue.title, pa.string()),
        "genres": pa.array(catalogue.genres, pa.list_(pa.string())),
        "image": pa.array(images, pa.string()),
        "popularity": pa.array(popularity, pa.int64()),
    })


def prepare(config: DataConfig, *, item_embeddings: np.ndarray | None = None,
            force: bool = False, progress: bool = True,
            timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Prepare the data described by `config` (see module docstring).

    Args:
        config: The data config.
        item_embeddings: ``[num_items, d]`` in the pruned catalogue's order (needed only by
            ``negative_sampling: hard``).
        force: Rebuild even when the fingerprint matches.
        progress: Show tqdm bars.
        timings: Filled with seconds per stage when given.

    Returns:
        The manifest.
    """
    timings = {} if timings is None else timings
    output = config.path(config.output_dir)
    check_output_dir(output)
    with _stage(timings, "hash sources"):
        sources = source_record(config)
        digest = fingerprint(config, sources)
    if not force and (manifest := _reusable(output, digest)) is not None:
        print(f"reusing {output} (fingerprint {digest[:12]})")
        return manifest
    with _stage(timings, "read"):
        interactions, catalogue = read_source(config)
        check_ratings(interactions, *config.ratings_allowed(),
                      config.rating_column if config.dataset_format == "table" else "rating")
        catalogue.stats["titles_truncated"] = apply_title_policy(
            catalogue, config.max_title_chars, config.long_title_policy)
    with _stage(timings, "images"):
        image_check = check_images(catalogue, config.path(config.image_root),
                                   config.missing_image_policy,
                                   max_pixels=config.max_image_pixels,
                                   large_policy=config.large_image_policy)
        images, image_counts = image_check.images, image_check.counts
    with _stage(timings, "sequences"):
        min_length = config.min_history + (2 if config.split == "leave-one-out" else 1)
        sequences = build_sequences(
            interactions, catalogue, tie_break=config.tie_break, min_length=min_length,
            k_core=config.k_core, min_rating=config.min_rating,
            drop_unknown_items=config.drop_unknown_items)
        catalogue, images, unused = _prune_catalogue(sequences, catalogue, images)
        targets = make_splits(sequences, split=config.split, min_history=config.min_history,
                              max_history=config.max_history,
                              train_targets_per_user=config.train_targets_per_user,
                              quantiles=config.temporal_quantiles)
        check_splits(targets, config, sequences.num_users)
        popularity = training_popularity(sequences, config.split, len(catalogue),
                                         config.temporal_quantiles)
        context = SamplingContext.from_sequences(sequences, len(catalogue))
        check_sampling_sizes(config, targets, context.allowed, sequences.user_ids,
                             len(catalogue))
    if output.exists():
        for name in ["manifest.json", "items", "pairs", PLACEHOLDER_FILE, RESIZED_DIR,
                     *config.protocols]:
            target = output / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    kept = {name.rsplit("/", 1)[-1] for name in images if name and name.startswith(PREPARED_PREFIX)}
    write_resized({k: v for k, v in image_check.resize.items() if k in kept},
                  output / RESIZED_DIR, config.max_image_pixels)
    item_ids = pa.array(catalogue.item_id, pa.string())
    user_ids = pa.array(sequences.user_ids, pa.string())
    with _stage(timings, "histories"):
        bases = {split: base_columns(targets[split], sequences, item_ids, user_ids)
                 for split in SPLITS}
    counts: dict[str, dict[str, int]] = {}
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    bar = tqdm(total=len(config.protocols) * 5, desc="prepare", disable=not progress)
    for protocol in config.protocols:
        tables, pair_tables = {}, {}
        for split in SPLITS:
            with _stage(timings, f"sample {protocol}"):
                rows = build_rows(protocol, split, targets[split], sequences, context,
                                  seed=config.data_seed, num_candidates=config.num_candidates,
                                  hit3_candidates=config.hit3_candidates)
                tables[split] = rows_to_arrow(rows, sequences, item_ids, user_ids,
                                              bases[split])
            bar.update()
            if split in PAIR_SPLITS:
                with _stage(timings, f"pairs {protocol}"):
                    extra = pair_columns(rows, item_ids, k=config.num_negatives,
                                         strategy=config.negative_sampling,
                                         rng=stream(config.data_seed, protocol, split, 1),
                                         context=context, popularity=popularity,
                                         item_embeddings=item_embeddings)
                    table = tables[split]
                    for name, column in extra.items():
                        table = table.append_column(name, column)
                    pair_tables[split] = table
                bar.update()
        with _stage(timings, "write"):
            _save_dict(tables, output / protocol, protocol, digest)
            _save_dict(pair_tables, output / "pairs" / protocol, f"pairs/{protocol}", digest)
        counts[protocol] = {split: t.num_rows for split, t in tables.items()}
    bar.close()
    with _stage(timings, "write"):
        _save(_items_table(catalogue, images, popularity), output / "items", "items", digest)
        if PLACEHOLDER_IMAGE in images:
            write_placeholder(output / PLACEHOLDER_FILE, (config.poster_width,
                                                          config.poster_height))
    if not bars_were_off:
        datasets.utils.enable_progress_bars()
    stats = dict(sequences.stats)
    stats["items_without_interactions_dropped"] = unused
    stats.update(catalogue.stats)
    stats.update(image_counts)
    stats["images_placeholder"] = images.count(PLACEHOLDER_IMAGE)
    stats["items_text_only"] = images.count(None)
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": digest,
        "users": sequences.num_users,
        "items": len(catalogue),
        "interactions": int(len(sequences.items)),
        "counts": counts,
        "stats": stats,
        "seeds": {"data_seed": config.data_seed},
        "tie_break": ("timestamp, then source line" if config.tie_break == "line"
                      else "timestamp, then item id, then source line"),
        "image_root": None if config.image_root is None else str(config.path(config.image_root)),
        "item_noun": config.item_noun,
        "sources": sources,
        "config": asdict(config),
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for line in summary_lines(manifest):
        print(line)
    return manifest
