"""Uncertainty and significance for per-user metrics (numpy + scipy).

Every metric is reported with a 95% bootstrap interval over users, and two runs are compared
with a paired test (``docs/methods.md``, "Evaluation protocols"). The unit of resampling is the
**user** (one row per user and protocol):

* :func:`bootstrap_ci` — percentile bootstrap of the mean (Efron & Tibshirani, 1993, §13.3):
  draw ``n_resamples`` samples of ``n`` users with replacement; the interval is the
  ``(α/2, 1 − α/2)`` quantiles of the resampled means, ``α = 1 − confidence``.
* :func:`paired_bootstrap` — the same on the per-user differences ``d_u = a_u − b_u``.
* :func:`wilcoxon` — Wilcoxon signed-rank test on the per-user differences (scipy).
* :func:`bootstrap_auc` — cluster bootstrap for ROC-AUC (hit1): resample users, keep all of a
  resampled user's examples (with multiplicity), recompute the AUC.
* :func:`compare_runs` — aligns two runs by user id and tabulates all of the above.
* :func:`holm` — Holm's step-down adjustment of a family of p-values (Holm, 1979), for a table
  that tests many methods against one reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from hanorec.metrics import roc_auc, weighted_auc_batch

__all__ = [
    "bootstrap_auc",
    "bootstrap_ci",
    "compare_runs",
    "holm",
    "paired_bootstrap",
    "summarize",
    "wilcoxon",
]

_CHUNK_ELEMENTS = 4_000_000  # resample rows × users held in memory at once


def _as_vector(values: object, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name}: no values to bootstrap")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: non-finite per-user values")
    return array


def _check_confidence(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples: must be >= 1, got {n_resamples}")


def _resample_counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """``[rows, n]`` multiplicities of ``n`` draws with replacement from ``n`` users."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=rows).astype(np.float64)


def _bootstrap_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` bootstrap samples of ``values``, chunked to bound memory."""
    rng = np.random.default_rng(seed)
    n = values.size
    chunk = max(1, _CHUNK_ELEMENTS // n)
    means = []
    for start in range(0, n_resamples, chunk):
        counts = _resample_counts(rng, n, min(chunk, n_resamples - start))
        means.append(counts @ values / n)
    return np.concatenate(means)


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(samples, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_ci(
    per_user_values: object,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval over users.

    Args:
        per_user_values: ``[U]`` metric values, one per user.
        n_resamples: bootstrap samples ``B``.
        confidence: interval coverage, e.g. 0.95.
        seed: seed of the resampling generator (same seed → same interval).

    Returns:
        ``(mean, low, high)``; ``mean`` is the plain mean of the input.
    """
    _check_confidence(confidence, n_resamples)
    values = _as_vector(per_user_values, "per_user_values")
    low, high = _percentiles(_bootstrap_means(values, n_resamples, seed), confidence)
    return float(values.mean()), low, high


def paired_bootstrap(
    a: object,
    b: object,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """Paired bootstrap of the mean difference ``mean(a − b)`` over the same users.

    The p-value is two-sided and read off the bootstrap distribution of the mean difference
    ``d*`` (percentile-interval inversion: the smallest α whose interval excludes 0)::

        p = min(1, 2 · (min(#{d* ≤ 0}, #{d* ≥ 0}) + 1) / (B + 1))

    The ``+1`` keeps p > 0 with a finite ``B`` (smallest attainable p is ``2/(B+1)``).
    Identical runs give ``d* ≡ 0`` and ``p = 1``.

    Args:
        a: ``[U]`` per-user values of run A.
        b: ``[U]`` per-user values of run B, same user order.
        n_resamples: bootstrap samples ``B``.
        confidence: interval coverage.
        seed: resampling seed.

    Returns:
        ``(mean_diff, low, high, p_value)``.
    """
    _check_confidence(confidence, n_resamples)
    first = _as_vector(a, "a")
    second = _as_vector(b, "b")
    if first.shape != second.shape:
        raise ValueError(f"b: {second.size} values, a has {first.size} (paired by user)")
    diff = first - second
    boot = _bootstrap_means(diff, n_resamples, seed)
    low, high = _percentiles(boot, confidence)
    tail = min(int((boot <= 0).sum()), int((boot >= 0).sum()))
    p_value = min(1.0, 2.0 * (tail + 1) / (n_resamples + 1))
    return float(diff.mean()), low, high, p_value


def wilcoxon(a: object, b: object, *, zero_method: str = "wilcox") -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired per-user differences.

    ``zero_method`` is passed to :func:`scipy.stats.wilcoxon`: ``"wilcox"`` (default) drops
    users with ``a_u = b_u`` — for 0/1 metrics such as HR@1 the test then works on the users
    where the runs disagree, like McNemar's test; ``"zsplit"`` keeps them, splitting their
    ranks between the signs (more conservative). When every difference is zero the runs are
    indistinguishable and the p-value is 1.0 (scipy would return NaN or raise).
    """
    if zero_method not in ("wilcox", "zsplit", "pratt"):
        raise ValueError(f"zero_method: expected wilcox, zsplit or pratt, got {zero_method!r}")
    first = _as_vector(a, "a")
    second = _as_vector(b, "b")
    if first.shape != second.shape:
        raise ValueError(f"b: {second.size} values, a has {first.size} (paired by user)")
    diff = first - second
    if not np.any(diff != 0):
        return 1.0
    result = scipy_stats.wilcoxon(diff, zero_method=zero_method, alternative="two-sided")
    p_value = float(result.pvalue)
    return 1.0 if np.isnan(p_value) else p_value


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979, "A simple sequentially rejective multiple
    test procedure", Scand. J. Statist. 6:65–70), controlling the family-wise error rate.

    With the ``m`` p-values sorted ascending, ``p_(1) ≤ … ≤ p_(m)``, the adjusted value of the
    ``i``-th is ``max_{j ≤ i} min(1, (m − j + 1) · p_(j))``; it is returned in the input order.
    Rejecting every hypothesis whose adjusted p is ≤ α keeps the chance of any false rejection in
    the family ≤ α, whatever the dependence between the tests.

    Raises:
        ValueError: a p-value outside [0, 1] or NaN (naming its position).
    """
    values = np.asarray(list(p_values), dtype=np.float64)
    bad = np.flatnonzero(~((values >= 0) & (values <= 1)))
    if bad.size:
        raise ValueError(f"p_values[{bad[0]}]: expected a p-value in [0, 1], got {values[bad[0]]}")
    m = values.size
    order = np.argsort(values, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * values[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def bootstrap_auc(
    scores: object,
    labels: object,
    groups: Sequence[Any],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """ROC-AUC with a cluster-bootstrap interval over users (hit1 protocol).

    Each resample draws ``G`` users with replacement; a user drawn ``m`` times contributes all
    of its examples with weight ``m``; the AUC is recomputed on the weighted examples
    (:func:`hanorec.metrics.weighted_auc_batch`). Resamples that happen to hold one class only
    are dropped (rare unless there are very few users).

    Args:
        scores: ``[N]`` scores (P(Yes)).
        labels: ``[N]`` 0/1 labels.
        groups: ``[N]`` user id of each example.

    Returns:
        ``(auc, low, high)``; ``auc`` is the AUC over all examples.
    """
    _check_confidence(confidence, n_resamples)
    auc = roc_auc(scores, labels)
    score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    label_array = np.asarray(labels).reshape(-1).astype(bool)
    _, group_index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    if group_index.size != score_array.size:
        raise ValueError(f"groups: {group_index.size} entries for {score_array.size} scores")
    num_groups = int(group_index.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(score_array.size, num_groups))
    samples = []
    for start in range(0, n_resamples, chunk):
        counts = _resample_counts(rng, num_groups, min(chunk, n_resamples - start))
        samples.append(weighted_auc_batch(score_array, label_array, counts[:, group_index]))
    boot = np.concatenate(samples)
    boot = boot[np.isfinite(boot)]
    low, high = _percentiles(boot, confidence)
    return auc, low, high


def summarize(
    per_user: Mapping[str, object],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "low", "high", "n"}}`` for a dict of per-user arrays."""
    summary = {}
    for name, values in per_user.items():
        mean, low, high = bootstrap_ci(values, n_resamples=n_resamples,
                                       confidence=confidence, seed=seed)
        summary[name] = {"mean": mean, "low": low, "high": high,
                         "n": int(np.asarray(values).size)}
    return summary


def _align(
    user_ids_a: Sequence[Any], user_ids_b: Sequence[Any]
) -> np.ndarray:
    """Index into run B for each user of run A; error when the user sets differ."""
    ids_a = [str(u) for u in user_ids_a]
    ids_b = [str(u) for u in user_ids_b]
    for name, ids in (("user_ids_a", ids_a), ("user_ids_b", ids_b)):
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: {len(ids) - len(set(ids))} duplicate user ids")
    position_b = {user: i for i, user in enumerate(ids_b)}
    missing_in_b = [u for u in ids_a if u not in position_b]
    missing_in_a = len(set(ids_b) - set(ids_a))
    if missing_in_b or missing_in_a:
        raise ValueError(
            f"user_ids: the runs cover different users: {len(missing_in_b)} users of run A "
            f"are missing from run B (e.g. {missing_in_b[:3]}), {missing_in_a} users of run B "
            f"are missing from run A")
    return np.array([position_b[u] for u in ids_a], dtype=np.int64)


def compare_runs(
    per_user_a: Mapping[str, object],
    per_user_b: Mapping[str, object],
    user_ids_a: Sequence[Any],
    user_ids_b: Sequence[Any],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    zero_method: str = "wilcox",
) -> list[dict[str, Any]]:
    """Paired comparison of two runs, one row per metric present in both.

    Users are aligned by id (order may differ between the runs). Each row holds
    ``metric, n_users, mean_a, mean_b, diff, diff_low, diff_high, p_bootstrap, p_wilcoxon``
    with ``diff = mean(a − b)`` and its paired-bootstrap interval.

    Raises:
        ValueError: when the user sets differ, ids repeat, or no metric is shared.
    """
    index_b = _align(user_ids_a, user_ids_b)
    shared = [name for name in per_user_a if name in per_user_b]
    if not shared:
        raise ValueError(f"per_user_b: no metric in common with run A ({sorted(per_user_a)})")
    rows = []
    for name in shared:
        values_a = _as_vector(per_user_a[name], f"per_user_a[{name!r}]")
        values_b = _as_vector(per_user_b[name], f"per_user_b[{name!r}]")
        if values_a.size != index_b.size or values_b.size != index_b.size:
            raise ValueError(f"per_user_a[{name!r}]: length does not match the user ids")
        values_b = values_b[index_b]
        diff, low, high, p_boot = paired_bootstrap(
            values_a, values_b, n_resamples=n_resamples, confidence=confidence, seed=seed)
        rows.append({
            "metric": name,
            "n_users": int(values_a.size),
            "mean_a": float(values_a.mean()),
            "mean_b": float(values_b.mean()),
            "diff": diff,
            "diff_low": low,
            "diff_high": high,
            "p_bootstrap": p_boot,
            "p_wilcoxon": wilcoxon(values_a, values_b, zero_method=zero_method),
        })
    return rows
