"""Evaluation metrics for sequential recommendation (pure functions, numpy float64).

Every function takes numpy arrays (or anything ``np.asarray`` accepts: lists, CPU torch
tensors) and computes in ``float64``. Ranking metrics return **per-user arrays** so that the
evaluator can save per-user values and :mod:`hanorec.stats` can bootstrap over users; the
reported number is the mean of the array.

Conventions (``docs/methods.md``, "Evaluation protocols"):

* ``target_ranks`` ranks one target among ``C`` scored items per user, **1-based** and
  **pessimistic on ties**: ``rank = 1 + #{j ≠ target : s_j ≥ s_target}``. A target tied with a
  negative does not win, so a constant scorer gets the worst rank, not a lucky one.
* ``HR@K = 1[rank ≤ K]``; ``NDCG@K = 1[rank ≤ K] / log2(rank + 1)`` (binary relevance, one
  target, so the ideal DCG is 1); ``MRR = 1 / rank``.
* ``roc_auc`` is the Mann–Whitney ``U`` of the positives divided by ``n_pos · n_neg``, with
  average ranks for ties (a tie between a positive and a negative counts ½).
* Generated answers are matched to candidate titles with :func:`match_answer` (rule below).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "DEFAULT_KS",
    "FULL_KS",
    "PROTOCOL_KS",
    "answer_validity",
    "auc_contributions",
    "full_ranking",
    "generated_hit1",
    "history_mask",
    "hit_rate",
    "match_answer",
    "mrr",
    "ndcg",
    "normalize_title",
    "ranking_metrics",
    "roc_auc",
    "target_ranks",
    "mean_metrics",
    "valid_ratio",
    "weighted_auc_batch",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)


def _as_float_matrix(scores: object, name: str = "scores") -> np.ndarray:
    """Convert ``scores`` to a 2-D float64 array, rejecting NaN."""
    if hasattr(scores, "detach"):  # torch tensor, without importing torch
        scores = scores.detach().cpu().numpy()
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [users, items], got shape {array.shape}")
    if np.isnan(array).any():
        rows = np.unique(np.nonzero(np.isnan(array))[0])
        raise ValueError(f"{name}: NaN scores in rows {rows[:10].tolist()} (of {len(rows)})")
    return array


def _as_ranks(ranks: object) -> np.ndarray:
    array = np.asarray(ranks)
    if array.ndim != 1:
        raise ValueError(f"ranks: expected a 1-D array, got shape {array.shape}")
    if array.size and (array.min() < 1):
        raise ValueError(f"ranks: ranks are 1-based, got minimum {array.min()}")
    return array.astype(np.float64)


def history_mask(
    histories: Sequence[Iterable[int]], num_items: int, *, keep: Sequence[int] | None = None
) -> np.ndarray:
    """Boolean mask ``[U, num_items]`` that is True at each user's history items.

    Used by the ``full`` protocol: items the user already interacted with are removed from
    the ranking. ``keep[u]`` (the target index) is left unmasked even when it occurs in the
    history (repeat consumption).

    Args:
        histories: per-user item indices (0-based, ``< num_items``).
        num_items: catalogue size.
        keep: optional per-user item index that must stay unmasked.

    Returns:
        ``np.ndarray`` of bool, shape ``[len(histories), num_items]``.
    """
    mask = np.zeros((len(histories), num_items), dtype=bool)
    for user, items in enumerate(histories):
        idx = np.asarray(list(items), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= num_items):
            raise ValueError(f"histories[{user}]: item index out of range [0, {num_items})")
        mask[user, idx] = True
    if keep is not None:
        mask[np.arange(len(histories)), np.asarray(keep, dtype=np.int64)] = False
    return mask


def target_ranks(
    scores: object, target_index: object, *, mask: object | None = None
) -> np.ndarray:
    """1-based rank of each user's target among the scored items, ties pessimistic.

    ``rank_u = 1 + #{j ≠ t_u, not mask[u, j] : scores[u, j] ≥ scores[u, t_u]}``

    Example: ``scores = [[0.9, 0.1, 0.5]]``: target 0 → rank 1; target 2 → rank 2;
    ``[[0.5, 0.5]]`` with target 0 → rank 2 (a tie does not win).

    Items scored ``-inf`` rank below every finite target, so ``-inf`` also works as a mask;
    the ``mask`` argument (True = excluded, e.g. :func:`history_mask`) is exact even when the
    target itself scores ``-inf``. The target is never masked: ``mask[u, t_u]`` is ignored.

    Args:
        scores: ``[U, C]`` scores, higher is better (candidates or the full catalogue).
        target_index: ``[U]`` column of each user's target.
        mask: optional bool ``[U, C]``; True removes the item from the ranking.

    Returns:
        ``np.ndarray`` of int64, shape ``[U]``, values in ``[1, C]``.

    Raises:
        ValueError: on NaN scores, shape mismatch or an out-of-range target index.
    """
    matrix = _as_float_matrix(scores)
    targets = np.asarray(target_index, dtype=np.int64).reshape(-1)
    num_users, num_cols = matrix.shape
    if targets.shape[0] != num_users:
        raise ValueError(f"target_index: {targets.shape[0]} entries for {num_users} score rows")
    if targets.size and (targets.min() < 0 or targets.max() >= num_cols):
        raise ValueError(f"target_index: values must lie in [0, {num_cols}), got "
                         f"[{targets.min()}, {targets.max()}]")
    rows = np.arange(num_users)
    target_scores = matrix[rows, targets]
    beats = matrix >= target_scores[:, None]
    beats[rows, targets] = False
    if mask is not None:
        mask_array = np.asarray(mask, dtype=bool)
        if mask_array.shape != matrix.shape:
            raise ValueError(f"mask: shape {mask_array.shape} != scores shape {matrix.shape}")
        beats &= ~mask_array
    return 1 + beats.sum(axis=1).astype(np.int64)


def hit_rate(ranks: object, k: int) -> np.ndarray:
    """Per-user hit ratio ``HR@K = 1[rank ≤ K]`` (float64 array of 0/1)."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    return (_as_ranks(ranks) <= k).astype(np.float64)


def ndcg(ranks: object, k: int) -> np.ndarray:
    """Per-user ``NDCG@K = 1[rank ≤ K] / log2(rank + 1)`` (one relevant item, IDCG = 1)."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    rank_array = _as_ranks(ranks)
    return np.where(rank_array <= k, 1.0 / np.log2(rank_array + 1.0), 0.0)


def mrr(ranks: object) -> np.ndarray:
    """Per-user reciprocal rank ``1 / rank`` (its mean is the MRR)."""
    return 1.0 / _as_ranks(ranks)


def ranking_metrics(ranks: object, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """All ranking metrics as per-user arrays: ``HR@k`` and ``NDCG@k`` for each k, and ``MRR``.

    ``NDCG@1`` is left out: with one target it always equals ``HR@1``.

    Returns:
        Ordered dict ``{"HR@1": ..., "HR@5": ..., "NDCG@5": ..., "MRR": ...}`` of float64
        arrays ``[U]``.
    """
    result: dict[str, np.ndarray] = {}
    for k in ks:
        result[f"HR@{k}"] = hit_rate(ranks, k)
        if k > 1:
            result[f"NDCG@{k}"] = ndcg(ranks, k)
    result["MRR"] = mrr(ranks)
    return result


#: The cut-offs each ranking protocol reports (``docs/methods.md``, "Evaluation protocols"):
#: the evaluator, the classic baselines and RecPO's full-catalogue test read this one table.
PROTOCOL_KS: dict[str, tuple[int, ...]] = {"candidates": (1, 5, 10), "hit3": (1, 3),
                                           "full": (5, 10, 20)}
FULL_KS = PROTOCOL_KS["full"]


def full_ranking(scores: object, targets: Sequence[int], known: Sequence[Iterable[int]],
                 ks: Sequence[int] = FULL_KS) -> dict[str, np.ndarray]:
    """Per-user HR@k, NDCG@k and MRR of a full-catalogue ranking with known items removed.

    ``known[u]`` (the user's sequence before the target) is masked out of user ``u``'s
    ranking, the target kept even when it repeats an earlier item; ties are pessimistic.

    Args:
        scores: ``[U, N]`` scores over the whole catalogue.
        targets: The target index per user.
        known: Item indices to mask per user.
        ks: Cut-offs.
    """
    matrix = _as_float_matrix(scores)
    mask = history_mask(known, matrix.shape[1], keep=targets)
    return ranking_metrics(target_ranks(matrix, targets, mask=mask), ks)


def _binary_inputs(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    label_array = np.asarray(labels).reshape(-1)
    if score_array.shape != label_array.shape:
        raise ValueError(f"labels: {label_array.size} labels for {score_array.size} scores")
    if np.isnan(score_array).any():
        raise ValueError("scores: NaN in binary scores")
    if not np.isin(label_array, (0, 1)).all():
        raise ValueError("labels: must be 0 or 1")
    label_array = label_array.astype(bool)
    if label_array.all() or not label_array.any():
        raise ValueError("labels: ROC-AUC needs at least one positive and one negative")
    return score_array, label_array


def roc_auc(scores: object, labels: object, sample_weight: object | None = None) -> float:
    """ROC-AUC as the normalised Mann–Whitney statistic (hit1 protocol, over all examples).

    ``AUC = U_pos / (n_pos · n_neg)`` with ``U_pos = Σ_{i∈pos} R_i − n_pos(n_pos+1)/2``, where
    ``R`` are average ranks of all scores (ties get the mean rank, i.e. count ½). With integer
    ``sample_weight`` (bootstrap counts) it is the weighted pair count
    ``Σ_{i∈pos, j∈neg} w_i w_j (1[s_i > s_j] + ½·1[s_i = s_j]) / (W_pos W_neg)``.

    Args:
        scores: ``[N]`` scores (e.g. P(Yes)), not hard labels.
        labels: ``[N]`` 0/1 labels.
        sample_weight: optional non-negative ``[N]`` weights.

    Returns:
        The AUC in ``[0, 1]``.
    """
    score_array, label_array = _binary_inputs(scores, labels)
    if sample_weight is None:
        ranks = rankdata(score_array, method="average")
        n_pos = int(label_array.sum())
        n_neg = label_array.size - n_pos
        u_pos = ranks[label_array].sum() - n_pos * (n_pos + 1) / 2.0
        return float(u_pos / (n_pos * n_neg))
    weights = np.asarray(sample_weight, dtype=np.float64).reshape(1, -1)
    return float(weighted_auc_batch(score_array, label_array, weights)[0])


def weighted_auc_batch(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted ROC-AUC for many weight vectors at once (vectorised bootstrap helper).

    Scores are grouped into distinct values once; for each weight row the AUC is
    ``Σ_v Wpos(v) · (Wneg(< v) + ½ Wneg(= v)) / (Wpos · Wneg)``.

    Args:
        scores: ``[N]`` float scores.
        labels: ``[N]`` bool labels.
        weights: ``[R, N]`` non-negative weights (one row per resample).

    Returns:
        ``[R]`` AUCs (NaN for a row without positive or negative weight).
    """
    values, bucket = np.unique(scores, return_inverse=True)
    order = np.argsort(bucket, kind="stable")
    starts = np.searchsorted(bucket[order], np.arange(values.size))
    sorted_weights = np.asarray(weights, dtype=np.float64)[:, order]
    sorted_labels = np.asarray(labels, dtype=bool)[order]
    pos = np.add.reduceat(sorted_weights * sorted_labels, starts, axis=1)
    neg = np.add.reduceat(sorted_weights * ~sorted_labels, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    numerator = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    denominator = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def auc_contributions(scores: object, labels: object) -> np.ndarray:
    """Per-example placement values (DeLong et al., 1988) whose class means equal the AUC.

    For a positive ``i``: ``V_i = (#neg below s_i + ½ #neg tied) / n_neg``; for a negative
    ``j``: ``V_j = (#pos above s_j + ½ #pos tied) / n_pos``. ``mean(V[pos]) = mean(V[neg]) =
    AUC``. They are what an evaluator can store per example; an honest interval over users
    re-computes the AUC on resampled users (:func:`hanorec.stats.bootstrap_auc`).
    """
    score_array, label_array = _binary_inputs(scores, labels)
    pos_scores = np.sort(score_array[label_array])
    neg_scores = np.sort(score_array[~label_array])
    out = np.empty_like(score_array)
    below = np.searchsorted(neg_scores, score_array[label_array], side="left")
    tied = np.searchsorted(neg_scores, score_array[label_array], side="right") - below
    out[label_array] = (below + 0.5 * tied) / neg_scores.size
    above = pos_scores.size - np.searchsorted(pos_scores, score_array[~label_array], side="right")
    tied = (np.searchsorted(pos_scores, score_array[~label_array], side="right")
            - np.searchsorted(pos_scores, score_array[~label_array], side="left"))
    out[~label_array] = (above + 0.5 * tied) / pos_scores.size
    return out


# --------------------------------------------------------------------------- generated answers

_QUOTES = "\"'`“”‘’«»"
_SPACES = re.compile(r"\s+")


def normalize_title(text: str) -> str:
    """Normalise a title or answer for matching.

    Steps, in order: strip whitespace; casefold; collapse runs of whitespace to one space;
    repeatedly remove trailing periods and surrounding quote characters (``" ' ` “ ” ‘ ’ « »``)
    and strip again. ``'  "Toy Story (1995)."  '`` → ``'toy story (1995)'``.
    """
    text = _SPACES.sub(" ", text.strip().casefold())
    previous = None
    while previous != text:
        previous = text
        text = text.rstrip(".").strip().strip(_QUOTES).strip()
    return text


def _contains_title(answer: str, title: str) -> bool:
    """True when ``title`` occurs in ``answer`` not glued to a letter or digit on either side."""
    pattern = r"(?<![0-9a-z])" + re.escape(title) + r"(?![0-9a-z])"
    return re.search(pattern, answer) is not None


def match_answer(answer: str, candidate_titles: Sequence[str]) -> int | None:
    """Index of the single candidate a generated answer names, else ``None``.

    Matching rule (both sides through :func:`normalize_title`):

    1. **Exact**: if the normalised answer equals exactly one normalised candidate title, that
       candidate.
    2. **Contained**: otherwise collect the candidates whose normalised title occurs in the
       answer at word boundaries (no letter/digit directly before or after); drop a match whose
       title lies inside another matched title (``"alien (1979)"`` vs. a longer title that
       contains it); the answer is valid when exactly one candidate remains.

    Anything else (no title, two titles, duplicate candidate titles) is invalid.
    """
    norm_answer = normalize_title(answer)
    titles = [normalize_title(title) for title in candidate_titles]
    exact = [i for i, title in enumerate(titles) if title and title == norm_answer]
    if exact:
        return exact[0] if len(exact) == 1 else None
    found = [i for i, title in enumerate(titles) if title and _contains_title(norm_answer, title)]
    maximal = [i for i in found
               if not any(j != i and titles[i] != titles[j] and titles[i] in titles[j]
                          for j in found)]
    return maximal[0] if len(maximal) == 1 else None


def _check_lengths(answers: Sequence[str], candidates: Sequence[Sequence[str]]) -> None:
    if len(answers) != len(candidates):
        raise ValueError(f"candidates: {len(candidates)} candidate lists for {len(answers)} "
                         "answers")


def answer_validity(
    answers: Sequence[str], candidates: Sequence[Sequence[str]]
) -> np.ndarray:
    """Per-example 1.0 when the answer names exactly one candidate (:func:`match_answer`)."""
    _check_lengths(answers, candidates)
    return np.array([match_answer(a, c) is not None for a, c in zip(answers, candidates)],
                    dtype=np.float64)


def valid_ratio(answers: Sequence[str], candidates: Sequence[Sequence[str]]) -> float:
    """ValidRatio (S-DPO/LLaRA): share of answers that name exactly one candidate title."""
    validity = answer_validity(answers, candidates)
    return float(validity.mean()) if validity.size else float("nan")


def generated_hit1(
    answers: Sequence[str], candidates: Sequence[Sequence[str]], target_index: Sequence[int]
) -> np.ndarray:
    """Per-example generated HR@1: 1.0 when the answer names the target, over **all** examples.

    Invalid answers count as misses (the denominator is every example, not the valid ones).
    """
    _check_lengths(answers, candidates)
    if len(target_index) != len(answers):
        raise ValueError(f"target_index: {len(target_index)} entries for {len(answers)} answers")
    return np.array([match_answer(a, c) == int(t)
                     for a, c, t in zip(answers, candidates, target_index)], dtype=np.float64)


def mean_metrics(per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means of per-user metric arrays (the point estimates reported in tables)."""
    return {name: float(np.mean(values)) for name, values in per_user.items()}
