"""R²ec trained with RecPO: reason, then rank the whole catalogue with the model's own states.

    accelerate launch -m hanorec.recpo --config configs/r2ec-demo.yaml
    python -m hanorec.recpo --config configs/r2ec-demo.yaml

What it does, top to bottom (R²ec, arXiv 2505.16994): prepare the data, load the backbone with
a LoRA adapter (on top of an SFT model when ``recpo_init_checkpoint`` names one), and train the
dual-head model of :mod:`hanorec.r2ec` on the ``full`` protocol's training rows:

1. **Item-head warm-up** (first ``recpo_warmup_steps`` optimizer steps): InfoNCE over the
   in-batch targets, ``−log softmax_j(cos(h_u, H_V[t_j]) / τ)[u]``, with the user state at the
   ``<answer>`` marker placed directly after the prompt (no reasoning) and the in-batch item
   rows recomputed with gradient.
2. **RecPO** (the remaining steps, GRPO-style, no KL): per user, G reasoning traces sampled from
   the current policy (temperature, top-k; stopped at the marker); fused reward
   ``R = (1−w)·NDCG@k + w·softmax(s)[target]`` over the cached item table with the user's
   history masked; group advantages (Gaussian or leave-one-out); loss = clipped token surrogate
   over every trace + ``recpo_item_weight`` × a clipped item term (in-batch softmax over the
   target items' fresh ``H_V`` rows, gathered across processes) for each user's best trace only.
3. **Evaluation** on the test split, ``full`` protocol: the whole catalogue ranked by
   ``s(v) = cos(h_T, H_V[v]) / τ`` after a greedy trace, every item the user has seen masked
   → HR/NDCG@5/10/20 and MRR with 95% bootstrap intervals, ``per_user/full.jsonl``,
   ``summary.json`` (with the per-user time of head scoring vs. generating a title and
   matching it), ``report.md``.

Design choices:

* **No new parameters.** ``H_V`` is the model's own final hidden state, so the item head is
  trained only through the LoRA weights (and a trainable projector): LoRA on the backbone is
  the whole trainable state, checkpointed and exported like the SFT/DPO adapters.
* **Cached item table.** ``H_V`` for the full catalogue is recomputed every
  ``recpo_item_refresh_every`` steps without gradient (timed, logged as
  ``train/hv_refresh_seconds``); the rewards use the cache, while the item term's gradient
  flows through ``h_T`` and through the in-batch items' rows recomputed with gradient.
* **One forward per update.** The traces and the in-batch target items' prompts are stacked
  into one left-padded batch (:func:`hanorec.r2ec.joint_batch`), so DistributedDataParallel
  sees a single forward before each backward.
* **Negatives of the item softmax** (``item_negatives``): ``in_batch`` is the paper's in-batch
  softmax; ``catalogue`` adds every other row of the cached ``H_V`` (no gradient) — a memory
  bank that makes the small batches of a CPU demo informative (the tests and the demo use it).
* **Old log-probs from a no-grad forward** of the sampling policy before the update. With one
  update per batch the ratio starts at 1 (the clip is inactive), but the machinery is the
  PPO/DAPO one, so more inner epochs would only need a loop.
* **Plain-text marker.** ``<answer>`` is tokenised normally (no vocabulary change); generation
  stops on its ids and a trace that did not write it gets it appended.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch import Tensor

from hanorec import config as recipe
from hanorec.collab import CollabConfig
from hanorec.collate import PromptCollator
from hanorec.data.config import DataConfig
from hanorec.data.known import known_items, known_sequences
from hanorec.data.prompt_config import PromptConfig
from hanorec.item_features import attach_for_recipe
from hanorec.losses import ADVANTAGES, clipped_surrogate, group_advantages, recpo_rewards
from hanorec.metrics import PROTOCOL_KS, full_ranking, history_mask, match_answer
from hanorec.models.config import ModelConfig
from hanorec.models.lineage import export_model, load_policy_from_sft
from hanorec.models.loading import load_backbone
from hanorec.r2ec import (
    ItemTable,
    item_scores,
    joint_batch,
    last_states,
    marker_ids,
    sample_traces,
    sequence_batch,
    state_and_token_logps,
)
from hanorec.report import try_write_report
from hanorec.runtime import (
    load_catalog,
    load_rows,
    make_collator,
    prepare_data,
    prepare_training,
    start_stage,
    to_device,
    write_json,
)
from hanorec.stats import summarize
from hanorec.training import MicroStep, TrainConfig, train_loop

MASKED = -1e4  # score of masked (already seen) items in the rewards: below any cos/τ


@dataclass
class RecPOConfig(TrainConfig):
    """The ``recpo:`` section: optimisation (see TrainConfig) plus R²ec / RecPO settings."""

    recpo_protocol: str = field(default="full", metadata={
        "help": "Prepared protocol whose rows train and evaluate the item head (full-catalogue "
                "ranking, R²ec)."})
    recpo_init_checkpoint: str | None = field(default=None, metadata={
        "help": "SFT 'final' folder to start from (its adapter merged, a fresh LoRA added); "
                "none: the base backbone."})
    max_train_examples: int = field(default=0, metadata={
        "help": "Use a seeded subset of this many training rows (0: all)."})
    recpo_warmup_steps: int = field(default=0, metadata={
        "help": "First optimizer steps that train the item head alone with in-batch InfoNCE (no "
                "reasoning) before RL."})
    num_traces: int = field(default=4, metadata={
        "help": "Reasoning traces sampled per user, the group size G (R²ec: 4)."})
    temperature: float = field(default=1.5, metadata={
        "help": "Sampling temperature of the traces (R²ec: 1.5)."})
    top_k_sampling: int = field(default=200, metadata={
        "help": "Top-k of trace sampling (R²ec: 200; 0 disables)."})
    max_trace_tokens: int = field(default=16, metadata={
        "help": "Token budget of a reasoning trace before the <answer> marker is forced."})
    item_tau: float = field(default=0.02, metadata={
        "help": "Temperature τ of the item scores s(v) = cos(h_T, H_V[v]) / τ (R²ec: 0.02)."})
    reward_softmax_weight: float = field(default=0.05, metadata={
        "help": "w of the fused reward (1−w)·NDCG@k + w·softmax(s)[target] (R²ec: 0.05)."})
    reward_ndcg_k: int = field(default=1000, metadata={
        "help": "NDCG cut-off k of the reward (R²ec: 1000), capped at the catalogue size."})
    advantage: Literal[ADVANTAGES] = field(default="gaussian", metadata={  # type: ignore[valid-type]
        "help": "Group advantages: GRPO (R − mean)/(std + 1e-8) or RLOO leave-one-out."})
    clip_eps_low: float = field(default=0.2, metadata={
        "help": "Lower clip ε_low of the surrogates (DAPO: 0.2)."})
    clip_eps_high: float = field(default=0.28, metadata={
        "help": "Upper clip ε_high of the surrogates (DAPO: 0.28)."})
    item_negatives: Literal["in_batch", "catalogue"] = field(default="in_batch", metadata={
        "help": "Negatives of the item softmax (warm-up and RecPO item term): the in-batch "
                "targets' fresh rows (R²ec), or those plus every other catalogue row of the "
                "cached H_V (no gradient; a memory bank, sharper on small batches)."})
    recpo_item_weight: float = field(default=1.0, metadata={
        "help": "Weight of the clipped in-batch item term (best trace per user) next to the "
                "token surrogate."})
    recpo_item_refresh_every: int = field(default=10, metadata={
        "help": "Recompute the cached item table H_V every N optimizer steps."})
    item_batch_size: int = field(default=16, metadata={
        "help": "Item prompts per forward when computing H_V."})
    recpo_eval_users: int = field(default=0, metadata={
        "help": "Evaluate a seeded subset of this many test users (0: all)."})
    recpo_eval_reasoning: bool = field(default=True, metadata={
        "help": "At evaluation, write a greedy trace before the marker (false: marker directly "
                "after the prompt)."})
    recpo_timing_users: int = field(default=4, metadata={
        "help": "Users on which head scoring and title generation + matching are timed."})
    title_max_tokens: int = field(default=32, metadata={
        "help": "Token budget of a generated title in the timing comparison."})
    bootstrap_resamples: int = field(default=1000, metadata={
        "help": "Bootstrap resamples over users for the 95% intervals."})


@dataclass
class RecPORun:
    run_dir: str = field(default="runs/r2ec-demo", metadata={
        "help": "Run folder; this stage writes to <run_dir>/recpo."})
    seed: int = field(default=0, metadata={
        "help": "Seed of initialisation, data order and sampling."})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    collab: CollabConfig = field(default_factory=CollabConfig)
    recpo: RecPOConfig = field(default_factory=RecPOConfig)


@dataclass
class Head:
    """What the loop needs to score: collator, marker ids, item table ``H_V``, τ, trace budget.

    ``reserve`` (trace budget + marker length) is the room kept free when prompts are
    truncated, the same for sampling and for the scoring forward so both see one prompt.
    """

    collator: PromptCollator
    marker: list[int]
    table: ItemTable
    tau: float
    trace_budget: int = 16

    def position(self, item_id: str) -> int:
        return self.collator.catalog.position(item_id)

    @property
    def reserve(self) -> int:
        return self.trace_budget + len(self.marker)


# ------------------------------------------------------------------------------ losses


def in_batch_item_logps(users: Tensor, items: Tensor, item_index: Tensor, tau: float,
                        accelerator: Accelerator, bank: Tensor | None = None) -> Tensor:
    """``log softmax_j(cos(h_u, H_V[t_j]) / τ)[u]`` over the (gathered) in-batch target rows.

    Rows from other processes enter without gradient (``accelerator.gather``); this process's
    rows keep theirs. A column holding the same item as user u's target (another user with the
    same target) is masked for u, so a duplicate is never a negative. ``bank`` (the cached
    ``[N, H]`` item table, no gradient) adds every catalogue item not in the batch as a negative.
    """
    rank, count = accelerator.process_index, users.shape[0]
    all_items = accelerator.gather(items.detach().contiguous())
    all_index = accelerator.gather(item_index.contiguous())
    start = rank * count
    all_items = torch.cat([all_items[:start], items, all_items[start + count :]])
    columns = torch.arange(all_items.shape[0], device=users.device)
    own = columns[start : start + count]
    scores = item_scores(users, all_items, tau)
    duplicate = (all_index[None, :] == item_index[:, None]) & (columns[None, :] != own[:, None])
    scores = scores.masked_fill(duplicate, float("-inf"))
    if bank is not None:
        in_batch = torch.zeros(bank.shape[0], dtype=torch.bool, device=users.device)
        in_batch[all_index] = True
        extra = item_scores(users, bank.to(users.device), tau)
        scores = torch.cat([scores, extra.masked_fill(in_batch[None, :], float("-inf"))], dim=1)
    return torch.log_softmax(scores, dim=-1).gather(1, own[:, None]).squeeze(1)


def item_bank(head: Head, cfg: RecPOConfig) -> Tensor | None:
    """The cached item table as extra negatives when ``item_negatives`` is ``catalogue``."""
    return head.table.states if cfg.item_negatives == "catalogue" else None


def warmup_loss(model, head: Head, rows: list[dict], cfg: RecPOConfig,
                accelerator: Accelerator) -> tuple[Tensor, dict[str, float]]:
    """In-batch InfoNCE of the item head, user state at the marker right after the prompt."""
    device, count = accelerator.device, len(rows)
    targets = [r["target"] for r in rows]
    batch = joint_batch(head.collator, rows, [head.marker] * count, targets, head.marker,
                        reserve=head.reserve)
    states = last_states(model, to_device(batch, device))
    users, items = states[:count], states[count:]
    index = torch.tensor([head.position(t) for t in targets], device=device)
    bank = item_bank(head, cfg)
    loss = -in_batch_item_logps(users, items, index, head.tau, accelerator, bank).mean()
    return loss, {"train/item_loss": float(loss.detach())}


def history_penalty(rows: list[dict], head: Head, num_items: int, device: torch.device) -> Tensor:
    """``[B, N]`` additive mask: ``MASKED`` on each row's history items (the target kept)."""
    histories = [[head.position(i) for i in r["history"]] for r in rows]
    keep = [head.position(r["target"]) for r in rows]
    mask = torch.from_numpy(history_mask(histories, num_items, keep=keep)).to(device)
    return torch.where(mask, MASKED, 0.0)


def fused_rewards(scores: Tensor, index: Tensor, cfg: RecPOConfig) -> Tensor:
    """RecPO's reward of each scored state, ``(1−w)·NDCG@k + w·softmax(s)[target]`` (k capped
    at the catalogue size; :func:`hanorec.losses.recpo_rewards`)."""
    ndcg_k = min(cfg.reward_ndcg_k, scores.shape[-1])
    return recpo_rewards(scores, index, ndcg_k=ndcg_k, softmax_weight=cfg.reward_softmax_weight)


def policy_pass(model, batch: dict, num_traces: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward of a :func:`joint_batch`: the traces' user states, token log-probs and mask,
    and the target items' states (the rows after the first ``num_traces``)."""
    states, logps, mask = state_and_token_logps(model, batch)
    n = num_traces
    return states[:n], logps[:n], mask[:n], states[n:]


def recpo_loss(model, head: Head, rows: list[dict], cfg: RecPOConfig,
               accelerator: Accelerator) -> tuple[Tensor, dict[str, float]]:
    """RecPO on one micro-batch: sample, reward, advantages, clipped token + item surrogates.

    * traces ``o_{u,g}`` (g = 1..G) sampled from the current policy, closed by the marker;
    * reward ``R_{u,g} = (1−w)·NDCG@k(rank of t_u under s) + w·softmax(s)[t_u]`` with
      ``s = cos(h_T, H_V)/τ`` over the cached table, the row's history masked;
    * advantages ``A_{u,g}`` (group-normalised, :func:`hanorec.losses.group_advantages`);
    * ``L = L_tok + λ·L_item``: ``L_tok`` the token-mean clipped surrogate over every trace
      token, ``L_item = −mean_u min(ρ_u A_u*, clip(ρ_u, 1−ε_low, 1+ε_high) A_u*)`` for the best
      trace g* of each user, ``ρ_u = p_θ(t_u)/p_old(t_u)`` under the in-batch item softmax.
    """
    device, group, clip = accelerator.device, cfg.num_traces, (cfg.clip_eps_low, cfg.clip_eps_high)
    model.eval()
    traces = sample_traces(accelerator.unwrap_model(model), head.collator, rows, num_traces=group,
                           max_new_tokens=cfg.max_trace_tokens, marker=head.marker,
                           temperature=cfg.temperature, top_k=cfg.top_k_sampling)
    model.train()
    targets = [r["target"] for r in rows]
    batch = joint_batch(head.collator, rows, traces, targets, head.marker, reserve=head.reserve)
    batch = to_device(batch, device)
    index = torch.tensor([head.position(t) for t in targets], device=device)
    bank = item_bank(head, cfg)
    with torch.no_grad():  # the sampling policy: old log-probs and the rewards
        old_states, old_logps, mask, old_items = policy_pass(model, batch, len(traces))
        scores = head.table.scores(old_states, head.tau).view(len(rows), group, -1)
        scores = scores + history_penalty(rows, head, scores.shape[-1], device)[:, None]
        rewards = fused_rewards(scores, index, cfg)
        advantages = group_advantages(rewards, cfg.advantage)
        best = advantages.argmax(1) + torch.arange(len(rows), device=device) * group
        old_item = in_batch_item_logps(old_states[best], old_items, index, head.tau, accelerator,
                                       bank)
    states, logps, _, fresh_items = policy_pass(model, batch, len(traces))
    token_loss = clipped_surrogate(logps, old_logps, advantages.flatten(), mask, *clip)
    item_logp = in_batch_item_logps(states[best], fresh_items, index, head.tau, accelerator, bank)
    best_adv = advantages.flatten()[best]
    item_loss = clipped_surrogate(item_logp[:, None], old_item[:, None], best_adv,
                                  torch.ones_like(item_logp[:, None]), *clip)
    stats = {"train/reward_mean": float(rewards.mean()),
             "train/advantage_std": float(advantages.std()),
             "train/surrogate_loss": float(token_loss.detach()),
             "train/item_loss": float(item_loss.detach()),
             "train/trace_length": float(mask.sum(1).float().mean())}
    return token_loss + cfg.recpo_item_weight * item_loss, stats


# ------------------------------------------------------------------------------ scoring


@torch.no_grad()
def user_states(model, head: Head, rows: list[dict], *, reasoning: bool, batch_size: int,
                device) -> Tensor:
    """``[U, H]`` states at the marker: after a greedy trace (``reasoning``) or the bare prompt."""
    was_training = model.training
    model.eval()
    out = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        if reasoning:
            traces = sample_traces(model, head.collator, chunk, num_traces=1,
                                   max_new_tokens=head.trace_budget, marker=head.marker,
                                   do_sample=False)
        else:
            traces = [head.marker] * len(chunk)
        batch = sequence_batch(head.collator, chunk, traces, reserve=head.reserve)
        out.append(last_states(model, to_device(batch, device)))
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def mean_reward(model, head: Head, rows: list[dict], cfg: RecPOConfig, *, reasoning: bool,
                device) -> float:
    """Mean fused reward of one (greedy or trace-free) state per user on a fixed set of rows."""
    states = user_states(model, head, rows, reasoning=reasoning,
                         batch_size=cfg.per_device_batch_size, device=device)
    penalty = history_penalty(rows, head, head.table.states.shape[0], device)
    scores = head.table.scores(states, head.tau) + penalty
    index = torch.tensor([head.position(r["target"]) for r in rows], device=device)
    return float(fused_rewards(scores[:, None], index, cfg).mean())


def _seconds_per_user(rows: list[dict], score_one) -> float:
    start = time.perf_counter()
    for row in rows:
        score_one(row)
    return (time.perf_counter() - start) / len(rows)


def time_per_user(model, head: Head, rows: list[dict], cfg: RecPOConfig,
                  device) -> dict[str, float]:
    """Seconds per user, one user at a time, on the first ``recpo_timing_users`` rows.

    * ``head_seconds_per_user``: the R²ec inference as evaluated (greedy trace when
      ``recpo_eval_reasoning``, state at the marker, scores of the whole catalogue, arg-max);
    * ``head_only_seconds_per_user``: the same without the trace (one prompt forward + scoring);
    * ``title_generation_seconds_per_user``: greedy title generation (``title_max_tokens``) and
      matching it against every catalogue title (:func:`hanorec.metrics.match_answer`).
    """
    rows = rows[: max(1, cfg.recpo_timing_users)]
    collator, titles = head.collator, head.collator.catalog.titles

    def head_pass(row: dict, reasoning: bool) -> None:
        states = user_states(model, head, [row], reasoning=reasoning, batch_size=1, device=device)
        head.table.scores(states, head.tau).argmax()

    @torch.no_grad()
    def title_pass(row: dict) -> None:
        prompt = collator.encode_prompts([row], reserve=cfg.title_max_tokens, padding_side="left")
        prompt = to_device(prompt, device)
        out = model.generate(**prompt, max_new_tokens=cfg.title_max_tokens, do_sample=False,
                             pad_token_id=collator.pad_token_id)
        answer = out[0, prompt["input_ids"].shape[1] :]
        match_answer(collator.tokenizer.decode(answer, skip_special_tokens=True), titles)

    was_training = model.training
    model.eval()
    timing = {"head_seconds_per_user": _seconds_per_user(
                  rows, lambda r: head_pass(r, cfg.recpo_eval_reasoning)),
              "head_only_seconds_per_user": _seconds_per_user(rows, lambda r: head_pass(r, False)),
              "title_generation_seconds_per_user": _seconds_per_user(rows, title_pass),
              "timed_users": len(rows)}
    model.train(was_training)
    return timing


def evaluate_full(model, head: Head, run: RecPORun, prepared: Path, out_dir: Path,
                  device) -> dict[str, Any]:
    """Test-split ``full`` evaluation: per-user JSONL, summary.json (with timings), report.md."""
    cfg = run.recpo
    rows = load_rows(prepared, [cfg.recpo_protocol], "test", limit=cfg.recpo_eval_users,
                     seed=run.seed)
    head.table.refresh(model, head.collator)
    states = user_states(model, head, rows, reasoning=cfg.recpo_eval_reasoning,
                         batch_size=cfg.per_device_batch_size, device=device)
    sequences, _ = known_sequences(prepared, "test")
    catalog = head.collator.catalog
    targets = [catalog.position(r["target"]) for r in rows]
    masked = known_items(rows, sequences, catalog.position)
    scores = head.table.scores(states, head.tau).cpu().numpy()
    per_user = full_ranking(scores, targets, masked, PROTOCOL_KS["full"])
    (out_dir / "per_user").mkdir(exist_ok=True)
    with open(out_dir / "per_user" / "full.jsonl", "w", encoding="utf-8") as handle:
        for u, row in enumerate(rows):
            values = {k: float(v[u]) for k, v in per_user.items()}
            handle.write(json.dumps({"user_id": str(row["user_id"]), **values}) + "\n")
    summary = summarize(per_user, n_resamples=cfg.bootstrap_resamples, seed=run.seed)
    timing = time_per_user(model, head, rows, cfg, device)
    return {"metrics": summary, "n_users": len(rows), "timing": timing,
            "hv_refresh_seconds": round(head.table.seconds, 3)}


# ------------------------------------------------------------------------------ entry point


def load_policy(run: RecPORun, catalog=None, prepared: Path | None = None):
    """LoRA policy on the base backbone, or on the SFT model named by ``recpo_init_checkpoint``.

    A policy from the base backbone gets the item encoder its prompt style asks for (built from
    ``catalog`` and ``prepared``; one from SFT brings its own).
    """
    if run.recpo.recpo_init_checkpoint:
        return load_policy_from_sft(run.model, run.recpo.recpo_init_checkpoint)
    model, processor = load_backbone(run.model, for_training=True)
    if run.prompt.style().needs_encoder:
        if catalog is None or prepared is None:
            raise ValueError("load_policy: the prompt style needs item tokens; pass the "
                             "catalogue and prepared folder")
        attach_for_recipe(model, processor, catalog, prepared, run.prompt.style(), run.collab,
                          with_images=run.prompt.with_images)
    return model, processor


def check_config(cfg: RecPOConfig) -> None:
    """Value ranges; the error names the field."""
    checks = [(cfg.num_traces >= 1, "num_traces must be >= 1"),
              (cfg.item_tau > 0, "item_tau must be positive"),
              (cfg.max_trace_tokens >= 0, "max_trace_tokens must be >= 0"),
              (cfg.recpo_item_refresh_every >= 1, "recpo_item_refresh_every must be >= 1"),
              (cfg.recpo_warmup_steps >= 0, "recpo_warmup_steps must be >= 0"),
              (cfg.temperature > 0, "temperature must be positive")]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"recpo.{message}")


def main(argv: list[str] | None = None) -> Path:
    run = recipe.parse(RecPORun, argv, prog="hanorec.recpo", description=__doc__)
    cfg = run.recpo
    check_config(cfg)
    accelerator, out_dir = start_stage(run, "recpo", cfg)

    prepared = prepare_data(run.data, accelerator)
    catalog = load_catalog(run.data, prepared)
    train_rows = load_rows(prepared, [cfg.recpo_protocol], "train", limit=cfg.max_train_examples,
                           seed=run.seed)

    model, processor = load_policy(run, catalog, prepared)
    collator = make_collator(processor, catalog, cfg.recpo_protocol, run.prompt)
    marker = marker_ids(collator.tokenizer)
    table = ItemTable(catalog.item_ids, marker, cfg.item_batch_size)
    head = Head(collator, marker, table, cfg.item_tau, cfg.max_trace_tokens)
    training = prepare_training(accelerator, model, cfg, len(train_rows), seed=run.seed,
                                out_dir=out_dir)
    model = training.model

    # The loop: the item-head warm-up, then RecPO; the item table refreshed every N steps.
    refreshed_at: list[int] = []

    def refresh(at: int) -> dict[str, float]:
        warm = at < cfg.recpo_warmup_steps
        due = not refreshed_at or at - refreshed_at[-1] >= cfg.recpo_item_refresh_every
        if (warm and cfg.item_negatives != "catalogue") or not due:
            return {}
        refreshed_at.append(at)
        seconds = head.table.refresh(training.unwrapped, collator,
                                     progress=accelerator.is_main_process)
        return {"train/hv_refresh_seconds": seconds}

    def step(ids: list[int], at: int) -> MicroStep:
        rows = [train_rows[i] for i in ids]
        warm = at < cfg.recpo_warmup_steps
        objective = warmup_loss if warm else recpo_loss
        loss, stats = objective(model, head, rows, cfg, accelerator)
        stats["train/phase"] = 0.0 if warm else 1.0
        return MicroStep(loss / cfg.gradient_accumulation_steps, stats)

    result = train_loop(training, step, before_step=refresh, desc="recpo")

    final = out_dir / "final"
    if accelerator.is_main_process:
        policy = training.unwrapped
        evaluation = evaluate_full(policy, head, run, prepared, out_dir, accelerator.device)
        export_model(policy, processor, final, run.model, parent=cfg.recpo_init_checkpoint,
                     prompt_cfg=run.prompt)
        summary = {"stage": "recpo", "protocol": cfg.recpo_protocol, "split": "test",
                   "steps": result.position.step, "train_examples": len(train_rows),
                   "seconds": round(result.train_seconds, 1), "adapter": str(final), **evaluation}
        write_json(out_dir / "summary.json", summary)
        write_report(out_dir, summary)
        print("R²ec full-catalogue test: " + ", ".join(
            f"{k} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
            for k, v in evaluation["metrics"].items()))
    accelerator.wait_for_everyone()
    return final


def write_report(out_dir: Path, summary: dict[str, Any]) -> None:
    """``report.md`` (metrics table with intervals, training curves) plus the timing lines."""
    path = try_write_report(out_dir, title="R²ec / RecPO — full-catalogue ranking (test)",
                            metrics_tables={"r2ec": summary["metrics"]})
    if path is None:
        return
    t = summary["timing"]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(
            "\n## Inference time per user\n\n| trace + head scoring (whole catalogue) | head "
            "scoring, no trace | title generation + matching |\n|---|---|---|\n"
            f"| {t['head_seconds_per_user']:.4f} s | {t['head_only_seconds_per_user']:.4f} s | "
            f"{t['title_generation_seconds_per_user']:.4f} s |\n\n"
            f"Measured on {t['timed_users']} users; H_V refresh of the whole catalogue: "
            f"{summary['hv_refresh_seconds']} s.\n"
        )


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main, sys.argv[1:])  # user errors: one `error:` line, exit 2
