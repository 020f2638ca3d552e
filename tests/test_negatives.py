"""Model-drawn negatives (hanorec/negatives.py): the pool draw and the allowed items."""

from __future__ import annotations

import numpy as np
import pytest

from hanorec.negatives import allowed_mask, draw_from_pool


def test_draw_from_pool_by_hand():
    """Scores [5, 1, 4, 3, 2] with column 0 not allowed: the allowed order is 2 (4), 3 (3),
    4 (2), 1 (1). pool = k = 2 gives exactly {2, 3}; pool = 3 draws 2 of {2, 3, 4}; a pool past
    the allowed columns draws among all four, never column 0."""
    scores = np.array([[5.0, 1.0, 4.0, 3.0, 2.0]])
    allowed = np.array([[False, True, True, True, True]])
    rng = np.random.default_rng(0)
    assert set(draw_from_pool(scores, allowed, 2, 2, rng)[0]) == {2, 3}
    seen = set()
    for _ in range(200):
        pick = draw_from_pool(scores, allowed, 2, 3, rng)[0]
        assert len(set(pick)) == 2 and set(pick) <= {2, 3, 4}
        seen |= set(pick)
    assert seen == {2, 3, 4}  # uniform over the pool: every member drawn at some point
    wide = set()
    for _ in range(200):
        wide |= set(draw_from_pool(scores, allowed, 3, 99, rng)[0])
    assert wide == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="smaller than"):
        draw_from_pool(scores, allowed, 3, 2, rng)
    with pytest.raises(ValueError, match="fewer than"):
        draw_from_pool(scores, np.array([[True, False, False, False, False]]), 2, 5, rng)


def test_draw_is_seeded():
    rng = np.random.default_rng(3)
    scores, allowed = rng.random((4, 30)), rng.random((4, 30)) > 0.2
    a = draw_from_pool(scores, allowed, 3, 10, np.random.default_rng(1))
    b = draw_from_pool(scores, allowed, 3, 10, np.random.default_rng(1))
    assert np.array_equal(a, b)


def test_allowed_mask_excludes_target_history_and_known_sequence():
    """A row (user u, history [a, b], chosen c) with u's known sequence [a, b, d]: on the
    catalogue a..f only e and f may be drawn; on candidates [c, e, d, f] only e and f."""
    index = {x: i for i, x in enumerate("abcdef")}
    rows = [{"user_id": "u", "history": ["a", "b"], "chosen": "c"}]
    known = {"u": [0, 1, 3]}
    catalogue = allowed_mask(rows, None, known, index, 6)
    assert catalogue.tolist() == [[False, False, False, False, True, True]]
    listed = allowed_mask(rows, np.array([[2, 4, 3, 5]]), known, index, 6)
    assert listed.tolist() == [[False, True, False, True]]
