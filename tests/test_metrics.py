"""Tests for hanorec.metrics: hand-derived ranks, HR/NDCG/MRR, AUC, answer matching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from hanorec.metrics import (
    answer_validity,
    auc_contributions,
    generated_hit1,
    history_mask,
    hit_rate,
    match_answer,
    mrr,
    ndcg,
    normalize_title,
    ranking_metrics,
    roc_auc,
    target_ranks,
    valid_ratio,
    weighted_auc_batch,
)


def test_rank_and_metrics_small_matrix():
    """scores [[0.9, 0.1, 0.5]]: target 0 beats both -> rank 1, HR@1 = NDCG@1 = MRR = 1.

    Target 2 (0.5) is beaten by 0.9 only -> rank 2: HR@1 = 0, HR@5 = 1,
    NDCG@5 = 1/log2(3) = 0.6309, MRR = 1/2. Target 1 -> rank 3, NDCG@2 = 0.
    """
    scores = np.array([[0.9, 0.1, 0.5]] * 3)
    ranks = target_ranks(scores, [0, 2, 1])
    assert ranks.tolist() == [1, 2, 3]
    assert hit_rate(ranks, 1).tolist() == [1.0, 0.0, 0.0]
    assert hit_rate(ranks, 5).tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(ndcg(ranks, 5), [1.0, 1 / math.log2(3), 0.5])
    np.testing.assert_allclose(ndcg(ranks, 2), [1.0, 1 / math.log2(3), 0.0])
    np.testing.assert_allclose(mrr(ranks), [1.0, 0.5, 1 / 3])


def test_ties_are_pessimistic():
    """[[0.5, 0.5, 0.1]] target 0: the tied item counts as ahead -> rank 2 (a tie never wins).

    A constant row of 4 items puts any target last: rank 4.
    """
    assert target_ranks([[0.5, 0.5, 0.1]], [0]).tolist() == [2]
    assert target_ranks([[0.5, 0.5, 0.1]], [1]).tolist() == [2]
    assert target_ranks(np.zeros((1, 4)), [3]).tolist() == [4]


def test_nan_scores_raise_and_bad_targets_raise():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks([[0.1, float("nan")]], [0])
    with pytest.raises(ValueError, match="target_index"):
        target_ranks([[0.1, 0.2]], [2])
    with pytest.raises(ValueError, match="1 entries for 2"):
        target_ranks([[0.1, 0.2], [0.3, 0.4]], [0])


def test_torch_input_is_accepted():
    """A CPU torch tensor gives the same ranks as numpy: [[1, 3, 2]] target 2 -> rank 2."""
    assert target_ranks(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([2])).tolist() == [2]


def test_history_mask_removes_items_but_never_the_target():
    """Scores [0.9, 0.8, 0.7, 0.1], target 2, history {0, 2}.

    Unmasked: rank 3. Masking the history (item 0) leaves item 1 ahead: rank 2; the target is
    in the history (repeat) yet stays ranked. -inf scores do the same job as the mask.
    """
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    mask = history_mask([[0, 2]], 4, keep=[2])
    assert mask.tolist() == [[True, False, False, False]]
    assert target_ranks(scores, [2]).tolist() == [3]
    assert target_ranks(scores, [2], mask=mask).tolist() == [2]
    assert target_ranks([[-np.inf, 0.8, 0.7, 0.1]], [2]).tolist() == [2]
    # a target scored -inf still ranks exactly with an explicit mask: item 1, 3 ahead -> 3
    assert target_ranks([[-np.inf, 0.8, -np.inf, 0.1]], [2], mask=mask).tolist() == [3]
    with pytest.raises(ValueError, match="out of range"):
        history_mask([[5]], 4)


def test_ranking_metrics_keys():
    """ranks [1, 2, 11]: HR@10 = [1, 1, 0], NDCG@10 = [1, 1/log2(3), 0], MRR = [1, .5, 1/11];
    NDCG@1 is omitted (identical to HR@1 = [1, 0, 0])."""
    out = ranking_metrics(np.array([1, 2, 11]), ks=(1, 10))
    assert list(out) == ["HR@1", "HR@10", "NDCG@10", "MRR"]
    assert out["HR@1"].tolist() == [1.0, 0.0, 0.0]
    assert out["HR@10"].tolist() == [1.0, 1.0, 0.0]
    np.testing.assert_allclose(out["NDCG@10"], [1.0, 1 / math.log2(3), 0.0])
    np.testing.assert_allclose(out["MRR"], [1.0, 0.5, 1 / 11])
    np.testing.assert_array_equal(ndcg([1, 2, 11], 1), out["HR@1"])
    with pytest.raises(ValueError, match="1-based"):
        ranking_metrics(np.array([0]))


def test_roc_auc_hand_example_with_tie():
    """pos scores {0.8, 0.4}, neg {0.4, 0.1}: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4 -> ½, 0.4>0.1).

    AUC = (1 + 1 + 0.5 + 1) / 4 = 0.875.
    """
    assert roc_auc([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)


def test_roc_auc_equals_mann_whitney_u():
    """AUC = U / (n_pos · n_neg) with U from scipy.stats.mannwhitneyu (ties included)."""
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300), 1)  # rounding creates many ties
    labels = (rng.random(300) < 0.4).astype(int)
    scores = scores + 0.5 * labels
    pos, neg = scores[labels == 1], scores[labels == 0]
    expected = mannwhitneyu(pos, neg).statistic / (pos.size * neg.size)
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(scores, labels, sample_weight=np.ones(300)) == pytest.approx(expected)


def test_weighted_auc_equals_auc_on_duplicated_examples():
    """Weight 2 on an example is the same as listing it twice."""
    scores, labels = np.array([0.3, 0.7, 0.5, 0.2]), np.array([1, 1, 0, 0])
    weights = np.array([[2.0, 1.0, 1.0, 3.0]])
    duplicated = roc_auc([0.3, 0.3, 0.7, 0.5, 0.2, 0.2, 0.2], [1, 1, 1, 0, 0, 0, 0])
    assert weighted_auc_batch(scores, labels.astype(bool), weights)[0] == pytest.approx(duplicated)


def test_auc_contributions_average_to_auc():
    """Placement values of [0.8, 0.4, 0.4, 0.1] / [1, 1, 0, 0]: positives 1.0 and 0.75,
    negatives 0.75 (0.8 above, 0.4 tied) and 1.0; both class means are 0.875."""
    values = auc_contributions([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0])
    np.testing.assert_allclose(values, [1.0, 0.75, 0.75, 1.0])


def test_roc_auc_single_class_raises():
    with pytest.raises(ValueError, match="one positive and one negative"):
        roc_auc([0.1, 0.2], [1, 1])


def test_normalize_title():
    assert normalize_title('  "Toy Story (1995)."  ') == "toy story (1995)"
    assert normalize_title("“Heat”.") == "heat"
    assert normalize_title("Se7en   (1995)") == "se7en (1995)"


def test_match_answer_rules():
    """Exact match first; else exactly one title contained at word boundaries; nested titles
    keep the longer one; two different titles are invalid; 'Heat' inside 'Theater' is not a
    match."""
    candidates = ["Alien (1979)", "Aliens (1986)", "Heat (1995)", "Toy Story (1995)"]
    assert match_answer("aliens (1986).", candidates) == 1
    assert match_answer("I recommend 'Toy Story (1995)'", candidates) == 3
    assert match_answer("Alien (1979) or Heat (1995)", candidates) is None
    assert match_answer("The Theater (1995)", ["Heat (1995)"]) is None
    assert match_answer("Heat", ["Heat", "Heat 2"]) == 0
    assert match_answer("Heat 2 is great", ["Heat", "Heat 2"]) == 1
    assert match_answer("nothing", candidates) is None


def test_valid_ratio_and_generated_hit1():
    """Answers: exact target / another candidate / invalid -> ValidRatio 2/3, HR@1 [1, 0, 0]."""
    candidates = [["A (1)", "B (2)"]] * 3
    answers = ["A (1)", "B (2)", "C (3)"]
    assert answer_validity(answers, candidates).tolist() == [1.0, 1.0, 0.0]
    assert valid_ratio(answers, candidates) == pytest.approx(2 / 3)
    assert generated_hit1(answers, candidates, [0, 0, 0]).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="candidate lists"):
        valid_ratio(answers, candidates[:2])
