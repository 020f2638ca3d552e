"""The collaborative modality through the pipeline: recommender features, SFT → DPO → evaluation.

Planted-signal data (conftest ``planted_recipe``): titles carry nothing, users walk the catalogue
in order, so what the model learns it learns from the collaborative tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PLANTED_USERS
from safetensors.torch import load_file

from hanorec import config, dpo, evaluate, sft
from hanorec.collab import CollabConfig, collab_features
from hanorec.data.known import known_sequences
from hanorec.data.prompts import VIEW_FIELD
from hanorec.item_tokens import SPEC_FILE, WEIGHTS_FILE
from hanorec.runtime import load_catalog, load_rows
from hanorec.training import read_metrics


def _prepared(recipe: Path) -> tuple[Path, object]:
    run = config.parse(sft.SFTRun, ["--config", str(recipe)], prog="t", description="")
    from accelerate import Accelerator

    from hanorec.runtime import prepare_data

    prepared = prepare_data(run.data, Accelerator(cpu=True))
    return prepared, run


def test_tail_recommender_never_trains_on_validation_or_test_targets(planted_recipe):
    """collab_fit: tail — the recommender trains on each training sequence minus its last T = 2
    items (the validation and test targets are not in the training sequence at all); exactly T
    training rows per user are kept; a second call reuses the cache instead of training."""
    prepared, run = _prepared(planted_recipe(collab={"collab_fit": "tail", "collab_holdout": 2}))
    catalog = load_catalog(run.data, prepared)
    cfg = run.collab
    features = collab_features(prepared, len(catalog), cfg, log=None)
    sequences, _ = known_sequences(prepared, "validation")
    assert features.meta["view_meta"][0]["train_items"] == sum(
        len(s) - 2 for s in sequences.values())
    test_rows = load_rows(prepared, ["candidates"], "test")
    valid_rows = load_rows(prepared, ["candidates"], "validation")
    for row in valid_rows + test_rows:  # no target of these splits is in a training sequence's tail
        seq = sequences[str(row["user_id"])]
        assert (
            catalog.index[row["target"]] not in seq[len(seq) - 2 :]
            or seq.count(catalog.index[row["target"]]) > 1
        )
    train = load_rows(prepared, ["candidates"], "train")
    marked = features.training_rows(train, catalog.index)
    assert len(marked) == 2 * PLANTED_USERS
    for row in marked:
        seq = sequences[str(row["user_id"])]
        assert catalog.index[row["target"]] in seq[-2:] and VIEW_FIELD not in row
    folder = prepared / "collab" / features.meta["key"]
    stamp = (folder / "sasrec-0.safetensors").stat().st_mtime_ns
    again = collab_features(prepared, len(catalog), cfg, log=None)
    assert (folder / "sasrec-0.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(again.item_embeddings, features.item_embeddings)
    other = collab_features(prepared, len(catalog),
                            CollabConfig(**{**cfg.__dict__, "collab_holdout": 1}), log=None)
    assert other.meta["key"] != features.meta["key"]
    assert other.meta["view_meta"][0]["train_items"] == (
        features.meta["view_meta"][0]["train_items"] + PLANTED_USERS)


def test_crossfit_features_never_come_from_a_model_that_saw_the_user(planted_recipe):
    """collab_fit: crossfit over K = 3 user folds — every training row is kept and tagged with
    the view of its user's fold; that view's recommender trained on the sequences of exactly the
    users outside the fold (so never on the row's target, nor on anything else of its user),
    which an independent SASRec trained on those sequences reproduces weight for weight; view 0
    trained on every user; the views' item tables differ."""
    from hanorec.baselines.sasrec import SASRec
    from hanorec.collab import _selection, _validation_targets, view_plans
    from hanorec.data.folds import user_fold

    prepared, run = _prepared(planted_recipe())
    catalog = load_catalog(run.data, prepared)
    cfg = run.collab
    features = collab_features(prepared, len(catalog), cfg, log=None)
    sequences, _ = known_sequences(prepared, "validation")
    assert features.views == cfg.collab_folds + 1 == 4
    plans = view_plans(sequences, _validation_targets(prepared), cfg)
    folds = {u: user_fold(u, 3, cfg.collab_fold_seed) for u in sequences}
    assert sorted(set(folds.values())) == [0, 1, 2]
    assert sorted(plans[0].users) == sorted(sequences)
    train = load_rows(prepared, ["candidates"], "train")
    rows = features.training_rows(train, catalog.index)
    assert len(rows) == len(train)
    for row in rows:
        view, user = row[VIEW_FIELD], str(row["user_id"])
        assert view == 1 + folds[user]
        assert user not in plans[view].users  # the fold model never saw this user ...
        target = catalog.index[row["target"]]
        trained_pairs = {(u, i) for u, s in zip(plans[view].users, plans[view].train) for i in s}
        assert (user, target) not in trained_pairs  # ... nor this row's target
    for view in range(features.views):
        plan = plans[view]
        independent = SASRec(cfg.sasrec()).fit(
            plan.train, len(catalog),
            validate=lambda m, p=plan: _selection(m, p.select_inputs, p.select_targets))
        expected = independent.model.state_dict()
        got = features.models[view].state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), view
    assert not torch.equal(features.item_embeddings[0], features.item_embeddings[1])


def test_rolling_features_never_saw_the_target_or_what_followed(planted_recipe):
    """collab_fit: rolling, K = 3 blocks of T = 2 — the rows whose target is among the last 6
    items of their user's training sequence are kept (no other row), each tagged with the block
    j = 1..3 its target lies in; model j trained on each sequence minus its last j·T items, so
    on the row's history up to its block but never on its target or any later item of its
    user; view 0 trained on everything."""
    from hanorec.collab import _validation_targets, target_positions, view_plans

    prepared, run = _prepared(planted_recipe(collab={"collab_fit": "rolling", "collab_folds": 3,
                                                     "collab_holdout": 2}))
    catalog = load_catalog(run.data, prepared)
    features = collab_features(prepared, len(catalog), run.collab, log=None)
    sequences, _ = known_sequences(prepared, "validation")
    plans = view_plans(sequences, _validation_targets(prepared), run.collab)
    assert [len(p.train) for p in plans] == [len(sequences)] * 4
    train = load_rows(prepared, ["candidates"], "train")
    rows = features.training_rows(train, catalog.index)
    assert len(rows) == sum(min(6, len(s) - 1) for s in sequences.values())  # first has no row
    for row, position in zip(rows, target_positions(rows, sequences, catalog.index)):
        user, view = str(row["user_id"]), row[VIEW_FIELD]
        sequence = sequences[user]
        assert len(sequence) - position in (2 * view - 1, 2 * view)  # the block of its target
        trained = plans[view].train[plans[view].users.index(user)]
        assert trained == sequence[: len(sequence) - 2 * view]
        assert position - 2 < len(trained) <= position  # the history before the block: trained;
        # the target and everything after it: never
    assert plans[0].train == list(sequences.values())


@pytest.mark.slow
def test_crossfit_in_worker_processes_equals_one_process(planted_recipe, tmp_path):
    """collab_workers 2 (spawned processes, one thread each) trains the same recommenders as
    training them one after the other in this process."""
    from hanorec.collab import _validation_targets, train_views, view_plans

    prepared, run = _prepared(planted_recipe())
    catalog = load_catalog(run.data, prepared)
    sequences, _ = known_sequences(prepared, "validation")
    cfg = CollabConfig(**{**run.collab.__dict__, "sasrec_epochs": 10, "sasrec_num_threads": 1})
    plans = view_plans(sequences, _validation_targets(prepared), cfg)[:3]
    alone = train_views(plans, len(catalog), cfg)
    pooled = train_views(plans, len(catalog),
                         CollabConfig(**{**cfg.__dict__, "collab_workers": 2}))
    for (a, meta_a), (b, meta_b) in zip(alone, pooled):
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert meta_a["epochs"] == meta_b["epochs"]


@pytest.mark.slow
def test_head_pipeline_sft_dpo_evaluate(planted_recipe):
    """SFT (head, item + user tokens) → S-DPO with HaRS dynamic and NoDO on the head scores →
    evaluation on all four protocols. The encoder travels with both stages' final folders and
    DPO leaves it unchanged (its adapter trains, the projectors stay as SFT left them); DPO
    moves the held-out validation pairs' reward margin above 0 (their S-DPO loss below its
    starting log 4; the training loss of 12 batches of 4 is too noisy to show it); the
    evaluation beats chance on every protocol."""
    recipe = planted_recipe(sft={"max_steps": 120},
                            dpo={"loss": "sdpo", "hardness": "dynamic", "noise": "logits",
                                 "max_steps": 12},
                            eval={"eval_protocols": ["candidates", "hit3", "hit1", "full"]})
    sft_final = sft.main(["--config", str(recipe)])
    dpo_final = dpo.main(["--config", str(recipe)])
    for folder in (sft_final, dpo_final):
        assert (folder / SPEC_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
    before, after = load_file(str(sft_final
                                  / WEIGHTS_FILE)), load_file(str(dpo_final / WEIGHTS_FILE))
    assert all(torch.equal(before[k], after[k]) for k in before)
    run_dir = Path(yaml.safe_load(recipe.read_text())["run_dir"])
    records = read_metrics(run_dir / "dpo" / "metrics.jsonl")
    final_eval = [r for r in records if "eval/loss" in r][-1]
    # policy = reference at step 0: every validation pair's S-DPO loss is log(1 + K) = log 4;
    # after training the held-out pairs' chosen items gained reward over their rejected ones
    assert final_eval["eval/margins"] > 0 and final_eval["eval/loss"] < np.log(4), final_eval
    lineage = json.loads((dpo_final / "hanorec.json").read_text())
    assert lineage["prompt"]["answer"] == "head" and lineage["parent"]
    out = evaluate.main(["--config", str(recipe)])
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["candidates/HR@1"]["mean"] > 0.6  # chance 1/6
    assert metrics["hit3/HR@1"]["mean"] > 0.6  # chance 1/4
    assert metrics["hit1/AUC"]["mean"] > 0.85
    assert metrics["full/HR@5"]["mean"] > 0.7  # 5 of ~20 unseen items: chance ~0.25
    assert metrics["candidates/HR@1"]["n"] == PLANTED_USERS


COLLAB_TINY = {"sasrec_epochs": 20, "sasrec_eval_every": 5, "sasrec_hidden_size": 16,
               "sasrec_max_len": 12, "collab_fit": "insample"}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["tiny-qwen2-vl", "tiny-idefics3"])
def test_item_tokens_train_on_every_family(tiny_recipe, backbone):
    """Qwen2-VL (M-RoPE) and Idefics3 with real posters and titles plus item and user tokens and
    the head: 12 steps on 4 rows (6 epochs), the last steps' loss below the first ones', and the
    encoder's projectors move."""
    recipe = tiny_recipe(backbone,
                         prompt={"answer": "head", "item_tokens": True, "user_token": True},
                         collab=COLLAB_TINY,
                         sft={"max_train_examples": 4, "max_steps": 12, "learning_rate": 1e-2,
                                                  "sft_protocols": ["candidates"]})
    final = sft.main(["--config", str(recipe)])
    run_dir = Path(yaml.safe_load(recipe.read_text())["run_dir"])
    losses = [r["train/loss"] for r in read_metrics(run_dir / "sft" / "metrics.jsonl")
              if "train/loss" in r]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses
    weights = load_file(str(final / WEIGHTS_FILE))
    assert weights["collab_proj.3.weight"].abs().sum() > 0


@pytest.fixture(scope="module")
def head_sft(planted_recipe):
    """A short head SFT on the planted data, trained once for this module."""
    recipe = planted_recipe(sft={"max_steps": 20})
    return recipe, sft.main(["--config", str(recipe)])


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "simpo", "sdpo"])
def test_every_preference_loss_takes_head_log_probs(head_sft, loss):
    """One preference step per loss on head log-probs (chosen + 3 rejected from the candidates):
    finite loss, gradients on the LoRA adapter only, the encoder frozen."""
    from accelerate import Accelerator

    from hanorec.models.lineage import load_policy_from_sft
    from hanorec.runtime import make_collator

    recipe, final = head_sft
    reference = "none" if loss == "simpo" else "frozen"  # SimPO is reference-free
    run = config.parse(dpo.DPORun,
                       ["--config", str(recipe), "--loss", loss, "--reference", reference],
                       prog="t", description="")
    model, processor = load_policy_from_sft(run.model, final)
    prepared = run.data.path(run.data.output_dir)
    catalog = load_catalog(run.data, prepared)
    rows = load_rows(prepared, ["candidates"], "train", pairs=True, limit=4, seed=0)
    batch = make_collator(processor, catalog, "candidates", run.prompt).encode_choices(rows)
    out = dpo.preference_step(model, dpo._reference_context(model), batch, None, None,
                              torch.ones(4, 3 if loss != "sdpo" else 1).squeeze(-1),
                              run, Accelerator(cpu=True), None)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n for n,
             p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)


@pytest.mark.slow
def test_recpo_and_index_answers_with_item_tokens(planted_recipe, tmp_path):
    """RecPO's own item head with item tokens in its prompts, from scratch (the encoder built for
    it), two steps; and SFT with index answers, whose evaluation scores every candidate from the
    label tokens and whose blind BPO answers (labels) map back to candidate items."""
    from hanorec import bpo, recpo

    rl = {"learning_rate": 1e-3, "per_device_batch_size": 4, "num_traces": 2, "max_trace_tokens": 3,
          "max_steps": 2,
          "item_batch_size": 16, "bootstrap_resamples": 50, "recpo_timing_users": 1,
          "title_max_tokens": 3,
          "recpo_eval_users": 8}
    recipe = planted_recipe(prompt={"answer": "title"}, recpo=rl)
    final = recpo.main(["--config", str(recipe)])
    assert (final / SPEC_FILE).is_file()
    index = planted_recipe(prompt={"answer": "index", "title_year": True}, sft={"max_steps": 4},
                           dpo={"max_train_pairs": 6},
                           eval={"eval_protocols": ["candidates"], "eval_max_users": 8})
    sft.main(["--config", str(index)])
    out = evaluate.main(["--config", str(index)])
    assert json.loads((out / "summary.json").read_text())["metrics"]["candidates/HR@1"]["n"] == 8
    blind = bpo.main(["generate", "--config", str(index), "--bpo-max-new-tokens", "1", "--bpo-out",
                      str(tmp_path / "b")])
    counts = json.loads((blind / "manifest.json").read_text())["counts"]
    assert counts["rows"] == 6 and counts["item"] + counts["chosen"] + counts["text"] == 6


def test_head_prior_trains_saves_and_evaluates(planted_recipe):
    """SFT with the head prior (rolling features, 3 blocks of 2): the prior's scale w trains
    away from its start of 1, travels in the exported encoder, and the evaluation (its
    recommender scores added from view 0) beats chance on the candidates."""
    recipe = planted_recipe(sft={"max_steps": 30},
                            collab={"collab_fit": "rolling", "collab_folds": 3,
                                    "collab_holdout": 2, "head_prior": True},
                            eval={"eval_protocols": ["candidates"]})
    final = sft.main(["--config", str(recipe)])
    weights = load_file(str(final / WEIGHTS_FILE))
    assert json.loads((final / SPEC_FILE).read_text())["prior"] is True
    assert float(weights["prior_scale"]) != 1.0
    out = evaluate.main(["--config", str(recipe)])
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["candidates/HR@1"]["mean"] > 0.4  # chance 1/6
