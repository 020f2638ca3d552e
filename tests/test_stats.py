"""Tests for hanorec.stats: bootstrap intervals, paired tests, run comparison."""

from __future__ import annotations

import numpy as np
import pytest

from hanorec.stats import (
    bootstrap_auc,
    bootstrap_ci,
    compare_runs,
    holm,
    paired_bootstrap,
    summarize,
    wilcoxon,
)


def test_bootstrap_ci_covers_mean_and_shrinks_with_n():
    """Bernoulli(0.3) users: the interval contains the sample mean; its width scales like
    1/sqrt(n), so 16x more users give roughly a 4x narrower interval (we check < 0.4x)."""
    rng = np.random.default_rng(0)
    small = (rng.random(100) < 0.3).astype(float)
    large = (rng.random(1600) < 0.3).astype(float)
    mean_s, low_s, high_s = bootstrap_ci(small)
    mean_l, low_l, high_l = bootstrap_ci(large)
    assert low_s <= mean_s <= high_s and low_l <= mean_l <= high_l
    assert mean_s == pytest.approx(small.mean())
    assert (high_l - low_l) < 0.4 * (high_s - low_s)


def test_bootstrap_ci_matches_normal_approximation():
    """For n = 2000 values with sd 1 the 95% interval half-width is about 1.96/sqrt(2000)
    = 0.0438 (within 15%)."""
    values = np.random.default_rng(3).normal(size=2000)
    mean, low, high = bootstrap_ci(values, n_resamples=2000)
    assert (high - low) / 2 == pytest.approx(1.96 * values.std() / np.sqrt(2000), rel=0.15)


def test_bootstrap_ci_is_deterministic_and_constant_values_give_point():
    values = np.random.default_rng(1).random(50)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(np.full(10, 0.25)) == pytest.approx((0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([0.1], confidence=1.5)


def test_paired_tests_identical_runs_give_p_one():
    """a == b: every bootstrap difference is 0 -> p = min(1, 2(B+1)/(B+1)) = 1; Wilcoxon
    differences all zero -> p = 1.0 by definition."""
    a = (np.random.default_rng(0).random(200) < 0.4).astype(float)
    diff, low, high, p = paired_bootstrap(a, a)
    assert (diff, low, high, p) == (0.0, 0.0, 0.0, 1.0)
    assert wilcoxon(a, a) == 1.0
    assert wilcoxon(a, a, zero_method="zsplit") == 1.0


def test_paired_tests_clearly_better_run_gives_small_p():
    """Run a hits 70% of 300 users, run b is a with 60 of its hits removed (diff 0.2): every
    bootstrap mean difference is > 0 -> p = 2/(B+1) ≈ 0.002; Wilcoxon also tiny."""
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.7).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:60]] = 0.0
    diff, low, high, p = paired_bootstrap(a, b)
    assert diff == pytest.approx(0.2)
    assert 0 < low < diff < high
    assert p == pytest.approx(2 / 1001)
    assert wilcoxon(a, b) < 1e-6
    assert wilcoxon(a, b, zero_method="zsplit") < 1e-6


def test_paired_bootstrap_no_difference_is_not_significant():
    """Two independent draws of the same distribution: p well above 0.05 for this seed."""
    rng = np.random.default_rng(5)
    a, b = rng.random(400), rng.random(400)
    assert paired_bootstrap(a, b)[3] > 0.05
    assert wilcoxon(a, b) > 0.05


def test_compare_runs_aligns_users_by_id():
    """Run B holds the same per-user values as A but lists users in reverse order.

    Aligned by id every per-user difference is 0: diff = 0, interval [0, 0], both p = 1.
    Paired by position instead, the differences would be [0.5, 0, -0.5] (p < 1, wide interval).
    MRR is present in A only and is skipped; HR@1 A = [1, 0, 0.5] -> mean 0.5.
    """
    a = {"HR@1": np.array([1.0, 0.0, 0.5]), "MRR": np.array([1.0, 0.5, 1.0])}
    b = {"HR@1": np.array([0.5, 0.0, 1.0])}
    rows = compare_runs(a, b, ["u0", "u1", "u2"], ["u2", "u1", "u0"])
    assert [row["metric"] for row in rows] == ["HR@1"]
    row = rows[0]
    assert row["n_users"] == 3
    assert row["mean_a"] == pytest.approx(0.5) and row["mean_b"] == pytest.approx(0.5)
    assert (row["diff"], row["diff_low"], row["diff_high"]) == (0.0, 0.0, 0.0)
    assert row["p_bootstrap"] == 1.0 and row["p_wilcoxon"] == 1.0
    misaligned = compare_runs(a, b, ["u0", "u1", "u2"], ["u0", "u1", "u2"])[0]
    assert misaligned["diff_low"] < 0 < misaligned["diff_high"]


def test_compare_runs_rejects_different_user_sets():
    a = {"HR@1": np.ones(3)}
    with pytest.raises(ValueError, match="1 users of run A are missing from run B"):
        compare_runs(a, {"HR@1": np.ones(3)}, ["u0", "u1", "u2"], ["u0", "u1", "u9"])
    with pytest.raises(ValueError, match="duplicate"):
        compare_runs(a, a, ["u0", "u0", "u1"], ["u0", "u0", "u1"])


def test_bootstrap_auc_interval_contains_auc():
    """Two examples per user (one positive, one negative) with separable-ish scores."""
    rng = np.random.default_rng(2)
    users = np.repeat([f"u{i}" for i in range(150)], 2)
    labels = np.tile([1, 0], 150)
    scores = rng.normal(size=300) + labels
    auc, low, high = bootstrap_auc(scores, labels, users, n_resamples=500)
    assert low < auc < high
    assert 0.6 < auc < 0.9


def test_summarize_shape():
    summary = summarize({"HR@1": [1.0, 0.0, 1.0, 1.0]})
    assert summary["HR@1"]["mean"] == pytest.approx(0.75)
    assert summary["HR@1"]["n"] == 4


def test_holm_by_hand():
    """p = [0.01, 0.04, 0.03, 0.5], m = 4. Sorted: 0.01, 0.03, 0.04, 0.5 with multipliers
    4, 3, 2, 1 → 0.04, 0.09, 0.08, 0.5; running maximum → 0.04, 0.09, 0.09, 0.5. Back in input
    order: [0.04, 0.09, 0.09, 0.5]."""
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5], atol=1e-12)


def test_holm_matches_the_sequential_procedure():
    """Against the procedure as Holm states it: walk the sorted p-values, reject H_(i) while
    p_(i) ≤ α / (m − i + 1), stop at the first failure. For every α on a grid, the hypotheses
    rejected that way are exactly those with adjusted p ≤ α. Also: caps at 1, ties kept."""
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.uniform(0, 0.05, 6), rng.uniform(0, 1, 10), [0.02, 0.02]])
    adjusted = np.array(holm(p))
    m = p.size
    for alpha in np.linspace(0.001, 0.5, 60):
        rejected = set()
        for i, index in enumerate(np.argsort(p, kind="stable")):
            if p[index] > alpha / (m - i):
                break
            rejected.add(int(index))
        assert rejected == set(np.flatnonzero(adjusted <= alpha).tolist())
    assert adjusted.max() <= 1.0 and np.all(adjusted >= p)
    assert adjusted[-1] == adjusted[-2]


def test_holm_rejects_bad_p_values():
    assert holm([]) == []
    with pytest.raises(ValueError, match=r"p_values\[1\]"):
        holm([0.1, float("nan")])
    with pytest.raises(ValueError, match=r"p_values\[0\]"):
        holm([1.5])
