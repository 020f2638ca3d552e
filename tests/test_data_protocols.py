"""Protocols (candidates, hit3, hit1, full), negative sampling and preference pairs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hanorec.data.pairs import pair_columns, rejected_items
from hanorec.data.protocols import SamplingContext, build_rows, rows_to_arrow, stream
from hanorec.data.sampling import Exclusions, insert_targets, sample_excluding
from hanorec.data.sequences import build_sequences
from hanorec.data.splits import leave_one_out
from hanorec.data.tables import Catalogue, Interactions

NUM_ITEMS = 60


@pytest.fixture(scope="module")
def world():
    """40 users with 8-30 random distinct items each (of 60), random times with ties."""
    rng = np.random.default_rng(3)
    users, items, times = [], [], []
    for u in range(40):
        chosen = rng.choice(NUM_ITEMS, size=rng.integers(8, 31), replace=False)
        users += [f"u{u}"] * len(chosen)
        items += [f"i{i}" for i in chosen]
        times += rng.integers(0, 10, len(chosen)).tolist()
    inter = Interactions(pa.array(users), pa.array(items), np.array(times, float), None,
                         np.arange(1, len(users) + 1), "synthetic")
    ids = [f"i{k}" for k in range(NUM_ITEMS)]
    cat = Catalogue(ids, ids, [[] for _ in ids], [None] * NUM_ITEMS, list(range(NUM_ITEMS)), "c")
    seq = build_sequences(inter, cat, min_length=3)
    splits = leave_one_out(seq, min_history=1, max_history=5, train_targets_per_user=None)
    context = SamplingContext.from_sequences(seq, NUM_ITEMS)
    whole = [set(seq.items[seq.offsets[u]:seq.offsets[u + 1]].tolist())
             for u in range(seq.num_users)]
    return seq, splits, context, whole, pa.array(ids), pa.array(seq.user_ids)


def _rows(world, protocol, split="train", seed=0):
    seq, splits, context, *_ = world
    return build_rows(protocol, split, splits[split], seq, context, seed=seed,
                      num_candidates=20, hit3_candidates=5)


@pytest.mark.parametrize("protocol, size", [("candidates", 20), ("hit3", 5)])
def test_candidate_invariants(world, protocol: str, size: int) -> None:
    """Every list has `size` distinct items, the target exactly once at target_index, and no
    other item from the user's whole sequence (train, validation and test items)."""
    seq, splits, context, whole, item_ids, user_ids = world
    for split in ("train", "validation", "test"):
        rows = _rows(world, protocol, split)
        assert rows.candidates.shape == (len(splits[split]), size)
        for user, target, cands, slot in zip(rows.targets.user, rows.target_item,
                                             rows.candidates, rows.target_index):
            assert len(set(cands.tolist())) == size and cands[slot] == target
            assert (cands == target).sum() == 1
            assert not (set(cands.tolist()) - {target}) & whole[user]
    slots = _rows(world, protocol).target_index
    assert len(np.unique(slots)) == size  # the target lands in every slot somewhere


def test_sampling_is_seeded(world) -> None:
    """Same seed -> same candidates; another seed -> different ones."""
    a, b, c = (_rows(world, "candidates", seed=s).candidates for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_hit1_balance(world) -> None:
    """ceil(R/2) rows ask about the target (label 1); label-0 queries avoid the sequence."""
    *_, whole, _, _ = world
    rows = _rows(world, "hit1", "validation")
    count = len(rows)
    assert rows.label.sum() == (count + 1) // 2
    assert np.array_equal(rows.query == rows.target_item, rows.label == 1)
    for user, query, label in zip(rows.targets.user, rows.query, rows.label):
        assert label == 1 or query not in whole[user]


def test_arrow_schema(world) -> None:
    """Columns and types of docs/architecture.md; history is the target's most recent past."""
    seq, splits, context, whole, item_ids, user_ids = world
    table = rows_to_arrow(_rows(world, "candidates", "test"), seq, item_ids, user_ids)
    assert table.column_names == ["user_id", "history", "target", "candidates", "target_index"]
    assert table.schema.field("history").type == pa.list_(pa.string())
    first = table.slice(0, 1).to_pylist()[0]
    user_items = [f"i{i}" for i in seq.items[seq.offsets[0]:seq.offsets[1]]]
    assert first["history"] == user_items[-6:-1] and first["target"] == user_items[-1]
    hit1 = rows_to_arrow(_rows(world, "hit1", "test"), seq, item_ids, user_ids)
    assert hit1.column_names[-2:] == ["query", "label"]


def test_pairs_from_candidates(world) -> None:
    """random: K distinct candidates != target; popular: the K most popular of them."""
    seq, splits, context, whole, item_ids, user_ids = world
    rows = _rows(world, "candidates")
    popularity = np.arange(NUM_ITEMS)  # item k has popularity k
    for strategy in ("random", "popular"):
        rejected = rejected_items(rows, k=3, strategy=strategy, rng=stream(0, "candidates",
                                  "train", 1), context=context, popularity=popularity)
        for cands, target, rej in zip(rows.candidates, rows.target_item, rejected):
            negatives = sorted(set(cands.tolist()) - {target})
            assert len(set(rej.tolist())) == 3 and set(rej.tolist()) <= set(negatives)
            if strategy == "popular":
                assert sorted(rej.tolist()) == negatives[-3:]
    with pytest.raises(ValueError, match="exceeds"):
        rejected_items(_rows(world, "hit3"), k=5, strategy="random", rng=stream(0, "hit3",
                       "train"), context=context, popularity=popularity)


def test_hard_negatives_by_embedding(world) -> None:
    """Items on a circle (angle = item index): the hardest negatives are the nearest angles."""
    seq, splits, context, whole, item_ids, user_ids = world
    angle = np.arange(NUM_ITEMS) * 2 * np.pi / NUM_ITEMS
    embeddings = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    rows = _rows(world, "candidates", "validation")
    rejected = rejected_items(rows, k=2, strategy="hard", rng=stream(0, "candidates", "train"),
                              context=context, popularity=np.zeros(NUM_ITEMS),
                              item_embeddings=embeddings)
    def gap(i: int, target: int) -> int:
        return min((i - target) % NUM_ITEMS, (target - i) % NUM_ITEMS)

    for cands, target, rej in zip(rows.candidates, rows.target_item, rejected):
        best = sorted(gap(i, target) for i in cands if i != target)[:2]
        assert sorted(gap(i, target) for i in rej) == best
    full = _rows(world, "full", "validation")
    hard = rejected_items(full, k=2, strategy="hard", rng=stream(0, "full", "train"),
                          context=context, popularity=np.zeros(NUM_ITEMS),
                          item_embeddings=embeddings)
    for user, rej in zip(full.targets.user, hard):
        assert not set(rej.tolist()) & whole[user]
    with pytest.raises(ValueError, match="item_embeddings"):
        rejected_items(full, k=2, strategy="hard", rng=stream(0, "full", "train"),
                       context=context, popularity=np.zeros(NUM_ITEMS))


def test_full_and_hit1_pairs(world) -> None:
    """full: K rejected outside the sequence (random and popularity-weighted); hit1: the
    other answer."""
    seq, splits, context, whole, item_ids, user_ids = world
    rows = _rows(world, "full")
    for strategy in ("random", "popular"):
        columns = pair_columns(rows, item_ids, k=3, strategy=strategy, rng=stream(0, "full",
                               "train", 1), context=context, popularity=np.arange(NUM_ITEMS))
        assert columns["chosen"].to_pylist() == [f"i{i}" for i in rows.target_item]
        for user, rej in zip(rows.targets.user, columns["rejected"].to_pylist()):
            assert len(set(rej)) == 3 and not {int(r[1:]) for r in rej} & whole[user]
    hit1 = _rows(world, "hit1")
    columns = pair_columns(hit1, item_ids, k=3, strategy="random", rng=stream(0, "hit1",
                           "train"), context=context, popularity=np.zeros(NUM_ITEMS))
    for label, chosen, rejected in zip(hit1.label, columns["chosen"].to_pylist(),
                                       columns["rejected"].to_pylist()):
        assert (chosen, rejected) == (("Yes", ["No"]) if label else ("No", ["Yes"]))


def test_sampler_edge_cases() -> None:
    """Sparse exclusion lookup equals the dense one; too few allowed items raises;
    insert_targets keeps the negatives' order around the target."""
    keys = np.array([0 * 5 + 1, 0 * 5 + 2, 1 * 5 + 0])
    dense, sparse = Exclusions(keys, 2, 5), Exclusions(keys, 2, 5, dense_limit=0)
    users, items = np.array([[0], [1]]), np.arange(5)[None, :]
    assert np.array_equal(dense.contains(users, items), sparse.contains(users, items))
    rng = np.random.default_rng(0)
    drawn = sample_excluding(rng, np.array([0, 0, 1]), 3, 5, sparse,
                             allowed_per_user=np.array([3, 4]))
    assert set(drawn[0].tolist()) == {0, 3, 4} and not {0} & set(drawn[2].tolist())
    with pytest.raises(ValueError, match="cannot sample 4 negatives"):
        sample_excluding(rng, np.array([0]), 4, 5, dense, allowed_per_user=np.array([3, 4]))
    cands, slot = insert_targets(rng, np.array([9, 9]), np.array([[1, 2, 3], [4, 5, 6]]))
    for row, s, negs in zip(cands, slot, ([1, 2, 3], [4, 5, 6])):
        assert row[s] == 9 and np.delete(row, s).tolist() == negs
