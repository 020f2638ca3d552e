"""RecPO training of the R²ec head (hanorec.recpo): learning signal, warm-up quality, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from hanorec import config as recipe
from hanorec import recpo
from hanorec.r2ec import ItemTable, marker_ids
from hanorec.runtime import build_optimizer, load_catalog, load_rows, make_collator, prepare_data
from hanorec.training import read_metrics

RL = {
    "learning_rate": 1e-3,
    "item_negatives": "catalogue",
    "per_device_batch_size": 4,
    "warmup_ratio": 0.0,
    "num_traces": 4,
    "temperature": 1.0,
    "top_k_sampling": 50,
    "max_trace_tokens": 4,
    "item_tau": 0.02,
    "recpo_item_refresh_every": 1,
    "item_batch_size": 16,
    "bootstrap_resamples": 200,
    "recpo_timing_users": 2,
    "title_max_tokens": 4,
}


def _setup(tiny_recipe, **overrides):
    """Policy, head, optimizer and 8 fixed training rows from the tiny recipe (no training yet)."""
    path = tiny_recipe("tiny-llava", recpo={**RL, **overrides})
    run = recipe.parse(recpo.RecPORun, ["--config", str(path)], prog="t", description="")
    accelerator = Accelerator(cpu=True)
    prepared = prepare_data(run.data, accelerator)
    catalog = load_catalog(run.data, prepared)
    rows = load_rows(prepared, ["full"], "train", limit=8, seed=0)
    model, processor = recpo.load_policy(run)
    collator = make_collator(processor, catalog, "full", run.prompt)
    marker = marker_ids(collator.tokenizer)
    head = recpo.Head(
        collator,
        marker,
        ItemTable(catalog.item_ids, marker, 16),
        run.recpo.item_tau,
        run.recpo.max_trace_tokens,
    )
    optimizer, scheduler = build_optimizer(model, run.recpo, 100)
    return run, accelerator, model, head, optimizer, rows


def test_in_batch_item_logps_by_hand() -> None:
    """users u0 = (1, 0), u1 = (0, 1); in-batch target rows i0 = (1, 0), i1 = (1, 1); τ = 1.
    cos: u0·(i0, i1) = (1, 0.7071), u1·(i0, i1) = (0, 0.7071), so
    log p(u0→i0) = 1 − log(e + e^0.7071), log p(u1→i1) = 0.7071 − log(1 + e^0.7071).
    Both users with the same target item: the other column is masked → log p = 0.
    A bank row (0, 1) for a third item adds cos 0 for u0: 1 − log(e + e^0.7071 + 1)."""
    import math

    accelerator = Accelerator(cpu=True)
    users, items = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    got = recpo.in_batch_item_logps(users, items, torch.tensor([0, 1]), 1.0, accelerator)
    assert torch.allclose(
        got,
        torch.tensor([1 - math.log(math.e + math.exp(c)), c - math.log(1 + math.exp(c))]),
        atol=1e-5,
    )
    same = recpo.in_batch_item_logps(users, items, torch.tensor([0, 0]), 1.0, accelerator)
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)
    bank = torch.tensor(
        [[5.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    )  # rows 0, 1 are in the batch: not re-counted
    banked = recpo.in_batch_item_logps(users, items, torch.tensor([0, 1]), 1.0, accelerator, bank)
    assert math.isclose(float(banked[0]), 1 - math.log(math.e + math.exp(c) + 1), abs_tol=1e-5)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_recpo_steps_change_lora_and_item_scores_and_raise_reward(tiny_recipe) -> None:
    """Six RecPO steps (G = 4 sampled traces, fused reward, clipped token + item surrogates) on
    8 fixed users. Before/after on the same users with no trace (state at the marker after the
    prompt, item table refreshed): every LoRA matrix that received gradient moved, the item
    scores moved, and the mean fused reward (1−w)·NDCG@k + w·p(target) rose. The logged
    statistics are finite and the advantages are group-normalised (std ≈ 1 up to ties)."""
    torch.manual_seed(0)
    run, accelerator, model, head, optimizer, rows = _setup(tiny_recipe)
    head.table.refresh(model, head.collator, progress=False)
    before_reward = recpo.mean_reward(model, head, rows, run.recpo, reasoning=False, device="cpu")
    before_scores = head.table.scores(
        recpo.user_states(model, head, rows, reasoning=False, batch_size=4, device="cpu"), head.tau
    )
    before_lora = _lora(model)
    for step in range(6):
        head.table.refresh(model, head.collator, progress=False)
        loss, stats = recpo.recpo_loss(
            model, head, rows[4 * (step % 2) : 4 * (step % 2) + 4], run.recpo, accelerator
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        assert all(np.isfinite(v) for v in stats.values()), stats
    head.table.refresh(model, head.collator, progress=False)
    after_reward = recpo.mean_reward(model, head, rows, run.recpo, reasoning=False, device="cpu")
    after_scores = head.table.scores(
        recpo.user_states(model, head, rows, reasoning=False, batch_size=4, device="cpu"), head.tau
    )
    after_lora = _lora(model)
    moved = [n for n in before_lora if not torch.equal(before_lora[n], after_lora[n])]
    assert len(moved) > len(before_lora) // 2, (
        f"only {len(moved)} of {len(before_lora)} LoRA tensors changed"
    )
    assert (after_scores - before_scores).abs().max() > 1e-3
    print(f"mean fused reward {before_reward:.4f} -> {after_reward:.4f}")
    assert after_reward > before_reward + 0.05, (before_reward, after_reward)


def test_warmup_item_head_beats_popularity_on_full_protocol(tiny_recipe) -> None:
    """Item-head warm-up alone (in-batch InfoNCE, no reasoning) on the tiny data, whose users
    walk consecutive item ids, then the full-catalogue test ranking with history masked:
    NDCG@10 above most-popular's on the same users and masks (most-popular's scores are the
    training popularity, hanorec.baselines.MostPopular)."""
    from datasets import load_from_disk

    from hanorec.baselines import MostPopular
    from hanorec.data.known import known_items, known_sequences
    from hanorec.metrics import PROTOCOL_KS, full_ranking

    path = tiny_recipe(
        "tiny-llava",
        recpo={
            **RL,
            "recpo_warmup_steps": 25,
            "max_steps": 25,
            "max_train_examples": 0,
            "per_device_batch_size": 8,
            "recpo_eval_reasoning": False,
        },
    )
    final = recpo.main(["--config", str(path)])
    summary = json.loads((final.parent / "summary.json").read_text())
    run = recipe.parse(recpo.RecPORun, ["--config", str(path)], prog="t", description="")
    prepared = Path(run.data.output_dir)
    catalog = load_catalog(run.data, prepared)
    rows = load_rows(prepared, ["full"], "test")
    popularity = np.asarray(load_from_disk(str(prepared / "items"))["popularity"], dtype=float)
    scores = (
        MostPopular().fit_counts(popularity).score([[] for _ in rows], None, mask_history=False)
    )
    targets = [catalog.position(r["target"]) for r in rows]
    masked = known_items(rows, known_sequences(prepared, "test")[0], catalog.position)
    pop = full_ranking(np.asarray(scores, dtype=float), targets, masked, PROTOCOL_KS["full"])
    r2ec = summary["metrics"]["NDCG@10"]["mean"]
    print(f"warm-up NDCG@10 {r2ec:.4f} vs most-popular {float(pop['NDCG@10'].mean()):.4f}")
    assert r2ec > float(pop["NDCG@10"].mean()) + 0.05, (r2ec, float(pop["NDCG@10"].mean()))


def test_recpo_end_to_end_writes_metrics_summary_and_report(tiny_recipe) -> None:
    """Two warm-up + two RecPO steps via the entry point: metrics.jsonl carries the RecPO
    statistics (reward, advantage std, surrogate and item loss, trace length, H_V refresh time),
    summary.json the full-protocol metrics with intervals and both per-user timings, per-user
    JSONL one line per test user, report.md the table; the adapter loads back."""
    path = tiny_recipe(
        "tiny-llava",
        recpo={
            **RL,
            "recpo_warmup_steps": 2,
            "max_steps": 4,
            "max_train_examples": 16,
            "num_traces": 2,
            "save_every": 2,
            "recpo_eval_users": 6,
        },
    )
    final = recpo.main(["--config", str(path)])
    out = final.parent
    logged = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    rl = logged[2]
    for key in (
        "train/reward_mean",
        "train/advantage_std",
        "train/surrogate_loss",
        "train/item_loss",
        "train/trace_length",
        "train/hv_refresh_seconds",
    ):
        assert key in rl and np.isfinite(rl[key]), key
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) >= {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"}
    assert (
        summary["metrics"]["HR@20"]["low"]
        <= summary["metrics"]["HR@20"]["mean"]
        <= summary["metrics"]["HR@20"]["high"]
    )
    assert all(
        summary["timing"][k] > 0
        for k in (
            "head_seconds_per_user",
            "head_only_seconds_per_user",
            "title_generation_seconds_per_user",
        )
    )
    assert len((out / "per_user" / "full.jsonl").read_text().splitlines()) == 6
    assert "HR@10" in (out / "report.md").read_text()
    assert (out / "checkpoint-4").is_dir() and (final / "hanorec.json").is_file()


def test_bad_config_is_a_value_error(tiny_recipe) -> None:
    """num_traces = 0 is refused before anything loads, naming the field."""
    path = tiny_recipe("tiny-llava", recpo={"num_traces": 0})
    with pytest.raises(ValueError, match="num_traces"):
        recpo.main(["--config", str(path)])


def test_recpo_starts_from_an_sft_checkpoint(tiny_recipe, tiny_sft) -> None:
    """recpo_init_checkpoint = an SFT final folder: the SFT adapter is merged, a fresh LoRA
    trains, and the exported adapter names the SFT folder as its parent (load_trained chain)."""
    sft_final = tiny_sft("tiny-llava")
    path = tiny_recipe(
        "tiny-llava",
        recpo={
            **RL,
            "recpo_init_checkpoint": str(sft_final),
            "recpo_warmup_steps": 1,
            "max_steps": 1,
            "recpo_eval_users": 2,
            "recpo_eval_reasoning": False,
        },
    )
    final = recpo.main(["--config", str(path)])
    assert json.loads((final / "hanorec.json").read_text())["parent"] == str(sft_final)
