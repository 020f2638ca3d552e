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
the loss comes from ``hanorec.losses.preference_loss`` — the loop holds no formula of its own.

Design choices:

* ``--hardness none|static|dynamic`` → ``β_i = β0``, ``β0·λ_i`` or ``β0·η·λ_i``.
* With K > 1 negatives, ``sdpo`` uses them all in one softmax (S-DPO); a pairwise loss
  (``sigmoid``, ``ipo``, ``hinge``, ``simpo``) treats every (chosen, rejected_k) as its own pair,
  still sharing one prompt pass. ``hit1`` pairs (Yes/No answers) have no item neighbourhood:
  their λ is 1.
* ``--reference frozen`` runs the reference with the adapter disabled; ``precomputed`` stores
  the reference log-probs of every pair in one pass first (no reference forward in training);
  ``none`` is reference-free (NoDO is then the only regulariser).
* The NoDO noise of step ``s`` is drawn from a generator seeded with ``(seed, s)``, so a
  resumed run draws the same noise as an uninterrupted one.
* η is computed per global micro-batch (all processes' pairs of one micro-step).
* BPO (``--blind-negatives PATH``, written by ``python -m hanorec.bpo generate``): a training
  row whose blind answer names an item other than the chosen one (or, on ``general`` rows, any
  non-empty free text) gets it as a negative by **replacing its last sampled negative**, so every
  row keeps the same K (S-DPO's softmax needs equal K per batch; pairwise losses then see the
  blind pair as one of their K pairs). ``--blind-ratio`` is the seeded fraction of eligible rows
  that get theirs; a blind item already among a row's negatives changes nothing. Validation
  pairs stay as prepared. HaRS λ is computed after the swap.
* ``--preference-data DIR`` trains on a folder holding ``pairs/<protocol>`` instead of the
  prepared recommendation data, e.g. MMSafe-PO data converted by ``hanorec.data.mmsafe``
  (protocol ``general``); its catalogue is empty, so λ is 1 there.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from hanorec import config as recipe
from hanorec.collate import ChoiceBatch
from hanorec.data.catalog import Catalog
from hanorec.data.config import DataConfig
from hanorec.data.prepare import prepare
from hanorec.hardness import catalogue_embeddings, catalogue_key, pair_hardness
from hanorec.losses import hanorec_betas, lora_noise, preference_loss, responsiveness
from hanorec.models.config import ModelConfig
from hanorec.readout import answer_logps
from hanorec.runtime import (
    PromptConfig,
    build_optimizer,
    export_model,
    load_catalog,
    load_policy_from_sft,
    load_rows,
    make_collator,
    maybe_resume,
    optimizer_step,
    prepare_data,
    ranking_check,
    start_stage,
    total_steps,
    write_json,
    write_stage_report,
)
from hanorec.training import (
    CheckpointManager,
    EarlyStopping,
    EpochBatches,
    MetricsLogger,
    TrainConfig,
    batch_stream,
)

PAIRWISE = ("sigmoid", "ipo", "hinge", "simpo")


@dataclass
class DPOConfig(TrainConfig):
    """The ``dpo:`` section: optimisation (see TrainConfig) plus the preference method."""

    dpo_protocols: list[str] = field(default_factory=lambda: ["candidates"], metadata={"help": "Protocols whose preference pairs train the policy (pairs/<protocol> of the data stage)."})
    sft_checkpoint: str | None = field(default=None, metadata={"help": "SFT adapter folder to start from (default <run_dir>/sft/final). It is merged into the base and a fresh adapter is trained on top (HaNoRec Sec. 5)."})
    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "sdpo"] = field(default="sigmoid", metadata={"help": "sigmoid = DPO (Rafailov et al. 2023; with label_smoothing: cDPO), ipo (Azar et al. 2023), hinge (SLiC, Zhao et al. 2023), simpo (Meng et al. 2024, reference-free), sdpo = softmax DPO over K negatives (Chen et al. 2024)."})
    beta: float = field(default=0.1, metadata={"help": "β0, the DPO temperature; HaRS scales it per sample (HaNoRec eq. 11)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε of cDPO / robust DPO: the assumed probability that a preference label is flipped."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin γ (Meng et al. 2024, eq. 6)."})
    hardness: Literal["none", "static", "dynamic"] = field(default="none", metadata={"help": "HaRS (HaNoRec Sec. 4.1): none → β0; static → β0·λ_i (eq. 6); dynamic → β0·η·λ_i with the live responsiveness η (eq. 8, 11)."})
    top_k: int = field(default=10, metadata={"help": "K of the top-K cosine neighbourhood s(v) in HaRS's pair distance Δ (HaNoRec eq. 5)."})
    noise: Literal["none", "logits", "lora"] = field(default="none", metadata={"help": "NoDO (HaNoRec Sec. 4.2): Gaussian noise on the policy's logits at response positions (the paper's wording) or on every active LoRA A/B matrix (the authors' code); training policy forward only."})
    noise_std: float = field(default=0.1, metadata={"help": "σ of the NoDO noise (HaNoRec: 0.1; 0.05 on sparse catalogues)."})
    reference: Literal["frozen", "precomputed", "none"] = field(default="frozen", metadata={"help": "frozen: a live reference forward with the DPO adapter disabled; precomputed: one pass before training stores reference log-probs; none: reference-free."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of an NLL term on the chosen response added to the loss (RPO, Pang et al. 2024)."})
    forward_mode: Literal["auto", "kv", "packed", "duplicate"] = field(default="auto", metadata={"help": "Shared-prompt forward: kv (KV-cache expansion), packed (block mask, for gradient checkpointing), duplicate (the prompt once per response, as TRL does), auto."})
    max_train_pairs: int = field(default=0, metadata={"help": "Use a seeded subset of this many training pairs (0: all)."})
    blind_negatives: str | None = field(default=None, metadata={"help": "BPO (MMSafe-PO, arXiv 2503.14189): blind answers written by `python -m hanorec.bpo generate`; a row's blind item replaces its last sampled negative."})
    blind_ratio: float = field(default=1.0, metadata={"help": "Fraction of the training rows with a usable blind negative that get it (seeded)."})
    preference_data: str | None = field(default=None, metadata={"help": "Folder with pairs/<protocol> (+ items/, manifest.json) to train on instead of the prepared data, e.g. MMSafe-PO converted by `python -m hanorec.data.mmsafe convert` (protocol general)."})


@dataclass
class DPORun:
    run_dir: str = field(default="runs/demo", metadata={"help": "Run folder; this stage writes to <run_dir>/dpo and reads <run_dir>/sft/final."})
    seed: int = field(default=0, metadata={"help": "Seed of the new adapter, data order, dropout and noise."})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


# --------------------------------------------------------------------------- set-up


def load_preference_data(run: DPORun, accelerator: Accelerator) -> tuple[Path, Catalog]:
    """The folder holding ``pairs/<protocol>`` and its catalogue: ``dpo.preference_data`` when set,
    else the prepared recommendation data (prepared on the main process first)."""
    if run.dpo.preference_data:
        folder = Path(run.dpo.preference_data)
        if not (folder / "items").is_dir():
            raise ValueError(f"--preference-data {folder}: no items/ folder (convert the data with `python -m hanorec.data.mmsafe convert`)")
        return folder, Catalog.from_prepared(folder)
    prepared = prepare_data(run.data, accelerator)
    return prepared, load_catalog(run.data, prepared)


def item_indices(rows: list[dict], catalog) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen [N] and rejected [N, K] catalogue indices, and a mask of rows that are item pairs."""
    is_item = torch.tensor([r["chosen"] in catalog.index for r in rows])
    chosen = torch.tensor([catalog.index.get(r["chosen"], 0) for r in rows])
    rejected = torch.tensor([[catalog.index.get(x, 0) for x in r["rejected"]] for r in rows])
    return chosen, rejected, is_item


def static_hardness(embeddings: torch.Tensor, rows: list[dict], catalog, *, top_k: int, pairwise: bool) -> torch.Tensor:
    """λ per pair: [N] (mean Δ over negatives, S-DPO) or [N, K] (every negative its own pair)."""
    chosen, rejected, is_item = item_indices(rows, catalog)
    if pairwise:
        k = rejected.shape[1]
        _, lam = pair_hardness(embeddings, chosen.repeat_interleave(k), rejected.reshape(-1), top_k=top_k)
        lam = lam.view(-1, k)
    else:
        _, lam = pair_hardness(embeddings, chosen, rejected, top_k=top_k)
    lam = lam.clone()
    lam[~is_item] = 1.0
    return lam


def responses_per_row(rows: list[dict]) -> int:
    counts = {len(r["rejected"]) for r in rows}
    if len(counts) != 1:
        raise ValueError(f"pairs must all have the same number of rejected responses, got {sorted(counts)}")
    return counts.pop() + 1


@torch.no_grad()
def precompute_reference(model, collators, rows, batch_size: int, accelerator: Accelerator, mode: str) -> torch.Tensor:
    """Reference log-probs [N, K+1] of every pair (adapter disabled), computed once and shared."""
    unwrapped = accelerator.unwrap_model(model)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    width = responses_per_row(rows)
    local = torch.zeros(len(rows), width)
    for start in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", disable=not accelerator.is_main_process):
        ids = mine[start : start + batch_size]
        batch = encode_pairs(collators, [rows[i] for i in ids]).to(accelerator.device)
        with unwrapped.disable_adapter():
            local[ids] = answer_logps(unwrapped, batch, mode=mode).float().cpu()
    return accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()


def encode_pairs(collators, rows) -> ChoiceBatch:
    """The rows' prompts and chosen/rejected answers (:class:`ChoiceBatch`); rows carry their protocol."""
    return collators[rows[0]["protocol"]].encode_choices(rows)


# --------------------------------------------------------------------------- one step


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def preference_step(model, reference_model, batch, responses, ref_logps, lam, run: DPORun, accelerator: Accelerator, generator) -> StepOutput:
    """Policy (noisy) and reference log-probs, HaRS β and the loss of one micro-batch.

    ``batch`` is a :class:`ChoiceBatch` (``responses`` None), or a prompt batch with its
    ``[B, K+1, R]`` ``responses`` (the title/index form, as TRL-style callers hold them).
    """
    if not isinstance(batch, ChoiceBatch):
        batch = ChoiceBatch(batch, responses)
    cfg = run.dpo
    average = cfg.loss in ("ipo", "simpo")
    noise_logits = cfg.noise_std if cfg.noise == "logits" else 0.0
    noise_ctx = lora_noise(accelerator.unwrap_model(model), cfg.noise_std, generator=generator) if cfg.noise == "lora" else nullcontext()
    with noise_ctx:
        policy = answer_logps(model, batch, mode=cfg.forward_mode, average=average, noise_std=noise_logits, generator=generator)
    if cfg.reference == "frozen":
        with torch.no_grad(), reference_model() as ref_model:
            ref_logps = answer_logps(ref_model, batch, mode=cfg.forward_mode, average=average)
    chosen, rejected = policy[:, 0], policy[:, 1:]
    ref_chosen = ref_rejected = None
    if ref_logps is not None:
        ref_chosen, ref_rejected = ref_logps[:, 0], ref_logps[:, 1:]
    if cfg.loss in PAIRWISE:  # every (chosen, rejected_k) is a pair of its own
        k = rejected.shape[1]
        chosen, rejected = chosen.repeat_interleave(k), rejected.reshape(-1)
        if ref_logps is not None:
            ref_chosen, ref_rejected = ref_chosen.repeat_interleave(k), ref_rejected.reshape(-1)
        lam = lam.reshape(-1)
    elif rejected.shape[1] == 1:
        rejected = rejected[:, 0]
        ref_rejected = None if ref_rejected is None else ref_rejected[:, 0]
    beta, eta = hars_betas(chosen, rejected, ref_chosen, ref_rejected, lam, cfg, accelerator)
    out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma if cfg.loss == "simpo" else 0.0)
    loss = out.loss
    if cfg.sft_weight > 0:
        lengths = torch.ones_like(policy[:, 0]) if batch.responses is None else (batch.responses[:, 0] != -100).sum(-1).clamp(min=1)
        nll = -(policy[:, 0] if not average else policy[:, 0] * lengths) / lengths
        loss = loss + cfg.sft_weight * nll.mean()
    beta_vec = beta if isinstance(beta, torch.Tensor) else torch.full_like(chosen, beta)
    metrics = {
        "train/loss": float(loss.detach()), "rewards/chosen": float(out.chosen_rewards.mean()), "rewards/rejected": float(out.rejected_rewards.mean()),
        "rewards/margins": float(out.margins.mean()), "rewards/accuracies": float(out.accuracies.mean()),
        "logps/chosen": float(policy[:, 0].detach().mean()), "logps/rejected": float(policy[:, 1:].detach().mean()),
        "hars/beta_mean": float(beta_vec.mean()), "hars/beta_min": float(beta_vec.min()), "hars/beta_max": float(beta_vec.max()),
        "hars/eta": eta, "hars/lambda_mean": float(lam.float().mean()), "nodo/std": cfg.noise_std if cfg.noise != "none" else 0.0,
    }
    return StepOutput(loss, metrics)


def hars_betas(chosen, rejected, ref_chosen, ref_rejected, lam, cfg: DPOConfig, accelerator: Accelerator):
    """β per sample from HaRS (eq. 11) and the η used (1.0 unless dynamic)."""
    if cfg.hardness == "none":
        return cfg.beta, 1.0
    lam = lam.to(chosen.device, chosen.dtype)
    if cfg.hardness == "static":
        return hanorec_betas(lam, torch.tensor(1.0), cfg.beta), 1.0
    ref_c = 0.0 if ref_chosen is None else ref_chosen
    ref_r = 0.0 if ref_rejected is None else ref_rejected
    margin_rejected = (rejected - ref_r).mean(-1) if rejected.dim() == 2 else rejected - ref_r
    h = ((chosen - ref_c) - margin_rejected).detach()
    eta = responsiveness(accelerator.gather(h.contiguous()), cfg.beta)
    return hanorec_betas(lam, eta, cfg.beta), float(eta)


@torch.no_grad()
def validation(model, reference_model, collators, rows, ref_table, lam_table, run: DPORun, accelerator: Accelerator) -> dict[str, float]:
    """Preference loss and accuracy on validation pairs, without noise."""
    model.eval()
    quiet = replace(run, dpo=replace(run.dpo, noise="none"))
    sums: dict[str, float] = {}
    batches = 0
    for start in range(0, len(rows), run.dpo.per_device_batch_size):
        chunk = rows[start : start + run.dpo.per_device_batch_size]
        batch = encode_pairs(collators, chunk).to(accelerator.device)
        ref = None if ref_table is None else ref_table[start : start + len(chunk)].to(accelerator.device)
        out = preference_step(model, reference_model, batch, None, ref, lam_table[start : start + len(chunk)], quiet, accelerator, None)
        for key in ("train/loss", "rewards/accuracies", "rewards/margins"):
            sums[key] = sums.get(key, 0.0) + out.metrics[key]
        batches += 1
    out = {"eval/" + k.split("/")[-1]: v / max(batches, 1) for k, v in sums.items()}
    out.update(ranking_check(accelerator.unwrap_model(model), collators["candidates"], rows, run.dpo) if "candidates" in collators else {})
    model.train()
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path:
    run = recipe.parse(DPORun, argv, prog="hanorec.dpo", description=__doc__)
    cfg = run.dpo
    if run.prompt.answer == "head" and set(cfg.dpo_protocols) - {"candidates", "hit3", "full"}:
        raise ValueError(f"prompt.answer: head ranks items; dpo_protocols {cfg.dpo_protocols} must be item protocols "
                         "(candidates, hit3, full), not Yes/No (hit1) or free-text (general) pairs")
    accelerator, out_dir = start_stage(run, "dpo", cfg)
    started = time.time()

    # Policy: SFT adapter merged into the base, fresh DPO adapter on top.
    sft_dir = Path(cfg.sft_checkpoint or Path(run.run_dir) / "sft" / "final")
    model, processor = load_policy_from_sft(run.model, sft_dir)

    # Data and HaRS: item embeddings from the SFT model, Δ and λ for every pair.
    prepared, catalog = load_preference_data(run, accelerator)
    embeddings = None
    if len(catalog) and (cfg.hardness != "none" or (run.data.negative_sampling == "hard" and not cfg.preference_data)):
        images = [str(p) if p else None for p in map(catalog.image_path, catalog.item_ids)]
        key = catalogue_key(sorted(sft_dir.glob("*.safetensors")), catalog.titles, images)
        embeddings = catalogue_embeddings(model, processor, catalog.titles, images, cache_dir=out_dir, cache_key=key, progress=accelerator.is_main_process)
    if run.data.negative_sampling == "hard" and not cfg.preference_data:
        hard_cfg = replace(run.data, output_dir=str(out_dir / "prepared-hard"))
        if accelerator.is_main_process:
            prepare(hard_cfg, item_embeddings=embeddings.numpy())
        accelerator.wait_for_everyone()
        prepared = hard_cfg.path(hard_cfg.output_dir)
    train_rows = load_rows(prepared, cfg.dpo_protocols, "train", pairs=True, limit=cfg.max_train_pairs, seed=run.seed)
    val_rows = load_rows(prepared, cfg.dpo_protocols, "validation", pairs=True, limit=cfg.eval_examples, seed=run.seed)
    blind_counts = None
    if cfg.blind_negatives:
        from hanorec.bpo import mix_blind_negatives  # hanorec.bpo imports this module

        train_rows, blind_counts = mix_blind_negatives(train_rows, cfg.blind_negatives, ratio=cfg.blind_ratio, seed=run.seed)
    width = responses_per_row(train_rows)
    if width > 2 and cfg.loss not in PAIRWISE + ("sdpo",):
        raise ValueError(f"loss {cfg.loss!r} cannot take {width - 1} negatives")
    pairwise = cfg.loss in PAIRWISE
    lam_train = static_hardness(embeddings, train_rows, catalog, top_k=cfg.top_k, pairwise=pairwise) if embeddings is not None else torch.ones(len(train_rows), width - 1 if pairwise else 1).squeeze(-1)
    lam_val = static_hardness(embeddings, val_rows, catalog, top_k=cfg.top_k, pairwise=pairwise) if embeddings is not None else torch.ones(len(val_rows), width - 1 if pairwise else 1).squeeze(-1)
    collators = {p: make_collator(processor, catalog, p, run.prompt) for p in cfg.dpo_protocols}

    # Optimizer, reference, resume.
    order = EpochBatches(len(train_rows), cfg.per_device_batch_size, seed=run.seed, rank=accelerator.process_index, world=accelerator.num_processes)
    steps = total_steps(cfg, len(order))
    optimizer, scheduler = build_optimizer(model, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    reference_model = _reference_context(accelerator.unwrap_model(model))
    ref_train = ref_val = None
    if cfg.reference == "precomputed":
        ref_train = precompute_reference(model, collators, train_rows, cfg.per_device_batch_size, accelerator, cfg.forward_mode)
        ref_val = precompute_reference(model, collators, val_rows, cfg.per_device_batch_size, accelerator, cfg.forward_mode)
    position = maybe_resume(cfg, out_dir, accelerator.unwrap_model(model), optimizer, scheduler)
    checkpoints = CheckpointManager(out_dir, keep=cfg.keep_checkpoints)
    log = MetricsLogger(out_dir / "metrics.jsonl", enabled=accelerator.is_main_process, resume_step=position.step if cfg.resume else None)
    stopper = EarlyStopping(cfg.early_stopping_patience)
    if "early_stopping" in position.extra:
        stopper.load_state_dict(position.extra["early_stopping"])

    # The loop.
    batches = batch_stream(order, position)
    bar = tqdm(total=steps, initial=position.step, desc=f"dpo ({cfg.loss}, hardness {cfg.hardness}, noise {cfg.noise})", disable=not accelerator.is_main_process)
    model.train()
    while position.step < steps:
        generator = torch.Generator(device=accelerator.device).manual_seed(run.seed * 1_000_003 + position.step * 101 + accelerator.process_index)
        step_metrics: dict[str, float] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            epoch, index, ids = next(batches)
            batch = encode_pairs(collators, [train_rows[i] for i in ids]).to(accelerator.device)
            ref = None if ref_train is None else ref_train[ids].to(accelerator.device)
            last = micro == cfg.gradient_accumulation_steps - 1
            with accelerator.no_sync(model) if not last else nullcontext():
                out = preference_step(model, reference_model, batch, None, ref, lam_train[ids], run, accelerator, generator)
                accelerator.backward(out.loss / cfg.gradient_accumulation_steps)
            for key, value in out.metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + value / cfg.gradient_accumulation_steps
            position.epoch, position.batch_in_epoch = epoch, index + 1
        step_metrics["train/grad_norm"] = optimizer_step(accelerator, model, optimizer, scheduler, cfg)
        step_metrics["train/lr"] = scheduler.get_last_lr()[0]
        position.step += 1
        bar.update()
        if position.step % cfg.log_every == 0 or position.step == steps:
            log.log(position.step, step_metrics)
        stop = False
        if cfg.eval_every and position.step % cfg.eval_every == 0:
            val = validation(model, reference_model, collators, val_rows, ref_val, lam_val, run, accelerator)
            log.log(position.step, val)
            stop = stopper.update(val["eval/loss"])
        if (cfg.save_every and position.step % cfg.save_every == 0) or stop:
            position.extra["early_stopping"] = stopper.state_dict()
            if accelerator.is_main_process:
                checkpoints.save(accelerator.unwrap_model(model), optimizer, scheduler, position)
            accelerator.wait_for_everyone()
        if stop:
            break
    bar.close()

    val = validation(model, reference_model, collators, val_rows, ref_val, lam_val, run, accelerator)
    log.log(position.step, val)
    final = out_dir / "final"
    if accelerator.is_main_process:
        export_model(accelerator.unwrap_model(model), processor, final, run.model, parent=str(sft_dir.resolve()), prompt_cfg=run.prompt)
        write_json(out_dir / "summary.json", {"stage": "dpo", "steps": position.step, **val, "loss_type": cfg.loss, "hardness": cfg.hardness, "noise": cfg.noise, "reference": cfg.reference, "train_pairs": len(train_rows), "blind_negatives": blind_counts, "seconds": round(time.time() - started, 1), "adapter": str(final)})
        write_stage_report(out_dir, "DPO")
        print(f"DPO done: {position.step} steps, validation accuracy {val['eval/accuracies']:.3f}; adapter in {final}")
    accelerator.wait_for_everyone()
    return final


def _reference_context(model):
    """A context manager factory yielding the reference: the policy with its adapter disabled."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        with model.disable_adapter():
            yield model

    return ctx


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main, sys.argv[1:])  # user errors: one `error:` line, exit 2
