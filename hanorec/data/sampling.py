"""Vectorised negative sampling: items a user never interacted with, without replacement.

Rejection sampling on whole blocks of rows: draw ``width`` items per row, reject those in
the user's sequence (a sorted-key lookup of ``user * num_items + item``) and repeats
within the row, keep the first ``count`` survivors. Rows that come up short are redrawn
with a doubled width. Taking the first survivors of i.i.d. uniform draws is a uniform
sample without replacement from the allowed set; with ``weights`` each draw follows
``p(v) ∝ weights[v]`` (successive sampling without replacement).
"""

from __future__ import annotations

import numpy as np

_BLOCK_ROWS = 65_536


def in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Elementwise membership of `keys` in the sorted array `sorted_keys`."""
    if len(sorted_keys) == 0:
        return np.zeros(keys.shape, dtype=bool)
    index = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[index] == keys


def _row_duplicates(draws: np.ndarray) -> np.ndarray:
    """Mask of entries equal to an earlier entry of the same row."""
    order = np.argsort(draws, axis=1, kind="stable")
    ordered = np.take_along_axis(draws, order, axis=1)
    repeat = np.zeros(draws.shape, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    mask = np.empty_like(repeat)
    np.put_along_axis(mask, order, repeat, axis=1)
    return mask


class Exclusions:
    """Membership test for ``(user, item)`` pairs: a dense boolean matrix when it fits in
    `dense_limit` cells, else binary search over sorted ``user * num_items + item`` keys."""

    def __init__(self, keys: np.ndarray, num_users: int, num_items: int,
                 dense_limit: int = 200_000_000) -> None:
        self.keys, self.num_items = keys, num_items
        self.dense = None
        if num_users * num_items <= dense_limit:
            self.dense = np.zeros(num_users * num_items, dtype=bool)
            self.dense[keys] = True
            self.dense = self.dense.reshape(num_users, num_items)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Elementwise: is `items` in the sequence of `users` (broadcasting)?"""
        if self.dense is not None:
            return self.dense[users, items]
        return in_sorted(users.astype(np.int64) * self.num_items + items, self.keys)


def _draw(rng: np.random.Generator, shape: tuple[int, int], num_items: int,
          cdf: np.ndarray | None) -> np.ndarray:
    if cdf is None:
        return rng.integers(0, num_items, size=shape, dtype=np.int32)
    draws = np.searchsorted(cdf, rng.random(shape), side="right")
    return np.minimum(draws, num_items - 1).astype(np.int32)


def _fill_block(rng: np.random.Generator, users: np.ndarray, count: int, num_items: int,
                exclude: Exclusions, cdf: np.ndarray | None, width: int) -> np.ndarray:
    out = np.empty((len(users), count), dtype=np.int64)
    pending = np.arange(len(users))
    while len(pending):
        draws = _draw(rng, (len(pending), width), num_items, cdf)
        valid = ~exclude.contains(users[pending, None], draws)
        valid &= ~_row_duplicates(draws)
        kept = np.cumsum(valid, axis=1, dtype=np.int32)
        done = kept[:, -1] >= count
        chosen = valid[done] & (kept[done] <= count)
        out[pending[done]] = draws[done][chosen].reshape(-1, count)
        pending = pending[~done]
        width *= 2
    return out


def sample_excluding(rng: np.random.Generator, users: np.ndarray, count: int, num_items: int,
                     exclude: Exclusions, weights: np.ndarray | None = None,
                     allowed_per_user: np.ndarray | None = None) -> np.ndarray:
    """Draw `count` distinct items per row, none in the row's user's sequence.

    Args:
        rng: Random generator (its state advances deterministically).
        users: User index per row, shape ``[R]``.
        count: Items per row.
        num_items: Catalogue size.
        exclude: The ``(user, item)`` pairs to avoid.
        weights: Optional non-negative sampling weights ``[num_items]`` (e.g. popularity + 1).
        allowed_per_user: Number of items each user may receive (checked against `count`).

    Returns:
        ``[R, count]`` item indices.

    Raises:
        ValueError: Some user has fewer than `count` allowed items.
    """
    users = np.asarray(users, dtype=np.int64)
    if allowed_per_user is not None and len(users):
        short = allowed_per_user[users] < count
        if short.any():
            raise ValueError(f"user index {int(users[np.argmax(short)])} has only "
                             f"{int(allowed_per_user[users][short].min())} items outside their "
                             f"sequence; cannot sample {count} negatives (lower num_candidates "
                             "or num_negatives)")
    cdf = None
    if weights is not None:
        cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
        cdf /= cdf[-1]
    # first width: enough for ~all rows given the average excluded fraction (retries double it)
    excluded = len(exclude.keys) / max(1, (exclude.keys[-1] // num_items + 1) * num_items) \
        if len(exclude.keys) else 0.0
    width = int(count * (1.2 + count / num_items) / max(0.05, 1.0 - excluded)) + 4
    blocks = [_fill_block(rng, users[i:i + _BLOCK_ROWS], count, num_items, exclude, cdf, width)
              for i in range(0, len(users), _BLOCK_ROWS)]
    return np.concatenate(blocks) if blocks else np.empty((0, count), dtype=np.int64)


def allowed_items_per_user(sequences_keys: np.ndarray, num_users: int,
                           num_items: int) -> np.ndarray:
    """Items outside each user's sequence: ``num_items - |distinct items of the user|``."""
    return num_items - np.bincount(sequences_keys // num_items, minlength=num_users)


def insert_targets(rng: np.random.Generator, targets: np.ndarray,
                   negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put each target at a uniformly random slot among its (already random) negatives.

    Returns:
        ``[R, M]`` candidate lists and the target slot per row.
    """
    rows, size = len(targets), negatives.shape[1] + 1
    slot = rng.integers(0, size, size=rows)
    column = np.arange(size)[None, :]
    source = np.clip(column - (column > slot[:, None]), 0, max(size - 2, 0))
    gathered = np.take_along_axis(negatives, source, axis=1) if size > 1 else negatives
    candidates = np.where(column == slot[:, None], targets[:, None], gathered)
    return candidates, slot
