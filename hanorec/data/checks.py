"""Checks and policies that ``prepare`` applies between reading and writing.

Each function either raises an error that names the file, line and field (or the recipe key),
or applies a documented policy and returns what it changed, so that ``prepare`` can count it in
the manifest and print it (:func:`summary_lines`):

* ratings must lie in ``rating_range`` (:func:`check_ratings`);
* titles above ``max_title_chars`` are truncated or refused (:func:`apply_title_policy`);
* every candidate list and preference pair must be fillable from the catalogue before any row
  is sampled (:func:`check_sampling_sizes`);
* no split may come out empty (:func:`check_splits`);
* ``output_dir`` must be creatable (:func:`check_output_dir`), and a ``manifest.json`` left
  there by a killed or older run is read defensively (:func:`load_manifest`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hanorec.data.config import DataConfig
from hanorec.data.errors import DataFileError, read_json
from hanorec.data.readers.text import truncate_title
from hanorec.data.splits import SPLITS, Targets
from hanorec.data.tables import Catalogue, Interactions


def check_output_dir(output: Path) -> None:
    """Refuse an ``output_dir`` that is a file or lies under a file (before any work is done).

    Raises:
        DataFileError: Naming the file in the way.
    """
    if output.exists() and not output.is_dir():
        raise DataFileError(output, None, "output_dir is a file, not a folder; choose another "
                            "output_dir or move the file away")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataFileError(parent, None, f"is a file, so output_dir {output} cannot "
                                    "be created inside it")
            return


def load_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read a prepared folder's ``manifest.json``.

    Returns:
        ``(manifest, None)`` when it is a complete manifest, else ``(None, why)``.
    """
    try:
        data = read_json(path)
    except DataFileError as error:
        return None, str(error).removeprefix(f"{path}: ").removeprefix(f"{path}, ")
    if not isinstance(data, dict):
        return None, "not a JSON object"
    counts = data.get("counts")
    if not isinstance(data.get("fingerprint"), str) or not isinstance(counts, dict) or not all(
            isinstance(splits, dict) for splits in counts.values()):
        return None, "incomplete (no fingerprint or counts)"
    return data, None


def check_ratings(interactions: Interactions, low: float, high: float, field: str) -> None:
    """Every rating within ``[low, high]``.

    Raises:
        DataFileError: The first rating outside, with its line.
    """
    if interactions.rating is None or not len(interactions.rating):
        return
    outside = (interactions.rating < low) | (interactions.rating > high)
    if outside.any():
        row = int(np.argmax(outside))
        raise DataFileError(interactions.source, int(interactions.line[row]),
                            f"rating {interactions.rating[row]:g} is outside the accepted range "
                            f"[{low:g}, {high:g}]; set data.rating_range to accept it", field)


def apply_title_policy(catalogue: Catalogue, max_chars: int, policy: str) -> int:
    """Truncate (``truncate``) or refuse (``error``) titles longer than ``max_chars``.

    Returns:
        The number of titles truncated.

    Raises:
        DataFileError: A long title under the ``error`` policy, naming its line.
    """
    truncated = 0
    for index, title in enumerate(catalogue.title):
        if len(title) <= max_chars:
            continue
        if policy == "error":
            raise DataFileError(catalogue.source, catalogue.line[index],
                                f"title of item {catalogue.item_id[index]!r} has {len(title)} "
                                f"characters, above max_title_chars {max_chars} "
                                "(long_title_policy: error)", "title")
        catalogue.title[index] = truncate_title(title, max_chars)
        truncated += 1
    return truncated


def _needs(config: DataConfig) -> list[tuple[str, int, tuple[str, ...], str]]:
    """``(recipe key = value, negatives needed per user, splits, remedy)`` per sampled list."""
    needs = []
    if "candidates" in config.protocols:
        needs.append((f"num_candidates ({config.num_candidates})", config.num_candidates - 1,
                      SPLITS, "lower num_candidates"))
    if "hit3" in config.protocols:
        needs.append((f"hit3_candidates ({config.hit3_candidates})",
                      config.hit3_candidates - 1, SPLITS, "lower hit3_candidates"))
    if "hit1" in config.protocols:
        needs.append(("protocols (hit1)", 1, SPLITS, "drop hit1 from protocols"))
    if "full" in config.protocols:
        needs.append((f"num_negatives ({config.num_negatives})", config.num_negatives,
                      ("train", "validation"), "lower num_negatives"))
    return needs


def check_sampling_sizes(config: DataConfig, targets: Mapping[str, Targets], allowed: np.ndarray,
                         user_ids: list[str], num_items: int) -> None:
    """Every user with a target can get the negatives its candidate lists and pairs need.

    Args:
        config: The data config.
        targets: The split targets.
        allowed: Items outside each user's sequence, per user index.
        user_ids: User id per user index.
        num_items: Catalogue size.

    Raises:
        ValueError: Naming the recipe key to lower, a user id and the numbers.
    """
    for key, need, splits, remedy in _needs(config):
        users = np.unique(np.concatenate([targets[s].user for s in splits]))
        if not len(users):
            continue
        worst = int(users[np.argmin(allowed[users])])
        if allowed[worst] < need:
            raise ValueError(f"data.{key} needs {need} items outside each user's sequence, but "
                             f"user {user_ids[worst]!r} has only {int(allowed[worst])} (the "
                             f"catalogue has {num_items} items); {remedy}")


def check_splits(targets: Mapping[str, Targets], config: DataConfig, users: int) -> None:
    """No split may be empty (training or evaluation would fail later on it).

    Raises:
        ValueError: Naming the split and the settings that decide it.
    """
    for split in SPLITS:
        if len(targets[split]):
            continue
        if config.split == "temporal":
            hint = (f"temporal_quantiles {config.temporal_quantiles} leave no {split} target "
                    "with enough history; move the quantiles or lower min_history")
        else:
            hint = (f"every one of the {users} users has only min_history + 2 = "
                    f"{config.min_history + 2} interactions; lower min_history or use more data")
        raise ValueError(f"data: the {split} split is empty: {hint}")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary_lines(manifest: Mapping[str, Any]) -> list[str]:
    """What ``prepare`` read, dropped (by reason) and kept, as printed after a build."""
    stats = manifest.get("stats", {})
    get = lambda key: int(stats.get(key, 0))  # noqa: E731
    lines = [f"read {get('interactions_read')} interaction rows; kept "
             f"{manifest.get('interactions', 0)} interactions of "
             f"{_plural(manifest.get('users', 0), 'user')} "
             f"on {_plural(manifest.get('items', 0), 'item')}"]
    dropped = [(get("duplicate_rows_dropped"), "duplicate (user, item, timestamp)"),
               (get("low_rating_rows_dropped"), "below min_rating"),
               (get("unknown_item_rows_dropped"), "unknown item"),
               (get("k_core_rows_dropped"), "k-core"),
               (get("short_user_rows_dropped"),
                f"of {_plural(get('short_users_dropped'), 'user')} with too few interactions")]
    parts = [f"{count} {why}" for count, why in dropped if count]
    lines.append("  dropped rows: " + (", ".join(parts) if parts else "none"))
    items = [(get("items_without_interactions_dropped"), "items without interactions dropped"),
             (get("titles_cleaned"), "titles with line breaks or control characters cleaned"),
             (get("titles_truncated"), "titles truncated to max_title_chars")]
    parts = [f"{count} {what}" for count, what in items if count]
    if parts:
        lines.append("  items: " + ", ".join(parts))
    if any(key.startswith("images_") for key in stats):
        lines.append(f"  images: {get('images_found')} found, {get('images_missing')} missing, "
                     f"{get('images_corrupt')} corrupt, {get('images_downscaled')} downscaled; "
                     f"{get('images_placeholder')} placeholder, {get('items_text_only')} "
                     "text-only items")
    return lines
