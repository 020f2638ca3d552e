"""Model-drawn negatives (hanorec/negatives.py): the pool draw and the allowed items."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.fixture(scope="module")
def planted_sft(planted_recipe):
    """A short head SFT on the planted data, trained once for this module."""
    from hanorec import sft

    recipe = planted_recipe(sft={"max_steps": 20})
    return recipe, sft.main(["--config", str(recipe)])


def _policy_and_rows(recipe, final, limit=12):
    from hanorec import config, dpo
    from hanorec.data.known import known_sequences
    from hanorec.models.lineage import load_policy_from_sft
    from hanorec.preference import training_views
    from hanorec.runtime import load_catalog, load_rows, make_collator

    run = config.parse(dpo.DPORun, ["--config", str(recipe)], prog="t", description="")
    model, processor = load_policy_from_sft(run.model, final)
    prepared = run.data.path(run.data.output_dir)
    catalog = load_catalog(run.data, prepared)
    rows = load_rows(prepared, ["candidates"], "train", pairs=True, limit=limit, seed=0)
    rows = training_views(model, rows, prepared, catalog)
    collator = make_collator(processor, catalog, "candidates", run.prompt)
    known, _ = known_sequences(prepared, "validation")
    return model, collator, rows, known, catalog


@pytest.mark.parametrize("strategy", ["policy", "collab", "hard"])
def test_model_negatives_come_from_the_top_pool_and_never_the_user_s_items(planted_sft, strategy):
    """Each row's 3 rejected items are 3 distinct items of the model's top-5 allowed ones (by
    that strategy's own scores, recomputed here), never the target, an item of the history or
    of the user's known sequence; on the catalogue the rows lose their candidate lists; another
    round draws other items somewhere."""
    from hanorec.negatives import NegativeDraws, allowed_mask, row_scores

    recipe, final = planted_sft
    model, collator, rows, known, catalog = _policy_and_rows(recipe, final)
    draws = NegativeDraws(strategy, collator, known, k=3, pool=5, scope="catalogue", seed=0)
    first, second = draws.draw(model, rows, 0), draws.draw(model, rows, 1)
    scores = row_scores(strategy, model, collator, rows, None)
    allowed = allowed_mask(rows, None, known, catalog.index, len(catalog))
    for n, row in enumerate(first):
        picked = [catalog.index[i] for i in row["rejected"]]
        banned = {catalog.index[row["chosen"]], *(catalog.index[i] for i in row["history"]),
                  *known[str(row["user_id"])]}
        assert len(set(picked)) == 3 and not set(picked) & banned
        top = np.argsort(-np.where(allowed[n], scores[n], -np.inf), kind="stable")[:5]
        assert set(picked) <= set(top.tolist())
        assert "candidates" not in row
    assert any(a["rejected"] != b["rejected"] for a, b in zip(first, second))


def test_refresh_redraws_and_the_control_consumes_the_same_examples(planted_sft):
    """dpo with policy negatives redrawn every 2 steps logs a refresh at steps 3 (after 2) and
    5; continued SFT (loss sft) on the same settings runs the same steps on the same number of
    pairs and examples, and its loss is the SFT loss −log π(chosen) of the step."""
    import yaml

    from hanorec import dpo
    from hanorec.training import read_metrics

    recipe, final = planted_sft
    run_dir = Path(yaml.safe_load(recipe.read_text())["run_dir"])
    common = ["--config", str(recipe), "--sft-checkpoint", str(final), "--max-steps", "5",
              "--max-train-pairs", "12", "--per-device-batch-size", "4"]
    dpo.main([*common, "--run-dir", str(run_dir / "policy"), "--negative-sampling", "policy",
              "--negative-scope", "catalogue", "--negative-pool", "6", "--negative-refresh", "2"])
    dpo.main([*common, "--run-dir", str(run_dir / "control"), "--loss", "sft",
              "--reference", "none", "--hardness", "none"])
    logs = {name: [r for r in read_metrics(run_dir / name / "dpo" / "metrics.jsonl")
                   if "train/loss" in r] for name in ("policy", "control")}
    assert [r["step"] for r in logs["policy"] if r.get("negatives/refreshed")] == [3, 5]
    assert [r["train/examples"] for r in logs["policy"]] == [r["train/examples"]
                                                             for r in logs["control"]]
    summaries = {name: json.loads((run_dir / name / "dpo" / "summary.json").read_text())
                 for name in ("policy", "control")}
    assert summaries["policy"]["train_pairs"] == summaries["control"]["train_pairs"] == 12
    for record in logs["control"]:
        assert record["train/loss"] == pytest.approx(-record["logps/chosen"], rel=1e-5)
