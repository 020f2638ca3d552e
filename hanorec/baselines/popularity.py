"""Most-popular baseline: score every item by its number of training interactions.

Item indices are 0-based (row ``i`` of the prepared ``items/`` dataset is item ``i``), the same
convention as :mod:`hanorec.baselines.sasrec` and :mod:`hanorec.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["MostPopular"]


class MostPopular:
    """Non-personalised baseline: ``score(v) = #training interactions with v``.

    Ties between equally popular items are left as ties; :func:`hanorec.metrics.target_ranks`
    breaks them pessimistically, so the baseline gets no credit for a lucky order.
    """

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return 0 if self.counts is None else int(self.counts.size)

    def fit(self, train_sequences: Sequence[Sequence[int]], num_items: int) -> MostPopular:
        """Count interactions per item over the training sequences.

        Args:
            train_sequences: per-user item indices of the training part (0-based).
            num_items: catalogue size; items never seen score 0.

        Returns:
            ``self``.
        """
        items = [item for sequence in train_sequences for item in sequence]
        flat = np.asarray(items, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= num_items):
            raise ValueError(f"train_sequences: item index out of range [0, {num_items})")
        self.counts = np.bincount(flat, minlength=num_items).astype(np.float64)
        return self

    def fit_counts(self, counts: Sequence[int]) -> MostPopular:
        """Use precomputed counts (e.g. the ``popularity`` column of ``items/``)."""
        self.counts = np.asarray(counts, dtype=np.float64).reshape(-1)
        return self

    def score(
        self,
        histories: Sequence[Sequence[int]],
        candidate_ids: object | None = None,
        *,
        mask_history: bool = True,
    ) -> np.ndarray:
        """Popularity scores for candidate lists or the full catalogue.

        Args:
            histories: per-user history item indices (used only for masking).
            candidate_ids: ``[U, C]`` item indices, or ``None`` for the full catalogue.
            mask_history: for the full catalogue, score history items ``-inf`` (they then
                rank below every unseen item; :func:`hanorec.metrics.target_ranks` also takes
                an explicit mask).

        Returns:
            float64 ``[U, C]`` or ``[U, num_items]``.
        """
        if self.counts is None:
            raise ValueError("MostPopular.score: call fit() first")
        if candidate_ids is not None:
            candidates = np.asarray(candidate_ids, dtype=np.int64)
            if candidates.ndim != 2 or candidates.shape[0] != len(histories):
                raise ValueError(f"candidate_ids: expected shape [{len(histories)}, C], "
                                 f"got {candidates.shape}")
            return self.counts[candidates]
        scores = np.tile(self.counts, (len(histories), 1))
        if mask_history:
            for user, history in enumerate(histories):
                scores[user, np.asarray(list(history), dtype=np.int64)] = -np.inf
        return scores
