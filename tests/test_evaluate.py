"""hanorec.evaluate end to end on a tiny SFT checkpoint, plus the scoring identities it relies
on."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from hanorec import evaluate, sft
from hanorec.models.lineage import load_trained
from hanorec.runtime import load_catalog, load_rows, make_collator
from hanorec.scoring import candidate_scores, naive_candidate_scores, quick_candidate_hr1

PROTOCOLS = ("hit1", "hit3", "candidates", "full")


@pytest.fixture(scope="module")
def evaluated(tiny_recipe) -> dict:
    """A 4-step SFT run on the tiny data, evaluated on every protocol with generation and blind."""
    recipe = tiny_recipe(
        "tiny-llava", sft={"max_steps": 4}, eval={"bootstrap_resamples": 200, "eval_batch_size": 4}
    )
    sft.main(["--config", str(recipe)])
    out = evaluate.main(
        ["--config", str(recipe), "--generate", "true", "--blind", "true", "--max-new-tokens", "6"]
    )
    return {"recipe": recipe, "out": Path(out), "raw": yaml.safe_load(recipe.read_text())}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(raw: dict) -> evaluate.EvalRun:
    from hanorec.config import from_yaml_dict

    return from_yaml_dict(evaluate.EvalRun, raw)


def test_every_protocol_writes_finite_per_user_summary_and_report(evaluated):
    out = evaluated["out"]
    assert out == Path(evaluated["raw"]["run_dir"]) / "eval" / "sft"  # default name: the stage
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"].endswith("sft/final")
    for protocol in PROTOCOLS:
        for key in (protocol, f"{protocol}-blind"):
            records = _records(out / "per_user" / f"{key}.jsonl")
            assert len(records) == summary["protocols"][key]["n_users"] > 0
            assert len({r["user_id"] for r in records}) == len(records)
            assert all(math.isfinite(v) for r in records for k, v in r.items() if k != "user_id")
        assert summary["blind_gap"][protocol], protocol
    metrics = summary["metrics"]
    for name in (
        "hit1/AUC",
        "hit3/HR@3",
        "hit3/NDCG@3",
        "candidates/HR@1",
        "candidates/NDCG@10",
        "candidates/MRR",
        "candidates/gen_valid",
        "candidates/gen_HR@1",
        "full/HR@20",
        "full/NDCG@5",
        "candidates-blind/HR@1",
    ):
        value = metrics[name]
        assert all(math.isfinite(value[k]) for k in ("mean", "low", "high")), name
        assert value["low"] <= value["mean"] + 1e-12 and value["mean"] <= value["high"] + 1e-12, (
            name
        )
    assert (out / "report.md").read_text().startswith("# Evaluation of")
    generated = _records(out / "generated" / "candidates.jsonl")
    assert (
        len(generated) == summary["protocols"]["candidates"]["n_users"] and "answer" in generated[0]
    )


def test_hit1_auc_is_mann_whitney_u_on_the_saved_scores(evaluated):
    """AUC = U_pos / (n_pos · n_neg), scipy's U of the positives' scores against the negatives'."""
    from scipy.stats import mannwhitneyu

    records = _records(evaluated["out"] / "per_user" / "hit1.jsonl")
    pos = [r["score"] for r in records if r["label"] == 1]
    neg = [r["score"] for r in records if r["label"] == 0]
    assert pos and neg
    expected = mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))
    summary = json.loads((evaluated["out"] / "summary.json").read_text())
    assert summary["metrics"]["hit1/AUC"]["mean"] == pytest.approx(expected, abs=1e-12)
    assert np.mean([r["AUC_placement"] for r in records]) == pytest.approx(expected, abs=1e-12)


def test_shared_prompt_scores_equal_one_forward_per_candidate(evaluated):
    """score_candidates (one prompt pass, 6 candidates branching) vs. prompt ⊕ title ⊕ eos run
    separately per candidate with summed log-probs: equal within 1e-4; quick_candidate_hr1 on
    the test rows equals the saved HR@1 mean."""
    run = _run(evaluated["raw"])
    prepared = run.data.path(run.data.output_dir)
    catalog = load_catalog(run.data, prepared)
    model, processor = load_trained(run.model, Path(run.run_dir) / "sft" / "final")
    collator = make_collator(processor, catalog, "candidates", run.prompt)
    rows = load_rows(prepared, ["candidates"], "test")
    shared = candidate_scores(model, collator, rows[:3], batch_size=3, mode="kv", progress=False)
    naive = naive_candidate_scores(model, collator, rows[:3])
    assert shared.shape == naive.shape == (3, len(rows[0]["candidates"]))
    np.testing.assert_allclose(shared, naive, atol=1e-4, rtol=0)
    summary = json.loads((evaluated["out"] / "summary.json").read_text())
    assert quick_candidate_hr1(model, collator, rows, 8) == pytest.approx(
        summary["metrics"]["candidates/HR@1"]["mean"]
    )


def test_full_ranking_masks_the_known_sequence():
    """Catalogue of 4 unit vectors; user state = item 0's. Item 0 (cosine 1) is in the user's
    sequence, the target item 2 has cosine 0.6, item 1 cosine 0.8 is not seen, item 3 cosine 0:
    with the mask rank(2) = 2 (only item 1 above), HR@5 = 1, NDCG@5 = 1/log2(3); user 2 has item 1
    masked
    too → rank 1."""
    items = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    users = np.array([[2.0, 0.0], [1.0, 0.0]])
    metrics = evaluate.full_ranking_metrics(users, items, [2, 2], [[0], [0, 1]])
    np.testing.assert_allclose(metrics["MRR"], [1 / 2, 1.0])
    np.testing.assert_allclose(metrics["NDCG@5"], [1 / np.log2(3), 1.0])
    unmasked = evaluate.full_ranking_metrics(users, items, [2, 2], [[], []])
    np.testing.assert_allclose(unmasked["MRR"], [1 / 3, 1 / 3])


def test_full_masks_the_whole_rebuilt_sequence_not_only_the_history(evaluated):
    """Each test user's masked sequence ends with the validation target and contains the
    (truncated, max_history = 5) row history as its tail; some users have a longer sequence."""
    run = _run(evaluated["raw"])
    prepared = run.data.path(run.data.output_dir)
    catalog = load_catalog(run.data, prepared)
    sequences, fallbacks = evaluate.known_sequences(prepared, "test")
    assert fallbacks == 0
    valid = {r["user_id"]: r["target"] for r in load_rows(prepared, ["full"], "validation")}
    for row in load_rows(prepared, ["full"], "test"):
        seq = [catalog.item_ids[i] for i in sequences[row["user_id"]]]
        assert seq[-1] == valid[row["user_id"]] and seq[-len(row["history"]):] == row["history"]
    assert max(len(s) for s in sequences.values()) > run.data.max_history


def test_compare_identical_runs_gives_p_one(evaluated, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(evaluated["out"], copy)
    rows = evaluate.main(
        [
            "compare",
            str(evaluated["out"]),
            str(copy),
            "--out",
            str(tmp_path),
            "--bootstrap-resamples",
            "100",
        ]
    )
    assert {r["protocol"] for r in rows} >= set(PROTOCOLS)
    assert all(r["diff"] == 0 and r["p_bootstrap"] == 1 and r["p_wilcoxon"] == 1 for r in rows)
    assert json.loads((tmp_path / "comparison.json").read_text())["rows"] == rows
    assert "| candidates | HR@1 |" in (tmp_path / "comparison.md").read_text()


def test_clear_errors(evaluated, tmp_path):
    recipe = str(evaluated["recipe"])
    with pytest.raises(ValueError, match="unknown protocol 'top5'"):
        evaluate.main(["--config", recipe, "--eval-protocols", "candidates,top5"])
    with pytest.raises(ValueError, match="checkpoint .*nowhere.* does not exist"):
        evaluate.main(["--config", recipe, "--checkpoint", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="does not exist"):
        evaluate.main(["--config", recipe, "--run-dir", str(tmp_path / "untrained")])
    (tmp_path / "prepared" / "hit1").mkdir(parents=True)
    with pytest.raises(ValueError, match="protocol 'full' is not prepared"):
        evaluate.check_protocols(["hit1", "full"], tmp_path / "prepared")
    with pytest.raises(ValueError, match="not an evaluation folder"):
        evaluate.compare_folders(evaluated["out"], tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_damaged_or_pickled_checkpoint_is_one_clear_error(evaluated, tmp_path, damage):
    """A copy of the trained adapter folder with its weights cut to half (a torn copy), or with
    its weights saved as a pickle (``adapter_model.bin``, which ``weights_only`` would refuse
    with a traceback): evaluate stops with a ValueError naming the file, before loading it."""
    import torch
    from safetensors.torch import load_file

    final = Path(evaluated["raw"]["run_dir"]) / "sft" / "final"
    broken = shutil.copytree(final, tmp_path / "final")
    weights = broken / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = r"adapter_model\.safetensors: damaged safetensors file"
    else:
        torch.save(load_file(str(weights)), broken / "adapter_model.bin")
        weights.unlink()
        expected = r"adapter_model\.bin: pickled weights are refused"
    with pytest.raises(ValueError, match=expected):
        evaluate.main(["--config", str(evaluated["recipe"]), "--checkpoint", str(broken)])


@pytest.mark.parametrize("backbone", ["tiny-llava", "tiny-qwen2-vl", "tiny-idefics3"])
def test_hidden_states_do_not_depend_on_batch_padding(backbone, tiny_model_config, tiny_catalog):
    """The user state of a row (last prompt token, final layer) is the same alone and in a
    left-padded batch with longer rows; so is an item state, in a batch mixing image items and
    text-only items (i10, i11). Greedy generation runs on the left-padded batch."""
    from hanorec.collate import PromptCollator
    from hanorec.models.loading import load_backbone
    from hanorec.scoring import generate_answers, item_states, user_states

    model, processor = load_backbone(
        tiny_model_config(backbone, use_lora=False), for_training=False
    )
    collator = PromptCollator(processor, tiny_catalog, "full", image_budget=2, max_length=1024)
    rows = [{"user_id": "a", "history": ["i1"], "target": "i2"},
            {"user_id": "b", "history": ["i3", "i4", "i10", "i5"], "target": "i6"}]
    together = user_states(model, collator, rows, batch_size=2, progress=False)
    alone = user_states(model, collator, rows[:1], batch_size=1, progress=False)
    np.testing.assert_allclose(together[0], alone[0], atol=1e-4)
    items = item_states(model, collator, ["i0", "i10", "i11", "i3"], batch_size=4, progress=False)
    single = item_states(model, collator, ["i10"], batch_size=1, progress=False)
    np.testing.assert_allclose(items[1], single[0], atol=1e-4)
    assert not np.allclose(items[0], items[3])  # different items, different states
    ranked = [
        {**row, "candidates": ["i7", row["target"], "i11"], "target_index": 1} for row in rows
    ]
    answers = generate_answers(
        model, collator, ranked, batch_size=2, max_new_tokens=3, progress=False
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_default_checkpoint_prefers_dpo_and_names_the_stage(tmp_path):
    for stage in ("sft", "dpo"):
        (tmp_path / stage / "final").mkdir(parents=True)
        (tmp_path / stage / "final" / "hanorec.json").write_text("{}")
    checkpoint = evaluate.resolve_checkpoint(tmp_path, None)
    assert checkpoint == tmp_path / "dpo" / "final" and evaluate.stage_name(checkpoint) == "dpo"
    shutil.rmtree(tmp_path / "dpo")
    assert evaluate.resolve_checkpoint(tmp_path, None) == tmp_path / "sft" / "final"
    assert evaluate.stage_name(tmp_path / "checkpoint-000050") == "checkpoint-000050"


def test_bf16_scoring_tracks_fp32_and_evaluates_every_protocol(evaluated, tmp_path):
    """``--eval-precision bf16`` autocasts the scoring forwards: candidate scores come back in the
    fp32 dtype
    but differ from the fp32 ones (the matmuls really ran in bf16) by at most bf16
    rounding — under 0.1 nats + 2% of |s| for these sums of ~6 token log-probs (bf16 keeps 8
    bits of mantissa, ~0.4% per matmul) — and a whole evaluation still writes every protocol."""
    from hanorec.scoring import scoring_precision

    run = _run(evaluated["raw"])
    prepared = run.data.path(run.data.output_dir)
    model, processor = load_trained(run.model, Path(run.run_dir) / "sft" / "final")
    collator = make_collator(processor, load_catalog(run.data, prepared), "candidates", run.prompt)
    rows = load_rows(prepared, ["candidates"], "test")[:3]
    fp32 = candidate_scores(model, collator, rows, batch_size=3, mode="kv", progress=False)
    with scoring_precision(model, "bf16"):
        bf16 = candidate_scores(model, collator, rows, batch_size=3, mode="kv", progress=False)
    assert bf16.dtype == fp32.dtype and not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(bf16, fp32, atol=0.1, rtol=0.02)
    with pytest.raises(ValueError, match="eval_precision"):
        scoring_precision(model, "fp8")

    raw = {**evaluated["raw"], "run_dir": str(tmp_path)}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = evaluate.main(
        [
            "--config",
            str(recipe),
            "--checkpoint",
            str(Path(run.run_dir) / "sft" / "final"),
            "--name",
            "bf16",
            "--eval-precision",
            "bf16",
        ]
    )
    metrics = json.loads((Path(out) / "summary.json").read_text())["metrics"]
    assert {k.split("/")[0] for k in metrics} == set(PROTOCOLS)
    assert all(math.isfinite(v["mean"]) for v in metrics.values())
