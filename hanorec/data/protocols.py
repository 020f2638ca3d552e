"""The four task protocols built on the split targets (``docs/methods.md``, "Evaluation protocols").

- ``full``: ``user_id``, ``history``, ``target`` (full-catalogue ranking).
- ``candidates`` / ``hit3``: plus ``candidates`` (the target and ``M - 1`` negatives,
  shuffled once with the seed) and ``target_index``. M = ``num_candidates`` (20) or
  ``hit3_candidates`` (5).
- ``hit1``: plus ``query`` and ``label``: a seeded permutation gives exactly
  ``ceil(R / 2)`` rows ``label = 1`` (query = target) and the rest ``label = 0`` (query =
  one sampled negative).

Negatives are drawn uniformly from the catalogue minus every item of the user's whole
sequence (train, validation and test items alike). Each (protocol, split) has its own
random stream seeded by ``(data_seed, protocol, split)``, so adding a protocol never
changes another's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from hanorec.data.sampling import (
    Exclusions,
    allowed_items_per_user,
    insert_targets,
    sample_excluding,
)
from hanorec.data.sequences import Sequences
from hanorec.data.splits import SPLITS, Targets, history_ranges

PROTOCOL_CODES = {"hit1": 1, "hit3": 3, "candidates": 20, "full": 99}


def stream(seed: int, protocol: str, split: str, purpose: int = 0) -> np.random.Generator:
    """The random generator of one (protocol, split, purpose)."""
    return np.random.default_rng([seed, PROTOCOL_CODES[protocol], SPLITS.index(split), purpose])


@dataclass
class SamplingContext:
    """What negative sampling needs about the data."""

    num_items: int
    exclude: Exclusions
    allowed: np.ndarray

    @classmethod
    def from_sequences(cls, sequences: Sequences, num_items: int) -> SamplingContext:
        keys = sequences.exclusion_keys(num_items)
        return cls(num_items, Exclusions(keys, sequences.num_users, num_items),
                   allowed_items_per_user(keys, sequences.num_users, num_items))

    def negatives(self, rng: np.random.Generator, users: np.ndarray, count: int,
                  weights: np.ndarray | None = None) -> np.ndarray:
        """``[R, count]`` items outside each row's user sequence."""
        return sample_excluding(rng, users, count, self.num_items, self.exclude, weights,
                                self.allowed)


@dataclass
class ProtocolRows:
    """Rows of one protocol and split, as item-index arrays."""

    protocol: str
    targets: Targets
    target_item: np.ndarray
    candidates: np.ndarray | None = None
    target_index: np.ndarray | None = None
    query: np.ndarray | None = None
    label: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target_item)


def build_rows(protocol: str, split: str, targets: Targets, sequences: Sequences,
               context: SamplingContext, *, seed: int, num_candidates: int,
               hit3_candidates: int) -> ProtocolRows:
    """Sample the protocol's candidates / queries for one split."""
    rng = stream(seed, protocol, split)
    target_item = sequences.items[targets.position]
    rows = ProtocolRows(protocol, targets, target_item)
    if protocol in ("candidates", "hit3"):
        size = num_candidates if protocol == "candidates" else hit3_candidates
        negatives = context.negatives(rng, targets.user, size - 1)
        rows.candidates, rows.target_index = insert_targets(rng, target_item, negatives)
    elif protocol == "hit1":
        count = len(target_item)
        rows.label = rng.permutation(np.arange(count) < (count + 1) // 2).astype(np.int64)
        negative = context.negatives(rng, targets.user, 1)[:, 0]
        rows.query = np.where(rows.label == 1, target_item, negative)
    return rows


def _lists(values: pa.Array, width: int) -> pa.Array:
    offsets = pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def base_columns(targets: Targets, sequences: Sequences, item_ids: pa.Array,
                 user_ids: pa.Array) -> dict[str, pa.Array]:
    """``user_id``, ``history`` and ``target`` of a split (shared by every protocol)."""
    positions, offsets = history_ranges(targets)
    take = pa.array(sequences.items[positions], pa.int64())
    return {
        "user_id": user_ids.take(pa.array(targets.user, pa.int64())),
        "history": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                            item_ids.take(take)),
        "target": item_ids.take(pa.array(sequences.items[targets.position], pa.int64())),
    }


def rows_to_arrow(rows: ProtocolRows, sequences: Sequences, item_ids: pa.Array,
                  user_ids: pa.Array, base: dict[str, pa.Array] | None = None) -> pa.Table:
    """Arrow table in the schema of docs/architecture.md ("Prepared data").

    Args:
        base: Precomputed `base_columns` of the same targets (saves recomputing them).
    """
    def ids(index: np.ndarray) -> pa.Array:
        return item_ids.take(pa.array(np.ravel(index), pa.int64()))

    columns = dict(base or base_columns(rows.targets, sequences, item_ids, user_ids))
    if rows.candidates is not None:
        columns["candidates"] = _lists(ids(rows.candidates), rows.candidates.shape[1])
        columns["target_index"] = pa.array(rows.target_index, pa.int64())
    if rows.query is not None:
        columns["query"] = ids(rows.query)
        columns["label"] = pa.array(rows.label, pa.int64())
    return pa.table(columns)
