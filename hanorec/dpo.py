"""Stage 2 — preference optimization: HaNoRec (HaRS + NoDO) and the DPO family.

    accelerate launch -m hanorec.dpo --config configs/demo.yaml --hardness dynamic --noise logits

What it does, top to bottom: load the SFT model (its adapter merged into the base) and put a
fresh LoRA adapter on top — as HaNoRec does (arXiv 2511.18740, Sec. 5) — so that "adapter
disabled" *is* the SFT model and serves as the frozen reference with no second copy in
memory. Encode the catalogue once for HaRS (title-embedding mean + vision-feature mean,
fused), compute every training pair's distance Δ (eq. 5) and static hardness λ (eq. 6), then
train on the preference pairs of the data stage (chosen = the true next item, K rejected).

Each step, per micro-batch: the prompt and its images are encoded **once** and the chosen
and K rejected responses branch from it (``hanorec.forward``: KV-cache expansion, or packed
sequences under gradient checkpointing); the policy forward gets NoDO noise (logits or LoRA,
eq. 9–10), the reference forward never does. The implicit reward margin
``h_i = [log πθ(y_w) − log π_ref(y_w)] − [log πθ(y_l) − log π_ref(y_l)]`` of the global batch
gives the responsiveness η (eq. 8) and the per-sample ``β_i = max(1e-6, β0·η·λ_i)`` (eq. 11);
the loss comes from ``hanorec.losses.preference_loss`` — the loop holds no formula of its own
(the formulas, numbered as in the paper, are in ``docs/methods.md``). The loop itself is
:func:`hanorec.training.train_loop`; this module holds the step (:func:`preference_step`) and
the validation.

Design choices:

* ``--hardness none|static|dynamic`` → ``β_i = β0``, ``β0·λ_i`` or ``β0·η·λ_i``
  (:func:`hanorec.losses.hars_betas`); Δ and λ per pair come from :mod:`hanorec.hardness`, in
  the item space of ``--hardness-embedding`` (``backbone``, the paper's; ``head``; ``collab``)
  with the profile temperature ``--hardness-temperature`` (eq. 5; 1 is the paper's). The λ
  spread over the training pairs is logged once (``hars/lambda_*``, and ``hars_lambda`` in
  ``summary.json``), β's per step (``hars/beta_*``).
* ``--noise-scale absolute|relative``: the logit noise's std is σ, or σ times the spread of the
  row's scores (:func:`hanorec.losses.score_noise`); ``nodo/noise_std`` logs its realised size
  in reward units.
* With K > 1 negatives, ``sdpo`` uses them all in one softmax (S-DPO); a pairwise loss of the
  registry (:data:`hanorec.losses.LOSSES`: ``sigmoid``, ``ipo``, ``hinge``, ``simpo``) treats
  every (chosen, rejected_k) as its own pair, still sharing one prompt pass. ``hit1`` pairs
  (Yes/No answers) have no item neighbourhood: their λ is 1.
* ``--reference frozen`` runs the reference with the adapter disabled; ``precomputed`` stores
  the reference log-probs of every pair in one pass first (no reference forward in training);
  ``none`` is reference-free (NoDO is then the only regulariser).
* The NoDO noise of step ``s`` is drawn from a generator seeded with ``(seed, s)``, so a
  resumed run draws the same noise as an uninterrupted one.
* η is computed per global micro-batch (all processes' pairs of one micro-step).
* BPO (``--blind-negatives PATH``, written by ``python -m hanorec.bpo generate``): a training
  row whose blind answer names an item other than the chosen one (or, on ``general`` rows, any
  non-empty free text) gets it as a negative by **replacing its last sampled negative**, so every
  row keeps the same K (:func:`hanorec.data.blind.mix_blind_negatives`). ``--blind-ratio`` is
  the seeded fraction of eligible rows that get theirs. Validation pairs stay as prepared.
  HaRS λ is computed after the swap.
* ``--preference-data DIR`` trains on a folder holding ``pairs/<protocol>`` instead of the
  prepared recommendation data, e.g. MMSafe-PO data converted by ``hanorec.data.mmsafe``
  (protocol ``general``); its catalogue is empty, so λ is 1 there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from hanorec import config as recipe
from hanorec.collate import ChoiceBatch, PromptCollator
from hanorec.data.config import DataConfig
from hanorec.data.known import known_sequences
from hanorec.data.prompt_config import PromptConfig
from hanorec.hardness import hardness_item_embeddings, pair_lambdas, sft_item_embeddings
from hanorec.losses import (
    IGNORE_INDEX,
    LOSSES,
    hars_betas,
    lora_noise,
    preference_loss,
    preference_metrics,
    reward_margins,
    spread,
)
from hanorec.models.config import ModelConfig
from hanorec.models.lineage import export_model, load_policy_from_sft
from hanorec.negatives import NegativeDraws
from hanorec.preference import (
    DPOConfig,
    encode_pairs,
    hard_negative_data,
    load_preference_data,
    model_negatives,
    precompute_reference,
    reference_context,
    responses_per_row,
    training_pairs,
    training_views,
)
from hanorec.readout import answer_logps
from hanorec.runtime import (
    load_rows,
    make_collator,
    prepare_training,
    ranking_check,
    start_stage,
    write_json,
    write_stage_report,
)
from hanorec.training import MicroStep, train_loop

#: A factory of the reference: ``with reference() as model`` (:func:`reference_context`).
Reference = Callable[[], AbstractContextManager[nn.Module]]
_reference_context = reference_context  # the former private name (tests use it)


@dataclass
class DPORun:
    run_dir: str = field(default="runs/demo", metadata={
        "help": "Run folder; this stage writes to <run_dir>/dpo and reads <run_dir>/sft/final."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the new adapter, data order, dropout and noise."})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


# --------------------------------------------------------------------------- one step


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def preference_step(model: nn.Module, reference_model: Reference, batch: ChoiceBatch | dict,
                    responses: torch.Tensor | None, ref_logps: torch.Tensor | None,
                    lam: torch.Tensor, run: DPORun, accelerator: Accelerator,
                    generator: torch.Generator | None) -> StepOutput:
    """Policy (noisy) and reference log-probs, HaRS β and the loss of one micro-batch.

    ``batch`` is a :class:`ChoiceBatch` (``responses`` None), or a prompt batch with its
    ``[B, K+1, R]`` ``responses`` (the title/index form, as TRL-style callers hold them).
    ``ref_logps`` are precomputed reference log-probs ``[B, K+1]`` (None: the live reference
    of ``--reference frozen``, or none at all). ``lam`` is the static hardness λ of each pair.
    """
    if not isinstance(batch, ChoiceBatch):
        batch = ChoiceBatch(batch, responses)
    cfg = run.dpo
    spec = LOSSES[cfg.loss]
    noise_log: dict = {}
    policy = policy_logps(model, batch, cfg, accelerator, generator, average=spec.length_averaged,
                          noise_log=noise_log)
    if cfg.reference == "frozen":
        with torch.no_grad(), reference_model() as ref_model:
            ref_logps = answer_logps(ref_model, batch, mode=cfg.forward_mode,
                                     average=spec.length_averaged)
    chosen, rejected, ref_chosen, ref_rejected, lam = as_pairs(policy, ref_logps, lam,
                                                               pairwise=spec.pairwise)
    lam = lam.to(chosen.device, chosen.dtype)
    margins = reward_margins(chosen, rejected, ref_chosen, ref_rejected)
    beta, eta = hars_betas(cfg.hardness, cfg.beta, lam, margins, gather=accelerator.gather)
    gamma = cfg.simpo_gamma if "simpo_gamma" in spec.options else 0.0
    out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                          loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
                          simpo_gamma=gamma)
    loss = out.loss
    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * chosen_nll(policy, batch, spec.length_averaged)
    noise_std = cfg.noise_std if cfg.noise != "none" else 0.0
    metrics = {"train/loss": float(loss.detach()),
               **preference_metrics(out, policy[:, 0], policy[:, 1:], beta, eta, lam, noise_std),
               **beta_spread(beta), **noise_visibility(policy, noise_log, beta)}
    return StepOutput(loss, metrics)


def beta_spread(beta: torch.Tensor) -> dict[str, float]:
    """``hars/beta_p10``, ``hars/beta_median``, ``hars/beta_p90`` of the per-sample β of a batch
    (``hars/beta_max``, ``_min``, ``_mean`` and ``hars/eta`` come from ``preference_metrics``)."""
    return {f"hars/beta_{k}": v for k, v in spread(beta).items() if k != "max"}


def noise_visibility(policy: torch.Tensor, noise_log: dict,
                     beta: torch.Tensor) -> dict[str, float]:
    """How large the NoDO logit noise of this forward was (empty without logit noise).

    ``nodo/noise_std``: the realised noise in reward units, ``mean(β) · std(log π̃(y) −
    log π(y))`` over the batch's responses (noisy minus clean policy log-probs), to set against
    ``rewards/margins``; ``nodo/score_spread``: the mean spread (std) of the scores the noise
    was added to, over each row's choices (head items, or the vocabulary at response positions).
    """
    if "clean_logps" not in noise_log:
        return {}
    shift = (policy.detach().float() - noise_log["clean_logps"].float()).reshape(-1)
    realised = float(shift.std(correction=0)) if shift.numel() > 1 else 0.0
    return {"nodo/noise_std": float(beta.detach().float().mean()) * realised,
            "nodo/score_spread": float(noise_log["score_spread"])}


def policy_logps(model: nn.Module, batch: ChoiceBatch, cfg: DPOConfig, accelerator: Accelerator,
                 generator: torch.Generator | None, *, average: bool,
                 noise_log: dict | None = None) -> torch.Tensor:
    """``[B, K+1]`` policy log-probs, with NoDO noise on the logits (``cfg.noise_scale``:
    absolute or relative to the scores' spread) or on the LoRA matrices. ``noise_log``
    receives the clean log-probs of a logit-noise forward (:func:`noise_visibility`)."""
    noise_logits = cfg.noise_std if cfg.noise == "logits" else 0.0
    noise = (lora_noise(accelerator.unwrap_model(model), cfg.noise_std, generator=generator)
             if cfg.noise == "lora" else nullcontext())
    with noise:
        return answer_logps(model, batch, mode=cfg.forward_mode, average=average,
                            noise_std=noise_logits, noise_scale=cfg.noise_scale,
                            generator=generator, noise_log=noise_log)


def as_pairs(policy: torch.Tensor, ref_logps: torch.Tensor | None, lam: torch.Tensor, *,
             pairwise: bool) -> tuple:
    """Chosen, rejected, their references and λ in the loss's layout.

    A pairwise loss makes every ``(chosen, rejected_k)`` its own pair (``[B·K]``); a loss over
    K negatives keeps ``[B, K]`` (``[B]`` when K = 1).
    """
    chosen, rejected = policy[:, 0], policy[:, 1:]
    ref_chosen = ref_rejected = None
    if ref_logps is not None:
        ref_chosen, ref_rejected = ref_logps[:, 0], ref_logps[:, 1:]
    if pairwise:
        k = rejected.shape[1]
        chosen, rejected = chosen.repeat_interleave(k), rejected.reshape(-1)
        if ref_logps is not None:
            ref_chosen, ref_rejected = ref_chosen.repeat_interleave(k), ref_rejected.reshape(-1)
        lam = lam.reshape(-1)
    elif rejected.shape[1] == 1:
        rejected = rejected[:, 0]
        ref_rejected = None if ref_rejected is None else ref_rejected[:, 0]
    return chosen, rejected, ref_chosen, ref_rejected, lam


def chosen_nll(policy: torch.Tensor, batch: ChoiceBatch, averaged: bool) -> torch.Tensor:
    """Mean per-token NLL of the chosen answers (RPO's ``sft_weight`` term)."""
    if batch.responses is None:
        lengths = torch.ones_like(policy[:, 0])
    else:
        lengths = (batch.responses[:, 0] != IGNORE_INDEX).sum(-1).clamp(min=1)
    nll = -(policy[:, 0] if not averaged else policy[:, 0] * lengths) / lengths
    return nll.mean()


@torch.no_grad()
def validation(model: nn.Module, reference_model: Reference, collators: dict[str, PromptCollator],
               rows: list[dict], ref_table: torch.Tensor | None, lam_table: torch.Tensor,
               run: DPORun, accelerator: Accelerator, *,
               rank_rows: list[dict] | None = None) -> dict[str, float]:
    """Preference loss, accuracy and margin on validation pairs, without noise, and the HR@1 of
    the ``candidates`` read-out on ``rank_rows`` (default: the validation pairs' candidates
    rows) when candidates pairs are trained."""
    model.eval()
    quiet = replace(run, dpo=replace(run.dpo, noise="none"))
    sums: dict[str, float] = {}
    batches = 0
    for start in range(0, len(rows), run.dpo.per_device_batch_size):
        chunk = rows[start : start + run.dpo.per_device_batch_size]
        batch = encode_pairs(collators, chunk).to(accelerator.device)
        ref = None if ref_table is None else ref_table[start : start + len(chunk)]
        ref = None if ref is None else ref.to(accelerator.device)
        lam = lam_table[start : start + len(chunk)]
        out = preference_step(model, reference_model, batch, None, ref, lam, quiet, accelerator,
                              None)
        for key in ("train/loss", "rewards/accuracies", "rewards/margins"):
            sums[key] = sums.get(key, 0.0) + out.metrics[key]
        batches += 1
    out = {"eval/" + k.split("/")[-1]: v / max(batches, 1) for k, v in sums.items()}
    if "candidates" in collators:
        out.update(ranking_check(accelerator.unwrap_model(model), collators["candidates"],
                                 rank_rows or rows, run.dpo))
    model.train()
    return out


class StepNoise:
    """The NoDO generator of each optimizer step, seeded by ``(seed, step, process)``: a resumed
    run draws the same noise as an uninterrupted one, and every micro-batch of a step draws on
    from the same generator."""

    def __init__(self, seed: int, accelerator: Accelerator) -> None:
        self.seed, self.accelerator = seed, accelerator
        self.step, self.generator = -1, None

    def __call__(self, step: int) -> torch.Generator:
        if step != self.step:
            seed = self.seed * 1_000_003 + step * 101 + self.accelerator.process_index
            self.generator = torch.Generator(device=self.accelerator.device).manual_seed(seed)
            self.step = step
        return self.generator


# --------------------------------------------------------------------------- main


def check_run(run: DPORun) -> None:
    """Settings that cannot work together; the error says which."""
    if run.prompt.answer == "head" and set(run.dpo.dpo_protocols) - {"candidates", "hit3", "full"}:
        raise ValueError(f"prompt.answer: head ranks items; dpo_protocols {run.dpo.dpo_protocols} "
                         "must be item protocols (candidates, hit3, full), not Yes/No (hit1) or "
                         "free-text (general) pairs")
    kind = run.dpo.hardness_embedding
    if run.dpo.hardness != "none" and kind == "head" and run.prompt.answer != "head":
        raise ValueError(f"dpo.hardness_embedding: head reads the ranking head's item vectors, "
                         f"but prompt.answer is {run.prompt.answer!r}; use prompt.answer: head, "
                         "or hardness_embedding backbone (or collab with item tokens)")
    drawn = model_negatives(run)
    if drawn and run.prompt.answer != "head":
        raise ValueError(f"data.negative_sampling: {drawn} draws negatives from the ranking head's "
                         f"scores; it needs prompt.answer: head, not {run.prompt.answer!r}")
    if drawn == "collab" and not run.prompt.item_tokens:
        raise ValueError("data.negative_sampling: collab ranks with the collaborative "
                         "recommender, which exists with prompt.item_tokens: true only")
    if run.dpo.hardness != "none" and kind == "collab" and not run.prompt.item_tokens:
        raise ValueError("dpo.hardness_embedding: collab reads the collaborative recommender's "
                         "item embeddings, which exist with prompt.item_tokens: true only; use "
                         "backbone (or head with prompt.answer: head)")


def main(argv: list[str] | None = None) -> Path:
    run = recipe.parse(DPORun, argv, prog="hanorec.dpo", description=__doc__)
    cfg = run.dpo
    check_run(run)
    accelerator, out_dir = start_stage(run, "dpo", cfg)
    started = time.time()

    # Policy: SFT adapter merged into the base, fresh DPO adapter on top.
    sft_dir = Path(cfg.sft_checkpoint or Path(run.run_dir) / "sft" / "final")
    model, processor = load_policy_from_sft(run.model, sft_dir)

    # Data and HaRS: item embeddings from the SFT model, Δ and λ for every pair.
    prepared, catalog = load_preference_data(run, accelerator)
    drawn = model_negatives(run)  # policy / collab / hard in the head's space: drawn below
    hard = run.data.negative_sampling == "hard" and not cfg.preference_data and not drawn
    embeddings = None  # HaRS's (dpo.hardness_embedding)
    show = accelerator.is_main_process
    if len(catalog) and cfg.hardness != "none":
        embeddings = hardness_item_embeddings(cfg.hardness_embedding, model, processor, catalog,
                                              sft_dir, cache_dir=out_dir, progress=show)
    if hard:  # HaRS's nearest items as negatives: always the backbone embeddings
        backbone = (embeddings if embeddings is not None and cfg.hardness_embedding == "backbone"
                    else sft_item_embeddings(model, processor, catalog, sft_dir,
                                             cache_dir=out_dir, progress=show))
        prepared = hard_negative_data(run, accelerator, out_dir, backbone)
    # Out-of-sample pairs first (as SFT selects its rows), then the seeded max_train_pairs.
    train_rows, val_rows, blind_counts = training_pairs(
        run, prepared, keep=lambda rows: training_views(model, rows, prepared, catalog))
    collators = {p: make_collator(processor, catalog, p, run.prompt) for p in cfg.dpo_protocols}
    negatives = None
    if drawn:  # the K rejected items of every training row, from the model's top pool
        known, _ = known_sequences(prepared, "validation")
        negatives = NegativeDraws(drawn, collators[cfg.dpo_protocols[0]], known,
                                  k=run.data.num_negatives, pool=cfg.negative_pool,
                                  scope=cfg.negative_scope, seed=run.seed,
                                  batch_size=2 * cfg.per_device_batch_size)
        with accelerator.autocast():
            train_rows = negatives.draw(model, train_rows, 0)
    responses_per_row(train_rows)  # every row has the same K
    pairwise = LOSSES[cfg.loss].pairwise
    tau = cfg.hardness_temperature

    def lambdas_of(rows: list[dict]) -> torch.Tensor:
        return pair_lambdas(embeddings, rows, catalog, top_k=cfg.top_k, pairwise=pairwise,
                            temperature=tau)

    lam_train = lambdas_of(train_rows)
    lam_val = pair_lambdas(embeddings, val_rows, catalog, top_k=cfg.top_k, pairwise=pairwise,
                           temperature=tau)
    lambda_spread = spread(lam_train)  # static λ over the training pairs, logged once
    rank_rows = ([] if not cfg.rank_examples or "candidates" not in collators else
                 load_rows(prepared, ["candidates"], "validation",
                           limit=max(cfg.rank_examples, 0), seed=run.seed))

    # Optimizer, reference (computed once with --reference precomputed).
    training = prepare_training(accelerator, model, cfg, len(train_rows), seed=run.seed,
                                out_dir=out_dir)
    model = training.model
    reference_model = reference_context(training.unwrapped)
    ref_train = ref_val = None
    if cfg.reference == "precomputed":
        ref_train, ref_val = (precompute_reference(model, collators, rows,
                                                   cfg.per_device_batch_size, accelerator,
                                                   cfg.forward_mode)
                              for rows in (train_rows, val_rows))
    noise = StepNoise(run.seed, accelerator)

    # The loop: one preference step per micro-batch.
    def step(ids: list[int], at: int) -> MicroStep:
        batch = encode_pairs(collators, [train_rows[i] for i in ids]).to(accelerator.device)
        ref = None if ref_train is None else ref_train[ids].to(accelerator.device)
        out = preference_step(model, reference_model, batch, None, ref, lam_train[ids], run,
                              accelerator, noise(at))
        return MicroStep(out.loss / cfg.gradient_accumulation_steps, out.metrics)

    def validate() -> dict[str, float]:  # in the training precision
        with accelerator.autocast():
            return validation(model, reference_model, collators, val_rows, ref_val, lam_val,
                              run, accelerator, rank_rows=rank_rows)

    def before_step(at: int) -> dict[str, float]:
        """λ's spread on step 1's log line (not on a resume); redrawn negatives when due."""
        nonlocal train_rows, lam_train
        values = {f"hars/lambda_{k}": v for k, v in lambda_spread.items()} if at == 0 else {}
        if negatives is not None and cfg.negative_refresh and at and at % cfg.negative_refresh == 0:
            with accelerator.autocast():
                train_rows = negatives.draw(training.unwrapped, train_rows,
                                            at // cfg.negative_refresh)
            lam_train = lambdas_of(train_rows)
            values["negatives/refreshed"] = 1.0
        return values

    desc = f"dpo ({cfg.loss}, hardness {cfg.hardness}, noise {cfg.noise})"
    result = train_loop(training, step, validate=validate, before_step=before_step, desc=desc)

    # Export: the adapter on top of its SFT parent, a summary.
    final, val = out_dir / "final", result.validation
    if accelerator.is_main_process:
        export_model(training.unwrapped, processor, final, run.model,
                     parent=str(sft_dir.resolve()), prompt_cfg=run.prompt)
        write_json(out_dir / "summary.json", {
            "stage": "dpo", "steps": result.position.step, **val, "loss_type": cfg.loss,
            "best_step": result.best_step, "best_metric": result.best_metric,
            "metric_for_best_model": cfg.metric_for_best_model,
            "mixed_precision": cfg.mixed_precision,
            "hardness": cfg.hardness, "noise": cfg.noise, "reference": cfg.reference,
            "train_pairs": len(train_rows), "blind_negatives": blind_counts,
            "negatives": {"sampling": run.data.negative_sampling, "drawn_by_model": bool(drawn),
                          "pool": cfg.negative_pool, "scope": cfg.negative_scope,
                          "refresh": cfg.negative_refresh, "k": run.data.num_negatives},
            "hars_lambda": {"embedding": cfg.hardness_embedding if embeddings is not None
                            else None, "temperature": tau, **lambda_spread},
            "seconds": round(time.time() - started, 1), "adapter": str(final)})
        write_stage_report(out_dir, "DPO")
        print(f"DPO done: {result.position.step} steps, validation accuracy "
              f"{val['eval/accuracies']:.3f}; adapter in {final}")
    accelerator.wait_for_everyone()
    return final


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main, sys.argv[1:])  # user errors: one `error:` line, exit 2
