"""Stage 1 — supervised fine-tuning of a multimodal LLM to name the next item.

    accelerate launch -m hanorec.sft --config configs/demo.yaml      (or: python -m hanorec.sft ...)

What it does, top to bottom: prepare the data (once per machine), load the backbone with a
LoRA adapter (or QLoRA, or full fine-tuning), render each training row as a chat prompt whose
history interleaves item images and titles, and minimise the negative log-likelihood of the
answer (the next item's title, or Yes/No for ``hit1``) — HaNoRec's stage-1 objective (eq. 1 of
arXiv 2511.18740). At the end the adapter is written to ``<run_dir>/sft/final`` and loads with
plain ``PeftModel.from_pretrained``.

Design choices:

* **Token-exact distributed loss.** The loss of a micro-batch is its summed token NLL divided
  by the token count of the *global* batch (all processes), times the process count, so the
  gradients DDP averages are exactly those of one process on the combined batch.
* **Deterministic, resumable order.** Batches come from ``EpochBatches`` (a permutation per
  epoch seeded by ``seed + epoch``); a checkpoint stores the data position, optimizer,
  schedule and every RNG state, so an interrupted run resumed with ``--resume true`` ends
  bit-identical to an uninterrupted one (on CPU).
* **Atomic checkpoints**, kept ``keep_checkpoints`` deep; the trainable weights as safetensors.
* **Several protocols at once.** ``sft_protocols`` mixes the tasks (by default the candidate
  ranking and the Yes/No task), each row rendered with its own protocol's prompt.
* **Read-outs** (``prompt.answer``, :mod:`hanorec.readout`). ``title`` and ``index``
  minimise the answer tokens' NLL (the title and eos, or the one label token); ``head``
  minimises ``−log π(target | x)`` of the ranking head over the row's candidates (the
  catalogue for rows without candidates). The loss unit is then the row, not the token.
* **Collaborative tokens** (``prompt.item_tokens``/``user_token``, :mod:`hanorec.collab`). The
  item encoder is built before training (its recommenders trained on the training split once
  per prepared folder) and trains with the adapter. Every training row reads recommender
  features that are out of sample, as a test row's are: with ``collab.collab_fit: crossfit``
  (the default) from the fold model that never saw its user, so every row of the train split
  can be an example; with ``tail`` only the rows whose target the recommender held out.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hanorec import config as recipe
from hanorec.collab import CollabConfig
from hanorec.collate import PromptCollator
from hanorec.data.config import DataConfig
from hanorec.data.prompt_config import PromptConfig
from hanorec.item_features import attach_for_recipe
from hanorec.losses import IGNORE_INDEX, sequence_logps
from hanorec.metrics import target_ranks
from hanorec.models.config import ModelConfig
from hanorec.models.lineage import export_model
from hanorec.models.loading import load_backbone
from hanorec.readout import head_logps, row_choices
from hanorec.runtime import (
    load_catalog,
    load_rows,
    make_collator,
    prepare_data,
    prepare_training,
    start_stage,
    subsample,
    to_device,
    write_json,
    write_stage_report,
)
from hanorec.scoring import head_candidate_scores, quick_candidate_hr1
from hanorec.training import MicroStep, TrainConfig, train_loop


@dataclass
class SFTConfig(TrainConfig):
    """The ``sft:`` section: optimisation (see TrainConfig) plus what to train on."""

    sft_protocols: list[str] = field(default_factory=lambda: ["candidates", "hit1"], metadata={
        "help": "Protocols whose train rows are mixed into SFT (hit1, hit3, candidates, full)."})
    max_train_examples: int = field(default=0, metadata={
        "help": "Use a seeded subset of this many training rows (0: all)."})
    rank_examples: int = field(default=0, metadata={
        "help": "Validation `candidates` rows (users) of the periodic HR@1 check (0: the "
                "candidates rows among the eval_examples ones; -1: all)."})


@dataclass
class SFTRun:
    run_dir: str = field(default="runs/demo", metadata={
        "help": "Run folder; this stage writes to <run_dir>/sft."})
    seed: int = field(default=0, metadata={
        "help": "Seed of initialisation, data order and dropout."})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    collab: CollabConfig = field(default_factory=CollabConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


def token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the response tokens of a batch, and how many tokens it scored."""
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    logps = sequence_logps(logits[:, :-1], labels[:, 1:])
    return -logps.sum(), (labels[:, 1:] != IGNORE_INDEX).sum()


def head_nll(model, collator: PromptCollator, rows: list[dict],
             device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``−log π(target | x)`` of the ranking head over each row's candidates (or the
    catalogue), and the number of rows."""
    index = collator.catalog.index
    batch = to_device(collator.encode_prompts(rows), device)
    picks = torch.tensor([[index[row["target"]]] for row in rows])
    logps = head_logps(model, batch, row_choices(rows, index), picks)
    return -logps.sum(), torch.tensor(len(rows), device=logps.device)


def sft_objective(model, collator: PromptCollator, rows: list[dict],
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the rows' supervised answers and its unit count (tokens; rows for the head)."""
    if collator.style.answer == "head":
        return head_nll(model, collator, rows, device)
    return token_nll(model, to_device(collator.encode_pairs(rows), device))


@torch.no_grad()
def validation(model, collator: PromptCollator, rows: list[dict], rank_rows: list[dict],
               batch_size: int,
               device) -> dict[str, float]:
    """Unit-mean NLL on the validation rows and HR@1 (the read-out's scores) on ``rank_rows``.

    With the head both come from one forward per distinct prompt (states cached).
    """
    model.eval()
    if collator.style.answer == "head":
        out = _head_validation(model, collator, rows, rank_rows, batch_size)
    else:
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            nll, units = sft_objective(model, collator, rows[start : start + batch_size], device)
            total, count = total + float(nll), count + int(units)
        out = {"eval/loss": total / max(count, 1)}
        if rank_rows:
            out["eval/candidates_hr1"] = quick_candidate_hr1(model, collator, rank_rows, batch_size)
    model.train()
    return out


def _head_validation(model, collator: PromptCollator, rows: list[dict], rank_rows: list[dict],
                     batch_size: int) -> dict[str, float]:
    cache: dict = {}
    index = collator.catalog.index
    losses = []
    for candidates in (True, False):
        part = [r for r in rows if bool(r.get("candidates")) == candidates]
        if not part:
            continue
        scores = head_candidate_scores(model, collator, part, batch_size=batch_size, progress=False,
                                       state_cache=cache, catalogue=not candidates)
        targets = [int(r["target_index"]) if candidates else index[r["target"]] for r in part]
        losses.extend(np.logaddexp.reduce(scores, axis=1) - scores[np.arange(len(part)), targets])
    out = {"eval/loss": float(np.mean(losses))}
    if rank_rows:
        scores = head_candidate_scores(model, collator, rank_rows, batch_size=batch_size,
                                       progress=False,
                                       state_cache=cache)
        ranks = target_ranks(scores, [int(r["target_index"]) for r in rank_rows])
        out["eval/candidates_hr1"] = float(np.mean(ranks == 1))
    return out


def training_rows(prepared, run: SFTRun, catalog, collab) -> list[dict]:
    """The SFT rows: every protocol's train rows whose collaborative features are out of
    sample, each tagged with the recommender it reads (:meth:`CollabFeatures.training_rows`),
    then a seeded subset of ``max_train_examples``."""
    rows = load_rows(prepared, run.sft.sft_protocols, "train")
    if collab is not None:
        rows = collab.training_rows(rows, catalog.index)
        if not rows:
            raise ValueError("collab.collab_fit: tail left no training row (is the train split "
                             "complete?)")
    return subsample(rows, run.sft.max_train_examples, run.seed)


def main(argv: list[str] | None = None) -> Path:
    run = recipe.parse(SFTRun, argv, prog="hanorec.sft", description=__doc__)
    cfg = run.sft
    setup_started = time.time()
    accelerator, out_dir = start_stage(run, "sft", cfg)

    # Data: prepared once, rows of every SFT protocol, a fixed validation subset.
    prepared = prepare_data(run.data, accelerator)
    catalog = load_catalog(run.data, prepared)
    val_rows = load_rows(prepared, cfg.sft_protocols, "validation", limit=cfg.eval_examples,
                         seed=run.seed)
    rank_rows = [r for r in val_rows if r["protocol"] == "candidates"]
    if cfg.rank_examples and "candidates" in cfg.sft_protocols:
        rank_rows = load_rows(prepared, ["candidates"], "validation",
                              limit=max(cfg.rank_examples, 0), seed=run.seed)

    # Model: backbone + LoRA (or QLoRA / full) + the item encoder the prompt style needs,
    # AdamW + cosine schedule.
    model, processor = load_backbone(run.model, for_training=True)
    _, collab = attach_for_recipe(model, processor, catalog, prepared, run.prompt.style(),
                                  run.collab,
                                  with_images=run.prompt.with_images,
                                  progress=accelerator.is_main_process)
    train_rows = training_rows(prepared, run, catalog, collab)
    collator = make_collator(processor, catalog, cfg.sft_protocols[0], run.prompt)
    training = prepare_training(accelerator, model, cfg, len(train_rows), seed=run.seed,
                                out_dir=out_dir)

    # The loop: the token-exact loss of each micro-batch, validation every eval_every steps.
    def step(ids: list[int], at: int) -> MicroStep:
        nll, units = sft_objective(training.model, collator, [train_rows[i] for i in ids],
                                   accelerator.device)
        global_units = accelerator.reduce(units.detach().clone(), reduction="sum")
        loss = nll * accelerator.num_processes / (global_units * cfg.gradient_accumulation_steps)
        return MicroStep(loss, {"train/loss": float(nll.detach())}, weight=int(units))

    def validate() -> dict[str, float]:  # in the training precision (bf16: ~1.5x faster here)
        with accelerator.autocast():
            return validation(training.unwrapped, collator, val_rows, rank_rows,
                              cfg.per_device_batch_size, accelerator.device)

    started = time.time()
    result = train_loop(training, step, validate=validate, desc="sft")
    val = result.validation

    # Export: the adapter (PeftModel.from_pretrained loads it), the item encoder, a summary.
    final = out_dir / "final"
    if accelerator.is_main_process:
        export_model(training.unwrapped, processor, final, run.model, prompt_cfg=run.prompt)
        write_json(out_dir / "summary.json", {
            "stage": "sft", "steps": result.position.step, **val,
            "best_step": result.best_step, "best_metric": result.best_metric,
            "metric_for_best_model": cfg.metric_for_best_model,
            "mixed_precision": cfg.mixed_precision,
            "train_examples": len(train_rows), "truncated_examples": collator.num_truncated,
            "seconds": round(time.time() - started, 1),
            "train_seconds": round(result.train_seconds, 1),
            "setup_seconds": round(started - setup_started, 1),
            "collab": collab.meta if collab is not None else None, "adapter": str(final)})
        write_stage_report(out_dir, "SFT")
        print(f"SFT done: {result.position.step} steps, validation loss {val['eval/loss']:.4f}; "
              f"adapter in {final}")
    accelerator.wait_for_everyone()
    return final


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main, sys.argv[1:])  # user errors: one `error:` line, exit 2
