"""Tests for the baselines: most-popular by hand, SASRec learning a sequential pattern, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hanorec.baselines import MostPopular, SASRec, SASRecConfig
from hanorec.baselines.__main__ import (
    SplitArrays,
    _test_inputs,
    per_user_metrics,
    score_split,
    selection_score,
    training_sequences,
)
from hanorec.baselines.__main__ import main as baselines_main
from hanorec.baselines.sasrec import _sample_negatives
from hanorec.metrics import hit_rate, target_ranks

NUM_ITEMS = 40


def _pattern_sequence(rng: np.random.Generator, length: int, noise: float = 0.1) -> list[int]:
    """Item i is followed by (i + 1) mod N, except with probability `noise` a random item."""
    sequence = [int(rng.integers(NUM_ITEMS))]
    for _ in range(length - 1):
        follow = rng.random() >= noise
        sequence.append((sequence[-1] + 1) % NUM_ITEMS if follow else int(rng.integers(NUM_ITEMS)))
    return sequence


def _candidates(rng, histories, targets, size):
    """Target + (size-1) negatives outside the user's sequence, shuffled; returns (cands, idx)."""
    candidates, target_index = [], []
    for history, target in zip(histories, targets):
        seen = set(history) | {target}
        negatives = [int(i) for i in rng.permutation(NUM_ITEMS) if i not in seen][: size - 1]
        row = [target] + negatives
        order = rng.permutation(size)
        candidates.append([row[i] for i in order])
        target_index.append(int(np.flatnonzero(order == 0)[0]))
    return np.array(candidates), np.array(target_index)


@pytest.fixture(scope="module")
def pattern_data():
    rng = np.random.default_rng(0)
    train = [_pattern_sequence(rng, 15) for _ in range(200)]
    held_out = [_pattern_sequence(rng, 10, noise=0.0) for _ in range(100)]
    histories, targets = [s[:-1] for s in held_out], [s[-1] for s in held_out]
    candidates, target_index = _candidates(rng, histories, targets, 10)
    return train, histories, targets, candidates, target_index


@pytest.fixture(scope="module")
def trained_sasrec(pattern_data):
    config = SASRecConfig(sasrec_hidden_size=32, sasrec_max_len=16, sasrec_epochs=8,
                          sasrec_batch_size=32, sasrec_dropout=0.1, sasrec_num_threads=1)
    return SASRec(config).fit(pattern_data[0], NUM_ITEMS)


def test_most_popular_counts_by_hand():
    """Sequences [[0, 1], [1, 2], [1]] over 4 items: counts [1, 3, 1, 0].

    Candidates [[2, 1, 3]] -> scores [1, 3, 0]; target 1 -> rank 1. Full catalogue for the
    history [1]: item 1 masked to -inf -> [1, -inf, 1, 0]; target 2 ties item 0 -> rank 2.
    """
    model = MostPopular().fit([[0, 1], [1, 2], [1]], 4)
    assert model.counts.tolist() == [1.0, 3.0, 1.0, 0.0]
    scores = model.score([[0]], [[2, 1, 3]])
    assert scores.tolist() == [[1.0, 3.0, 0.0]]
    assert target_ranks(scores, [1]).tolist() == [1]
    full = model.score([[1]])
    assert full.tolist() == [[1.0, -np.inf, 1.0, 0.0]]
    assert target_ranks(full, [2]).tolist() == [2]
    assert model.score([[1]], mask_history=False).tolist() == [[1.0, 3.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="out of range"):
        MostPopular().fit([[4]], 4)


def test_sasrec_learns_the_successor_pattern(pattern_data, trained_sasrec):
    """Held-out users follow i -> i+1 exactly; among 10 candidates only one is the successor.

    Random guessing gives HR@1 = 0.1 and popularity is near-uniform (~0.1 up to ties);
    a working SASRec ranks the successor first for most users (we require > 0.6).
    """
    _, histories, targets, candidates, target_index = pattern_data
    sasrec_hr1 = hit_rate(target_ranks(trained_sasrec.score(histories, candidates), target_index),
                          1).mean()
    popular = MostPopular().fit(pattern_data[0], NUM_ITEMS)
    pop_hr1 = hit_rate(target_ranks(popular.score(histories, candidates), target_index), 1).mean()
    assert sasrec_hr1 > 0.6
    assert pop_hr1 < 0.3
    assert trained_sasrec.history[-1]["train/loss"] < trained_sasrec.history[0]["train/loss"]


def test_sasrec_full_catalogue_scores(pattern_data, trained_sasrec):
    """Full scores have one column per item and agree with candidate scoring column-wise."""
    _, histories, _, candidates, _ = pattern_data
    full = trained_sasrec.score(histories[:5])
    assert full.shape == (5, NUM_ITEMS)
    np.testing.assert_allclose(trained_sasrec.score(histories[:5], candidates[:5]),
                               np.take_along_axis(full, candidates[:5], axis=1), rtol=1e-5,
                               atol=1e-5)


def test_sasrec_is_deterministic_and_leaves_global_rng_alone(pattern_data):
    """Same seed -> identical scores; the caller's torch RNG stream is not advanced."""
    config = SASRecConfig(sasrec_hidden_size=16, sasrec_max_len=8, sasrec_epochs=2,
                          sasrec_batch_size=64, sasrec_num_threads=1)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = SASRec(config).fit(pattern_data[0][:50], NUM_ITEMS).score(pattern_data[1][:5])
    assert torch.rand(1) == expected_next
    second = SASRec(config).fit(pattern_data[0][:50], NUM_ITEMS).score(pattern_data[1][:5])
    np.testing.assert_array_equal(first, second)


def test_sasrec_validation_selects_best_and_stops_early(pattern_data):
    """A validation score that only falls keeps the first checkpoint and stops after
    `patience` checks: eval every epoch, patience 2 -> 3 epochs trained."""
    calls = []

    def validate(model):
        calls.append(len(calls))
        return -float(len(calls))

    config = SASRecConfig(sasrec_hidden_size=16, sasrec_max_len=8, sasrec_epochs=10,
                          sasrec_eval_every=1, sasrec_patience=2, sasrec_num_threads=1)
    model = SASRec(config).fit(pattern_data[0][:40], NUM_ITEMS, validate=validate)
    assert len(model.history) == 3 and len(calls) == 3


def test_sasrec_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 items"):
        SASRec().fit([[1]], 5)
    with pytest.raises(ValueError, match="out of range"):
        SASRec().fit([[1, 7]], 5)
    with pytest.raises(ValueError, match="fit\\(\\) first"):
        SASRec().score([[1]])


def _write_prepared(root, rng):
    """A prepared-data directory in the docs/architecture.md schema (candidates protocol)."""
    from datasets import Dataset, DatasetDict

    item_ids = [f"m{i}" for i in range(NUM_ITEMS)]
    sequences = [_pattern_sequence(rng, 14, noise=0.05) for _ in range(60)]
    train_part = [s[:-2] for s in sequences]
    popularity = np.bincount([i for s in train_part for i in s], minlength=NUM_ITEMS)
    Dataset.from_dict({"item_id": item_ids, "title": [f"Movie {i}" for i in range(NUM_ITEMS)],
                       "genres": [["Drama"]] * NUM_ITEMS, "image": [None] * NUM_ITEMS,
                       "popularity": popularity.tolist()}).save_to_disk(str(root / "items"))
    splits = {}
    for name, cut in (("train", 3), ("validation", 2), ("test", 1)):
        histories = [s[: len(s) - cut] for s in sequences]
        targets = [s[len(s) - cut] for s in sequences]
        candidates, target_index = _candidates(rng, histories, targets, 10)
        splits[name] = Dataset.from_dict({
            "user_id": [f"u{u}" for u in range(len(sequences))],
            "history": [[item_ids[i] for i in h] for h in histories],
            "target": [item_ids[t] for t in targets],
            "candidates": [[item_ids[i] for i in row] for row in candidates],
            "target_index": target_index.tolist()})
    DatasetDict(splits).save_to_disk(str(root / "candidates"))


def test_cli_writes_per_user_metrics_summary_and_report(tmp_path):
    """End to end on a tiny prepared set: 60 users -> 60 JSONL lines per model, summaries
    with intervals that contain the mean, a comparison and report.md."""
    _write_prepared(tmp_path / "prepared", np.random.default_rng(1))
    out = tmp_path / "out"
    baselines_main(["--prepared-dir", str(tmp_path / "prepared"), "--protocol", "candidates",
                    "--out", str(out), "--n-resamples", "100", "--sasrec-epochs", "6",
                    "--sasrec-eval-every", "3", "--sasrec-hidden-size", "16",
                    "--sasrec-max-len", "16", "--sasrec-num-threads", "1"])
    for model in ("popularity", "sasrec"):
        lines = (out / model / "per_user.jsonl").read_text().splitlines()
        assert len(lines) == 60
        record = json.loads(lines[0])
        assert record["user_id"] == "u0" and set(record) >= {"HR@1", "NDCG@5", "MRR"}
        summary = json.loads((out / model / "summary.json").read_text())
        hr1 = summary["metrics"]["HR@1"]
        assert hr1["low"] <= hr1["mean"] <= hr1["high"] and summary["n_users"] == 60
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison[0]["run_a"] == "sasrec" and comparison[0]["n_users"] == 60
    assert "| HR@1 |" in (out / "report.md").read_text()


def test_cli_trains_once_and_scores_several_protocols(tmp_path):
    """``--protocol candidates full``: each model is trained once (SASRec selected on
    ``candidates``) and written to ``OUT/<protocol>/<model>``. Its ``candidates`` rows equal a
    ``--protocol candidates`` run's with the same seed (one training, not one per protocol: the
    two protocol summaries carry the same training time), and most-popular on ``full`` equals a
    ``--protocol full`` run's."""
    from datasets import load_from_disk

    root = tmp_path / "prepared"
    _write_prepared(root, np.random.default_rng(3))
    load_from_disk(str(root / "candidates")).save_to_disk(str(root / "full"))
    common = ["--prepared-dir", str(root), "--n-resamples", "50", "--sasrec-epochs", "4",
              "--sasrec-eval-every", "2", "--sasrec-hidden-size", "16", "--sasrec-max-len", "16",
              "--sasrec-num-threads", "1"]
    baselines_main([*common, "--protocol", "candidates", "full", "--out", str(tmp_path / "both")])
    baselines_main([*common, "--protocol", "candidates", "--out", str(tmp_path / "cand")])
    baselines_main([*common, "--protocol", "full", "--models", "popularity", "--out",
                    str(tmp_path / "full")])

    def lines(path):
        return path.read_text().splitlines()

    both = tmp_path / "both"
    assert lines(both / "candidates" / "sasrec" / "per_user.jsonl") == lines(
        tmp_path / "cand" / "sasrec" / "per_user.jsonl")
    assert lines(both / "full" / "popularity" / "per_user.jsonl") == lines(
        tmp_path / "full" / "popularity" / "per_user.jsonl")
    summaries = [json.loads((both / p / "sasrec" / "summary.json").read_text())
                 for p in ("candidates", "full")]
    assert summaries[0]["train_seconds"] == summaries[1]["train_seconds"]
    assert {s["selected_on"] for s in summaries} == {"candidates"}
    assert "NDCG@10" in summaries[1]["metrics"] and (both / "full" / "report.md").is_file()


def test_cli_reports_unknown_item_ids(tmp_path):
    from datasets import load_from_disk

    root = tmp_path / "prepared"
    _write_prepared(root, np.random.default_rng(2))
    splits = load_from_disk(str(root / "candidates"))
    broken = splits["test"].map(lambda row, i: {"target": "nope" if i == 3 else row["target"]},
                                with_indices=True)
    splits["test"] = broken
    splits.save_to_disk(str(tmp_path / "broken" / "candidates"))
    load_from_disk(str(root / "items")).save_to_disk(str(tmp_path / "broken" / "items"))
    with pytest.raises(ValueError, match=r"test\[3\]\.target: item id 'nope'"):
        baselines_main(["--prepared-dir", str(tmp_path / "broken"), "--out", str(tmp_path / "o"),
                        "--models", "popularity"])


def test_protocol_metrics_full_and_hit1():
    """full: counts [1, 3, 1, 0], history [1] masked (target 2 kept) -> item 0 ties the target
    -> rank 2: HR@5 = 1, NDCG@5 = 1/log2(3). hit1: query scores are the counts of the
    queried items: query 1 (label 1) -> 3, query 3 (label 0) -> 0, so AUC = 1."""
    model = MostPopular().fit([[0, 1], [1, 2], [1]], 4)
    full = SplitArrays(["u0"], [[1]], np.array([2]))
    metrics = per_user_metrics(score_split(model, full, "full"), full, "full")
    assert metrics["HR@5"].tolist() == [1.0]
    assert metrics["NDCG@5"][0] == pytest.approx(1 / np.log2(3))
    hit1 = SplitArrays(["u0", "u1"], [[0], [0]], np.array([1, 2]),
                       queries=np.array([1, 3]), labels=np.array([1, 0]))
    assert score_split(model, hit1, "hit1").tolist() == [3.0, 0.0]
    assert selection_score(model, hit1, "hit1") == 1.0


def test_negatives_avoid_the_users_items():
    """User 0 owns ids {1, 2, 3} of 5, user 1 owns {5}: every negative of user 0 is in {4, 5},
    user 1 never gets 5, and padded positions (positive 0) get negative 0."""
    positives = torch.tensor([[0, 2, 3], [5, 5, 5]]).repeat(50, 1)
    user_items = torch.tensor([[1, 2, 3], [0, 0, 5]]).repeat(50, 1)
    negatives = _sample_negatives(positives, user_items, 5, torch.Generator().manual_seed(0))
    assert (negatives[0::2, 0] == 0).all()
    assert set(negatives[0::2, 1:].flatten().tolist()) == {4, 5}
    assert 5 not in negatives[1::2].flatten().tolist()


def test_training_sequences_rebuilt_from_truncated_rows():
    """User a's sequence is 0 1 2 3 4 | 5 (validation) | 6 (test), rows keep 2 history items.

    Train rows (history -> target): [0] -> 1, [0, 1] -> 2, [1, 2] -> 3, [2, 3] -> 4; they chain
    to 0 1 2 3 4, whose tail is the validation history [3, 4]. Test input = 0 1 2 3 4 5.
    User b's rows do not chain ([7] -> 8 then [9] -> 3), so it falls back to its validation
    history [9, 3].
    """
    index = {str(i): i for i in range(10)}
    rows = [{"user_id": "a", "history": h, "target": t} for h, t in
            ((["0"], "1"), (["0", "1"], "2"), (["1", "2"], "3"), (["2", "3"], "4"))]
    rows += [{"user_id": "b", "history": ["7"], "target": "8"},
             {"user_id": "b", "history": ["9"], "target": "3"}]
    valid = SplitArrays(["a", "b"], [[3, 4], [9, 3]], np.array([5, 1]))
    sequences, fallbacks = training_sequences(rows, valid, index, "train")
    assert sequences == [[0, 1, 2, 3, 4], [9, 3]] and fallbacks == 1
    test = SplitArrays(["b", "a"], [[3, 1], [4, 5]], np.array([2, 6]))
    assert _test_inputs(sequences, valid, test) == [[9, 3, 1], [0, 1, 2, 3, 4, 5]]
