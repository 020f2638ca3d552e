"""HaRS and NoDO options of the preference stage: the hardness embedding and temperature, the
relative logit noise of both read-outs, the checks, and what a run logs (λ once, β and the
realised noise per step)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from test_dpo import _metrics, _policy_and_batch
from test_forward import build, prompt_batch, responses
from test_item_tokens import encoder

from hanorec import dpo
from hanorec.collate import ChoiceBatch
from hanorec.config import FieldError, from_yaml_dict
from hanorec.forward import _LOGITS, _prepare_prompt, _prepare_responses, response_logps
from hanorec.item_tokens import attach_item_encoder
from hanorec.losses import IGNORE_INDEX, sequence_logps, spread
from hanorec.preference import DPOConfig
from hanorec.readout import answer_logps, head_logps, head_scores

# --------------------------------------------------------------------------- read-outs


@pytest.fixture(scope="module")
def head_model():
    model = build("llava")
    attach_item_encoder(model, encoder(model.config.text_config.hidden_size))
    return model


def test_head_relative_noise_is_sigma_times_each_rows_spread(head_model):
    """relative: ε_r = σ·s_r·n_r with s_r the population std of row r's head scores over its
    allowed items only (computed here with torch.std on those items), n the generator's plain
    draw over all scored columns; log π then follows from the noisy scores."""
    batch = {"input_ids": torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    choices, picks = [[0, 1, 2, 7], [3, 4, 5]], torch.tensor([[0, 7], [5, 3]])
    with torch.no_grad():
        scores, columns, allowed = head_scores(head_model, batch, choices)
        got = head_logps(head_model, batch, choices, picks, noise_std=0.3, noise_scale="relative",
                         generator=torch.Generator().manual_seed(5))
        absolute = head_logps(head_model, batch, choices, picks, noise_std=0.3,
                              generator=torch.Generator().manual_seed(5))
    draw = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5))
    where = {int(c): n for n, c in enumerate(columns)}
    for row, items in enumerate(choices):
        cols = [where[i] for i in items]
        s = scores[row, cols].std(correction=0)
        noisy = scores[row, cols] + 0.3 * s * draw[row, cols]
        logp = torch.log_softmax(noisy, dim=0)
        expected = torch.stack([logp[items.index(int(p))] for p in picks[row]])
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, absolute, atol=1e-4)  # s ≠ 1: the scale matters


def test_head_noise_log_holds_the_clean_log_probs(head_model):
    """noise_log: the clean log-probs of the same forward (what no noise gives) and the mean
    spread of the allowed scores; nothing is logged without noise."""
    batch = {"input_ids": torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    choices, picks = [[0, 1, 2], [3, 4, 5]], torch.tensor([[0, 1], [5, 3]])
    log: dict = {}
    with torch.no_grad():
        clean = head_logps(head_model, batch, choices, picks)
        noisy = head_logps(head_model, batch, choices, picks, noise_std=0.5,
                           noise_scale="relative", generator=torch.Generator().manual_seed(1),
                           noise_log=log)
        scores, columns, allowed = head_scores(head_model, batch, choices)
    torch.testing.assert_close(log["clean_logps"], clean)
    assert not torch.allclose(noisy, clean)
    spreads = [scores[r][allowed[r]].std(correction=0) for r in range(2)]
    assert log["score_spread"] == pytest.approx(float(sum(spreads) / 2), rel=1e-5)
    quiet: dict = {}
    with torch.no_grad():
        head_logps(head_model, batch, choices, picks, noise_log=quiet)
    assert quiet == {}


@pytest.fixture(scope="module")
def lm():
    return build("llava")


def _clean_logits(model, batch, resp):
    with torch.no_grad():
        return _LOGITS["duplicate"](model, _prepare_prompt(batch),
                                    _prepare_responses(resp, batch["input_ids"].shape[0]))


def test_logit_noise_absolute_is_the_draw_sequence_logps_makes(lm):
    """absolute (the default): the same numbers as sequence_logps(noise_std=σ) on the clean
    logits — the noise NoDO drew before the option existed — in every forward mode."""
    batch, resp = prompt_batch("llava", "left"), responses(3, 3)
    labels = resp.reshape(-1, resp.shape[2])
    expected = sequence_logps(_clean_logits(lm, batch, resp), labels, noise_std=0.4,
                              generator=torch.Generator().manual_seed(3)).view(3, 3)
    for mode in ("duplicate", "kv", "packed"):
        with torch.no_grad():
            got = response_logps(lm, batch, resp, mode=mode, noise_std=0.4,
                                 generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_logit_noise_relative_scales_each_position_by_its_vocabulary_spread(lm):
    """relative: at every scored position (row-major over (b, t)), ε = σ·s·n with s the
    population std of that position's logits over the vocabulary; padding positions draw
    nothing. noise_log holds the clean log-probs and the mean spread."""
    batch, resp = prompt_batch("llava", "right"), responses(3, 2)
    labels = resp.reshape(-1, resp.shape[2])
    logits = _clean_logits(lm, batch, resp)
    mask = labels != IGNORE_INDEX
    rows = logits[mask]
    draw = torch.randn(rows.shape, generator=torch.Generator().manual_seed(8))
    s = rows.std(-1, correction=0, keepdim=True)
    noisy = logits.clone()
    noisy[mask] = rows + 0.2 * s * draw
    expected = sequence_logps(noisy, labels).view(3, 2)
    log: dict = {}
    with torch.no_grad():
        got = response_logps(lm, batch, resp, mode="duplicate", noise_std=0.2,
                             noise_scale="relative", generator=torch.Generator().manual_seed(8),
                             noise_log=log)
        clean = response_logps(lm, batch, resp, mode="duplicate")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(log["clean_logps"], clean)
    assert log["score_spread"] == pytest.approx(float(s.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="std"):
        response_logps(lm, batch, resp, noise_std=-0.1)


# --------------------------------------------------------------------------- settings


def test_dpo_config_checks_the_new_fields():
    """τ must be a positive number; relative scaling has no scores to scale under LoRA noise;
    the defaults are the paper's (backbone embeddings, τ = 1, absolute noise)."""
    cfg = DPOConfig()
    assert (cfg.hardness_embedding, cfg.hardness_temperature, cfg.noise_scale) == (
        "backbone", 1.0, "absolute")
    with pytest.raises(FieldError, match="hardness_temperature"):
        DPOConfig(hardness_temperature=0.0)
    with pytest.raises(FieldError, match="noise_scale"):
        DPOConfig(noise="lora", noise_scale="relative")
    with pytest.raises(FieldError, match="noise_std"):
        DPOConfig(noise_std=-1.0)
    DPOConfig(noise="logits", noise_scale="relative", hardness_temperature=0.02)


def test_check_run_refuses_embeddings_the_recipe_lacks(tiny_recipe):
    """head needs prompt.answer: head, collab needs item tokens (only when HaRS is on)."""
    recipe = tiny_recipe("tiny-llava")
    run = from_yaml_dict(dpo.DPORun, yaml.safe_load(recipe.read_text()))
    for kind, message in (("head", "prompt.answer"), ("collab", "item_tokens")):
        bad = replace(run, dpo=replace(run.dpo, hardness="static", hardness_embedding=kind))
        with pytest.raises(ValueError, match=message):
            dpo.check_run(bad)
        dpo.check_run(replace(run, dpo=replace(run.dpo, hardness_embedding=kind)))  # HaRS off
    dpo.check_run(replace(run, dpo=replace(run.dpo, hardness="static")))  # backbone


# --------------------------------------------------------------------------- a run


def test_relative_noise_leaves_reference_and_evaluation_clean(tiny_recipe, tiny_sft):
    """With relative logit noise the training forward changes, reproducibly, and reports its
    realised size; the reference forward, a later clean forward and validation are untouched."""
    from accelerate import Accelerator

    from hanorec.models.lineage import load_policy_from_sft
    from hanorec.runtime import make_collator

    run, model, catalog, rows, prompts, resp = _policy_and_batch(
        tiny_recipe, tiny_sft, noise="logits", noise_scale="relative", noise_std=0.5, loss="sdpo")
    accelerator = Accelerator(cpu=True)
    reference = dpo.reference_context(model)
    lam = torch.ones(len(rows))
    quiet = replace(run, dpo=replace(run.dpo, noise="none"))

    def step(r, seed):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return dpo.preference_step(model, reference, prompts, resp, None, lam, r, accelerator, gen)

    clean, noisy, again = step(quiet, None), step(run, 0), step(run, 0)
    assert noisy.metrics["logps/chosen"] != pytest.approx(clean.metrics["logps/chosen"], abs=1e-6)
    assert noisy.metrics == again.metrics
    assert noisy.metrics["nodo/noise_std"] > 0 and noisy.metrics["nodo/score_spread"] > 0
    assert "nodo/noise_std" not in clean.metrics
    with torch.no_grad(), reference() as ref_model:  # the reference rewards' base is clean
        ref = answer_logps(ref_model, ChoiceBatch(prompts, resp))
    chosen_reward = 0.1 * (noisy.metrics["logps/chosen"] - float(ref[:, 0].mean()))
    assert noisy.metrics["rewards/chosen"] == pytest.approx(chosen_reward, abs=1e-5)
    assert step(quiet, None).metrics == clean.metrics
    processor = load_policy_from_sft(run.model, run.dpo.sft_checkpoint)[1]
    collators = {"candidates": make_collator(processor, catalog, "candidates", run.prompt)}
    assert dpo.validation(model, reference, collators, rows, None, lam, run, accelerator) == \
        dpo.validation(model, reference, collators, rows, None, lam, quiet, accelerator)


def test_run_logs_lambda_once_beta_spread_and_noise_per_step(tiny_recipe, tiny_sft):
    """A static-HaRS run with τ = 0.1 and relative noise: the first step's log line carries the
    λ spread over the training pairs (recomputed here from the cached embeddings), later lines
    do not; every step logs β's p10/median/p90 and the realised noise; summary.json has the λ
    spread with its embedding and τ."""
    from safetensors.torch import load_file

    from hanorec.hardness import pair_lambdas
    from hanorec.preference import training_pairs
    from hanorec.runtime import load_catalog

    recipe = tiny_recipe("tiny-llava", dpo={
        "sft_checkpoint": str(tiny_sft("tiny-llava")), "max_train_pairs": 8, "max_steps": 3,
        "per_device_batch_size": 4, "loss": "sdpo", "hardness": "static",
        "hardness_temperature": 0.1, "noise": "logits", "noise_scale": "relative"})
    dpo.main(["--config", str(recipe)])
    rows = _metrics(recipe)
    assert len(rows) == 3
    keys = [f"hars/lambda_{k}" for k in ("p10", "median", "p90", "max")]
    assert all(k in rows[0] for k in keys) and not any(k in r for r in rows[1:] for k in keys)
    for r in rows:
        assert r["hars/beta_p10"] <= r["hars/beta_median"] <= r["hars/beta_p90"] \
            <= r["hars/beta_max"]
        assert r["hars/beta_min"] <= r["hars/beta_p10"] and r["hars/beta_max"] > r["hars/beta_min"]
        assert r["nodo/noise_std"] > 0 and r["nodo/score_spread"] > 0
    run = from_yaml_dict(dpo.DPORun, yaml.safe_load(recipe.read_text()))
    out = Path(run.run_dir) / "dpo"
    (cached,) = out.glob("item-embeddings-*.safetensors")
    prepared = run.data.path(run.data.output_dir)
    train_rows, _, _ = training_pairs(run, prepared)
    lam = pair_lambdas(load_file(str(cached))["embeddings"], train_rows,
                       load_catalog(run.data, prepared), top_k=run.dpo.top_k, pairwise=False,
                       temperature=0.1)
    expected = spread(lam)
    assert {k: rows[0][f"hars/lambda_{k}"] for k in expected} == pytest.approx(expected)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hars_lambda"] == pytest.approx(
        {"embedding": "backbone", "temperature": 0.1, **expected})
