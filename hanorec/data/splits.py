"""Train / validation / test targets over the sorted sequences.

A *target* is a position ``p`` in the flattened sequences; its history is the user's
items at ``[max(start, p - max_history), p)`` (oldest first, never empty).

- ``leave-one-out``: test = the user's last position, validation = the second last,
  train = every earlier position with at least ``min_history`` items before it (the most
  recent ``train_targets_per_user`` of them when set).
- ``temporal``: global timestamp quantiles ``q1 < q2``; train targets are positions with
  ``t < q1``; each user's validation target is their first position with
  ``q1 <= t < q2`` and their test target their first position with ``t >= q2``
  (all with at least ``min_history`` items before them). History crosses the boundaries.

Training popularity counts each item's interactions that precede the validation
region (leave-one-out: all but each user's last two; temporal: ``t < q1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hanorec.data.sequences import Sequences

SPLITS = ("train", "validation", "test")


@dataclass
class Targets:
    """The targets of one split: user index, target position and history start."""

    user: np.ndarray
    position: np.ndarray
    history_start: np.ndarray

    def __len__(self) -> int:
        return len(self.position)


def _ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(start, stop)`` per row, and the row of each element."""
    counts = np.maximum(stops - starts, 0)
    rows = np.repeat(np.arange(len(starts)), counts)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return starts[rows] + np.arange(counts.sum()) - offsets[rows], rows


def _targets(sequences: Sequences, users: np.ndarray, positions: np.ndarray,
             max_history: int) -> Targets:
    start = sequences.offsets[users]
    return Targets(user=users, position=positions,
                   history_start=np.maximum(start, positions - max_history))


def leave_one_out(sequences: Sequences, *, min_history: int, max_history: int,
                  train_targets_per_user: int | None) -> dict[str, Targets]:
    """Leave-one-out targets (users need ``min_history + 2`` items; shorter ones were dropped
    by `build_sequences`)."""
    start, end = sequences.offsets[:-1], sequences.offsets[1:]
    users = np.arange(sequences.num_users)
    first = start + min_history
    if train_targets_per_user is not None:
        first = np.maximum(first, end - 2 - train_targets_per_user)
    positions, rows = _ranges(first, end - 2)
    return {
        "train": _targets(sequences, users[rows], positions, max_history),
        "validation": _targets(sequences, users, end - 2, max_history),
        "test": _targets(sequences, users, end - 1, max_history),
    }


def _first_in(sequences: Sequences, eligible: np.ndarray, max_history: int) -> Targets:
    users = sequences.user_of_position()
    positions = np.flatnonzero(eligible)
    first = np.concatenate([[True], users[positions][1:] != users[positions][:-1]])[
        : len(positions)]  # no eligible position: no target (an empty split, reported later)
    positions = positions[first]
    return _targets(sequences, users[positions], positions, max_history)


def temporal(sequences: Sequences, *, quantiles: list[float], min_history: int,
             max_history: int, train_targets_per_user: int | None) -> dict[str, Targets]:
    """Global temporal split at the timestamp quantiles `quantiles` = ``[q1, q2]``."""
    q1, q2 = np.quantile(sequences.timestamps, quantiles)
    users = sequences.user_of_position()
    depth = np.arange(len(users)) - sequences.offsets[users]
    ok = depth >= min_history
    times = sequences.timestamps
    train = np.flatnonzero(ok & (times < q1))
    if train_targets_per_user is not None and len(train):
        owner = users[train]
        change = owner[1:] != owner[:-1]
        last_of_group = np.flatnonzero(np.concatenate([change, [True]]))
        group = np.concatenate([[0], np.cumsum(change)])
        from_end = last_of_group[group] - np.arange(len(train))
        train = train[from_end < train_targets_per_user]
    return {
        "train": _targets(sequences, users[train], train, max_history),
        "validation": _first_in(sequences, ok & (times >= q1) & (times < q2), max_history),
        "test": _first_in(sequences, ok & (times >= q2), max_history),
    }


def training_popularity(sequences: Sequences, split: str, num_items: int,
                        quantiles: list[float]) -> np.ndarray:
    """Interactions per item in the training region (see module docstring)."""
    if split == "temporal":
        q1 = np.quantile(sequences.timestamps, quantiles[0])
        mask = sequences.timestamps < q1
    else:
        users = sequences.user_of_position()
        mask = np.arange(len(users)) < sequences.offsets[1:][users] - 2
    return np.bincount(sequences.items[mask], minlength=num_items).astype(np.int64)


def make_splits(sequences: Sequences, *, split: str, min_history: int, max_history: int,
                train_targets_per_user: int | None,
                quantiles: list[float]) -> dict[str, Targets]:
    """Dispatch to `leave_one_out` or `temporal`."""
    if split == "temporal":
        return temporal(sequences, quantiles=quantiles, min_history=min_history,
                        max_history=max_history, train_targets_per_user=train_targets_per_user)
    return leave_one_out(sequences, min_history=min_history, max_history=max_history,
                         train_targets_per_user=train_targets_per_user)


def history_ranges(targets: Targets) -> tuple[np.ndarray, np.ndarray]:
    """Flattened history positions of every target and the list offsets (for arrow)."""
    positions, _ = _ranges(targets.history_start, targets.position)
    lengths = targets.position - targets.history_start
    return positions, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
