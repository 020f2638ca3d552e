"""Users' known item sequences, rebuilt from the prepared rows (no model, no stage).

Prepared rows carry at most ``max_history`` items of history, so each user's *training
sequence* (every item before the validation target) is rebuilt from the ``train`` split: the
first train row's history, then the target of each following train row of that user. Rows are
checked to chain (each row's history must be the tail of the sequence so far, and the
validation row's history its tail); when they do not (e.g. a split that keeps only some
targets per user) the validation row's history stands in and the user is counted as a
fallback. The test input is the training sequence plus the validation target.

Used by the classic baselines (SASRec trains on these sequences), by the ``full`` protocol
(every known item is masked from the ranking) and by the collaborative item features
(:mod:`hanorec.collab`, which trains its recommender on the training sequences only).
Item ids become 0-based catalogue indices (row ``i`` of ``items/``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hanorec.data.prepared import read_items, read_protocol

#: Protocols whose rows can rebuild the sequences (every protocol shares the split's targets).
REBUILD_PROTOCOLS = ("full", "candidates", "hit3", "hit1")


@dataclass
class SplitArrays:
    """One split of a protocol as 0-based item indices."""

    user_ids: list[str]
    histories: list[list[int]]
    targets: np.ndarray
    candidates: np.ndarray | None = None  # [U, C] (candidates, hit3)
    target_index: np.ndarray | None = None  # [U]
    queries: np.ndarray | None = None  # [U] (hit1)
    labels: np.ndarray | None = None  # [U] (hit1)
    inputs: list[list[int]] | None = None  # model input sequences (default: histories)

    @property
    def model_inputs(self) -> list[list[int]]:
        return self.histories if self.inputs is None else self.inputs


def _lookup(index: dict[str, int], item_id: str, where: str) -> int:
    try:
        return index[str(item_id)]
    except KeyError:
        raise ValueError(f"{where}: item id {item_id!r} is not in items/") from None


def split_arrays(rows: Sequence[dict[str, Any]], index: dict[str, int], protocol: str,
                 where: str) -> SplitArrays:
    """Convert prepared rows (string item ids) to index arrays; errors name split, row, field."""
    out = SplitArrays([], [], np.zeros(len(rows), dtype=np.int64))
    candidates, target_index, queries, labels = [], [], [], []
    for n, row in enumerate(rows):
        at = f"{where}[{n}]"
        out.user_ids.append(str(row["user_id"]))
        out.histories.append([_lookup(index, i, f"{at}.history") for i in row["history"]])
        out.targets[n] = _lookup(index, row["target"], f"{at}.target")
        if protocol in ("candidates", "hit3"):
            candidates.append([_lookup(index, i, f"{at}.candidates") for i in row["candidates"]])
            target_index.append(int(row["target_index"]))
            if candidates[-1][target_index[-1]] != out.targets[n]:
                raise ValueError(f"{at}.target_index: candidates[target_index] != target")
        elif protocol == "hit1":
            queries.append(_lookup(index, row["query"], f"{at}.query"))
            labels.append(int(row["label"]))
    if candidates:
        out.candidates, out.target_index = np.array(candidates), np.array(target_index)
    if queries:
        out.queries, out.labels = np.array(queries), np.array(labels)
    return out


def _ends_with(sequence: list[int], tail: list[int]) -> bool:
    return len(tail) <= len(sequence) and sequence[len(sequence) - len(tail):] == tail


def _chain(rows: list[tuple[list[int], int]]) -> list[int] | None:
    """``history_0 + [target_0, target_1, ...]`` when every row's history is the running tail."""
    sequence = list(rows[0][0]) + [rows[0][1]]
    for history, target in rows[1:]:
        if not _ends_with(sequence, history):
            return None
        sequence.append(target)
    return sequence


def training_sequences(train_rows: Sequence[dict[str, Any]], valid: SplitArrays,
                       index: dict[str, int], where: str) -> tuple[list[list[int]], int]:
    """Each validation user's items before the validation target, rebuilt from train rows.

    Returns:
        ``(sequences aligned with valid.user_ids, number of users that fell back to the
        validation history)``.
    """
    per_user: dict[str, list[tuple[list[int], int]]] = {}
    for n, row in enumerate(train_rows):
        at = f"{where}[{n}]"
        history = [_lookup(index, i, f"{at}.history") for i in row["history"]]
        per_user.setdefault(str(row["user_id"]), []).append(
            (history, _lookup(index, row["target"], f"{at}.target")))
    sequences, fallbacks = [], 0
    for user_id, history in zip(valid.user_ids, valid.histories):
        chained = _chain(per_user[user_id]) if user_id in per_user else None
        if chained is None or not _ends_with(chained, history):
            chained, fallbacks = list(history), fallbacks + 1
        sequences.append(chained)
    return sequences, fallbacks


def test_inputs(sequences: list[list[int]], valid: SplitArrays,
                test: SplitArrays) -> list[list[int]]:
    """Training sequence + validation target per test user (the row history if it disagrees)."""
    position = {user: u for u, user in enumerate(valid.user_ids)}
    inputs = []
    for user_id, history in zip(test.user_ids, test.histories):
        u = position.get(user_id)
        candidate = sequences[u] + [int(valid.targets[u])] if u is not None else []
        inputs.append(candidate if candidate and _ends_with(candidate, history) else list(history))
    return inputs


def load_prepared(prepared_dir: Path, protocol: str) -> tuple[list[str], np.ndarray | None, dict]:
    """Item ids, the popularity column (or None) and the protocol's splits as row lists."""
    items = read_items(prepared_dir)
    item_ids = [str(i) for i in items["item_id"]]
    popularity = np.asarray(items["popularity"]) if "popularity" in items.column_names else None
    splits = read_protocol(prepared_dir, protocol, splits=("validation", "test"))
    names = [name for name in ("train", "validation", "test") if name in splits]
    return item_ids, popularity, {name: splits[name].to_list() for name in names}


def prepared_protocol(prepared_dir: Path) -> str:
    """The first prepared protocol folder that can rebuild the sequences."""
    for protocol in REBUILD_PROTOCOLS:
        if (Path(prepared_dir) / protocol).is_dir():
            return protocol
    raise ValueError(f"{prepared_dir}: no prepared protocol folder "
                     f"({', '.join(REBUILD_PROTOCOLS)})")


def known_sequences(prepared: Path, split: str,
                    protocol: str | None = None) -> tuple[dict[str, list[int]], int]:
    """Each user's item indices before the ``split`` target, rebuilt from the train rows.

    validation → the training sequence; test → training sequence + validation target.

    Returns:
        ``({user_id: sequence}, users whose rows did not chain and fell back to the row history)``.
    """
    protocol = protocol or prepared_protocol(prepared)
    item_ids, _, rows = load_prepared(prepared, protocol)
    index = {item: i for i, item in enumerate(item_ids)}
    where = str(Path(prepared) / protocol)
    valid = split_arrays(rows["validation"], index, protocol, f"{where}/validation")
    sequences, fallbacks = training_sequences(rows.get("train", []), valid, index, f"{where}/train")
    if split == "validation":
        return dict(zip(valid.user_ids, sequences)), fallbacks
    test = split_arrays(rows[split], index, protocol, f"{where}/{split}")
    return dict(zip(test.user_ids, test_inputs(sequences, valid, test))), fallbacks


def known_items(rows: Sequence[Mapping[str, Any]], sequences: Mapping[str, list[int]],
                position: Callable[[str], int]) -> list[list[int]]:
    """The items a full-catalogue ranking masks for each row: the user's known sequence (from
    :func:`known_sequences`), or the row's own ``history`` when it could not be rebuilt.

    Args:
        rows: Prepared rows (``user_id``, ``history``).
        sequences: ``{user_id: item indices}`` of :func:`known_sequences`.
        position: Item id → catalogue index (``Catalog.position``).
    """
    return [sequences.get(str(row["user_id"])) or [position(i) for i in row["history"]]
            for row in rows]
