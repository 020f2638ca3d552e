"""Sequences (ordering, tie-break, dedup, filters) and the train/validation/test splits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hanorec.data.errors import DataFileError
from hanorec.data.sequences import build_sequences, natural_order
from hanorec.data.splits import history_ranges, leave_one_out, temporal, training_popularity
from hanorec.data.tables import Catalogue, Interactions


def _data(rows: list[tuple[str, str, float]], items: list[str]) -> tuple[Interactions, Catalogue]:
    users, its, times = zip(*rows)
    inter = Interactions(user=pa.array(users), item=pa.array(its),
                         timestamp=np.array(times, float), rating=None,
                         line=np.arange(2, len(rows) + 2), source="x.inter")
    cat = Catalogue(item_id=items, title=items, genres=[[] for _ in items],
                    image=[None] * len(items), line=list(range(len(items))), source="x.item")
    return inter, cat


def _items(seq, user: int) -> list[str]:
    ids = ["a", "b", "c", "d", "e", "f"]
    return [ids[i] for i in seq.items[seq.offsets[user]:seq.offsets[user + 1]]]


ITEMS = ["a", "b", "c", "d", "e", "f"]


def test_tie_break_rules() -> None:
    """User 1 rates c, b at t=5 (c listed first) then a at t=1: line rule gives a, c, b;
    the item-id rule gives a, b, c. Users are sorted numerically: '2' before '10'."""
    inter, cat = _data([("10", "c", 5), ("10", "b", 5), ("10", "a", 1), ("2", "d", 1),
                        ("2", "e", 2), ("2", "f", 3)], ITEMS)
    by_line = build_sequences(inter, cat, min_length=1)
    assert by_line.user_ids == ["2", "10"]
    assert _items(by_line, 1) == ["a", "c", "b"]
    by_id = build_sequences(inter, cat, min_length=1, tie_break="item_id")
    assert _items(by_id, 1) == ["a", "b", "c"]
    assert by_line.stats["users_tied_at_split"] == 1  # user 10: last two share t=5
    assert by_line.stats["interactions_in_ties"] == 2
    assert natural_order(["b", "a10", "a9"]).tolist() == [1, 2, 0]  # lexicographic: a10 < a9
    assert natural_order(["10", "9", "100"]).tolist() == [1, 0, 2]  # all digits: numeric


def test_duplicates_short_users_unknown_items() -> None:
    """(u, a, 1) twice keeps one; user v (2 rows) is shorter than 3 and is dropped, counted;
    an unknown item fails with its line unless drop_unknown_items."""
    rows = [("u", "a", 1), ("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("v", "a", 1),
            ("v", "b", 2)]
    inter, cat = _data(rows, ITEMS)
    seq = build_sequences(inter, cat, min_length=3)
    assert seq.user_ids == ["u"] and _items(seq, 0) == ["a", "b", "c"]
    assert seq.stats["duplicate_rows_dropped"] == 1
    assert seq.stats["short_users_dropped"] == 1 and seq.stats["short_user_rows_dropped"] == 2
    inter, cat = _data(rows + [("u", "zz", 4)], ITEMS)
    with pytest.raises(DataFileError, match=r"x\.inter, line 8.*'zz' is not in the catalogue"):
        build_sequences(inter, cat, min_length=3)
    seq = build_sequences(inter, cat, min_length=3, drop_unknown_items=True)
    assert seq.stats["unknown_item_rows_dropped"] == 1 and seq.num_users == 1


def test_k_core() -> None:
    """2-core: item f (1 row) goes, then user w (left with 1 row) goes; u, v stay."""
    rows = [("u", "a", 1), ("u", "b", 2), ("v", "a", 1), ("v", "b", 2), ("w", "a", 3),
            ("w", "f", 4)]
    inter, cat = _data(rows, ITEMS)
    seq = build_sequences(inter, cat, min_length=1, k_core=2)
    assert seq.user_ids == ["u", "v", "w"][:2]
    assert seq.stats["k_core_rows_dropped"] == 2


def test_leave_one_out_targets_and_history() -> None:
    """One user with 6 items a..f. min_history 2, max_history 3, train cap 2:
    test = f (history c, d, e), validation = e (history b, c, d), train targets are the
    last two of positions 2..3 -> c (history a, b) and d (history a, b, c)."""
    inter, cat = _data([("u", x, t) for t, x in enumerate(ITEMS)], ITEMS)
    seq = build_sequences(inter, cat, min_length=4)
    splits = leave_one_out(seq, min_history=2, max_history=3, train_targets_per_user=2)

    def rows(split):
        positions, offsets = history_ranges(splits[split])
        hist = [ITEMS[i] for i in seq.items[positions]]
        return [(ITEMS[seq.items[p]], hist[offsets[k]:offsets[k + 1]])
                for k, p in enumerate(splits[split].position)]

    assert rows("test") == [("f", ["c", "d", "e"])]
    assert rows("validation") == [("e", ["b", "c", "d"])]
    assert rows("train") == [("c", ["a", "b"]), ("d", ["a", "b", "c"])]
    uncapped = leave_one_out(seq, min_history=1, max_history=3, train_targets_per_user=None)
    assert len(uncapped["train"]) == 3  # positions 1, 2, 3
    assert training_popularity(seq, "leave-one-out", 6, [0.8, 0.9]).tolist() == [1, 1, 1, 1, 0, 0]


def test_temporal_split() -> None:
    """Times 0..9 for user u, quantiles 0.5/0.8 -> q1 = 4.5, q2 = 7.2: train targets t=1..4
    (min_history 1), validation = first t in [4.5, 7.2) = 5, test = first t >= 7.2 = 8."""
    items = [f"i{k}" for k in range(10)]
    inter, cat = _data([("u", x, t) for t, x in enumerate(items)], items)
    seq = build_sequences(inter, cat, min_length=2)
    splits = temporal(seq, quantiles=[0.5, 0.8], min_history=1, max_history=5,
                      train_targets_per_user=None)
    assert splits["train"].position.tolist() == [1, 2, 3, 4]
    assert splits["validation"].position.tolist() == [5]
    assert splits["test"].position.tolist() == [8]
    capped = temporal(seq, quantiles=[0.5, 0.8], min_history=1, max_history=5,
                      train_targets_per_user=2)
    assert capped["train"].position.tolist() == [3, 4]
    assert splits["test"].history_start.tolist() == [3]
