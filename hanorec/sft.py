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
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hanorec import config as recipe
from hanorec.collate import PromptCollator
from hanorec.data.config import DataConfig
from hanorec.losses import sequence_logps
from hanorec.models.config import ModelConfig
from hanorec.models.loading import load_backbone
from hanorec.runtime import (
    PromptConfig,
    build_optimizer,
    export_model,
    load_catalog,
    load_rows,
    make_collator,
    maybe_resume,
    optimizer_step,
    prepare_data,
    ranking_check,
    save_gradients,
    start_stage,
    to_device,
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


@dataclass
class SFTConfig(TrainConfig):
    """The ``sft:`` section: optimisation (see TrainConfig) plus what to train on."""

    sft_protocols: list[str] = field(default_factory=lambda: ["candidates", "hit1"], metadata={"help": "Protocols whose train rows are mixed into SFT (hit1, hit3, candidates, full)."})
    max_train_examples: int = field(default=0, metadata={"help": "Use a seeded subset of this many training rows (0: all)."})
    debug_gradients_path: str | None = field(default=None, metadata={"help": "Write the (process-averaged) gradients of the first optimizer step to this safetensors file and continue; used by the distributed-equivalence test."})


@dataclass
class SFTRun:
    run_dir: str = field(default="runs/demo", metadata={"help": "Run folder; this stage writes to <run_dir>/sft."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and dropout."})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


def token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the response tokens of a batch, and how many tokens it scored."""
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits
    logps = sequence_logps(logits[:, :-1], labels[:, 1:])
    return -logps.sum(), (labels[:, 1:] != -100).sum()


@torch.no_grad()
def validation_loss(model, collator: PromptCollator, rows: list[dict], batch_size: int, device) -> float:
    """Token-mean NLL on the validation rows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = to_device(collator.encode_pairs(rows[start : start + batch_size]), device)
        nll, tokens = token_nll(model, batch)
        total, count = total + float(nll), count + int(tokens)
    model.train()
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> Path:
    run = recipe.parse(SFTRun, argv, prog="hanorec.sft", description=__doc__)
    cfg = run.sft
    accelerator, out_dir = start_stage(run, "sft", cfg)

    # Data: prepared once, rows of every SFT protocol, a fixed validation subset.
    prepared = prepare_data(run.data, accelerator)
    catalog = load_catalog(run.data, prepared)
    train_rows = load_rows(prepared, cfg.sft_protocols, "train", limit=cfg.max_train_examples, seed=run.seed)
    val_rows = load_rows(prepared, cfg.sft_protocols, "validation", limit=cfg.eval_examples, seed=run.seed)
    rank_rows = [r for r in val_rows if r["protocol"] == "candidates"]

    # Model: backbone + LoRA (or QLoRA / full), AdamW + cosine schedule.
    model, processor = load_backbone(run.model, for_training=True)
    collator = make_collator(processor, catalog, cfg.sft_protocols[0], run.prompt)
    order = EpochBatches(len(train_rows), cfg.per_device_batch_size, seed=run.seed, rank=accelerator.process_index, world=accelerator.num_processes)
    steps = total_steps(cfg, len(order))
    optimizer, scheduler = build_optimizer(model, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    position = maybe_resume(cfg, out_dir, accelerator.unwrap_model(model), optimizer, scheduler)
    checkpoints = CheckpointManager(out_dir, keep=cfg.keep_checkpoints)
    log = MetricsLogger(out_dir / "metrics.jsonl", enabled=accelerator.is_main_process, resume_step=position.step if cfg.resume else None)
    stopper = EarlyStopping(cfg.early_stopping_patience)
    if "early_stopping" in position.extra:
        stopper.load_state_dict(position.extra["early_stopping"])

    # The loop: accumulate micro-batches, one optimizer step, log / evaluate / checkpoint.
    batches = batch_stream(order, position)
    bar = tqdm(total=steps, initial=position.step, desc="sft", disable=not accelerator.is_main_process)
    model.train()
    started = time.time()
    while position.step < steps:
        loss_sum, token_sum = 0.0, 0
        for micro in range(cfg.gradient_accumulation_steps):
            epoch, index, ids = next(batches)
            batch = to_device(collator.encode_pairs([train_rows[i] for i in ids]), accelerator.device)
            tokens_here = (batch["labels"][:, 1:] != -100).sum()
            global_tokens = accelerator.reduce(tokens_here.clone(), reduction="sum")
            last = micro == cfg.gradient_accumulation_steps - 1
            with accelerator.no_sync(model) if not last else nullcontext():
                nll, _ = token_nll(model, batch)
                loss = nll * accelerator.num_processes / (global_tokens * cfg.gradient_accumulation_steps)
                accelerator.backward(loss)
            loss_sum, token_sum = loss_sum + float(nll.detach()), token_sum + int(tokens_here)
            position.epoch, position.batch_in_epoch = epoch, index + 1
        if cfg.debug_gradients_path and position.step == 0 and accelerator.is_main_process:
            save_gradients(accelerator.unwrap_model(model), cfg.debug_gradients_path)
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, cfg)
        position.step += 1
        bar.update()
        if position.step % cfg.log_every == 0 or position.step == steps:
            log.log(position.step, {"train/loss": loss_sum / max(token_sum, 1), "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0], "train/epoch": position.epoch + position.batch_in_epoch / len(order)})
        stop = False
        if cfg.eval_every and position.step % cfg.eval_every == 0:
            val = validation_loss(model, collator, val_rows, cfg.per_device_batch_size, accelerator.device)
            log.log(position.step, {"eval/loss": val, **ranking_check(accelerator.unwrap_model(model), collator, rank_rows, cfg)})
            stop = stopper.update(val)
        if (cfg.save_every and position.step % cfg.save_every == 0) or stop:
            position.extra["early_stopping"] = stopper.state_dict()
            if accelerator.is_main_process:
                checkpoints.save(accelerator.unwrap_model(model), optimizer, scheduler, position)
            accelerator.wait_for_everyone()
        if stop:
            print(f"early stopping at step {position.step}: no validation improvement in {cfg.early_stopping_patience} evaluations")
            break
    bar.close()

    # Export: the adapter (PeftModel.from_pretrained loads it) and a summary.
    val = validation_loss(model, collator, val_rows, cfg.per_device_batch_size, accelerator.device)
    ranking = ranking_check(accelerator.unwrap_model(model), collator, rank_rows, cfg)
    log.log(position.step, {"eval/loss": val, **ranking})
    final = out_dir / "final"
    if accelerator.is_main_process:
        export_model(accelerator.unwrap_model(model), processor, final, run.model)
        write_json(out_dir / "summary.json", {"stage": "sft", "steps": position.step, "eval/loss": val, **ranking, "train_examples": len(train_rows), "truncated_examples": collator.num_truncated, "seconds": round(time.time() - started, 1), "adapter": str(final)})
        write_stage_report(out_dir, "SFT")
        print(f"SFT done: {position.step} steps, validation loss {val:.4f}; adapter in {final}")
    accelerator.wait_for_everyone()
    return final


if __name__ == "__main__":
    from hanorec.cli import run as run_cli

    run_cli(main, sys.argv[1:])  # user errors: one `error:` line, exit 2
