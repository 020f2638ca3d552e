"""What every stage does the same way around its loop: data, prompts, processes, optimizer.

The entry modules (``hanorec.sft``, ``hanorec.dpo``, ``hanorec.recpo``) keep their step
functions and losses and run them through :func:`hanorec.training.train_loop`; this module holds
the set-up that would otherwise be written three times: the accelerator and the stage folder
(:func:`start_stage`), preparing the data once per machine, loading catalogue and rows (through
:mod:`hanorec.data.prepared`), building the collator from the ``prompt:`` section, and the
optimizer, schedule and data order of a run (:func:`prepare_training`). Model lineage (load a
stage's output, export one) is :mod:`hanorec.models.lineage`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hanorec.collate import PromptCollator
from hanorec.data.catalog import Catalog
from hanorec.data.config import DataConfig
from hanorec.data.prepare import prepare
from hanorec.data.prepared import read_rows
from hanorec.data.prompt_config import PromptConfig
from hanorec.report import try_write_report
from hanorec.training import EpochBatches, TrainConfig, Training, cosine_with_warmup


def start_stage(run: Any, stage: str, cfg: TrainConfig) -> tuple[Accelerator, Path]:
    """The accelerator (CPU when no GPU) in the stage's precision (``auto`` resolved by
    measurement, :func:`resolve_stage_precision`), ``<run_dir>/<stage>`` with the resolved
    recipe saved in it, and every RNG seeded: the first lines of every training entry point."""
    from accelerate import DistributedDataParallelKwargs

    from hanorec.config import save_yaml
    from hanorec.hardware import warn_if_emulated_bf16
    from hanorec.training import set_seed

    requested = cfg.mixed_precision
    resolve_stage_precision(cfg)
    # item encoders have features a batch may not use (a row without posters): DDP must allow it
    prompt = getattr(run, "prompt", None)
    unused = prompt is not None and prompt.style().needs_encoder
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else []
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              cpu=not torch.cuda.is_available(),
                              kwargs_handlers=handlers)
    if requested == "bf16":
        warn_if_emulated_bf16("--mixed-precision bf16", accelerator.device.type)
    out_dir = Path(run.run_dir) / stage
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(run, out_dir / "config.yaml")
    set_seed(run.seed)
    return accelerator, out_dir


def resolve_stage_precision(cfg: TrainConfig) -> str:
    """Resolve ``cfg.mixed_precision`` once for the run, write it back into ``cfg`` (so the
    stage's ``config.yaml`` shows what ran) and print one line saying what and why.

    ``auto`` is measured on the main process, on the device the accelerator will use
    (:func:`hanorec.hardware.resolve_precision`), and the answer is sent to every process so
    they all run the same precision. Call it before building the ``Accelerator``.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from hanorec.hardware import precision_line, resolve_precision

    state = PartialState(cpu=not torch.cuda.is_available())
    requested = cfg.mixed_precision
    answer: list[Any] = [None]
    if state.is_main_process:
        answer = [resolve_precision(requested, state.device.type)]
    if requested == "auto" and state.num_processes > 1:
        broadcast_object_list(answer)
    elif not state.is_main_process:
        answer = [resolve_precision(requested, state.device.type)]
    resolved, ratio = answer[0]
    cfg.mixed_precision = resolved
    if state.is_main_process:
        print(precision_line(requested, resolved, ratio), flush=True)
    return resolved


def prepare_data(data_cfg: DataConfig, accelerator: Accelerator) -> Path:
    """Run ``hanorec.data`` preparation on the main process (others wait); return its folder."""
    if accelerator.is_main_process:
        prepare(data_cfg, progress=True)
    accelerator.wait_for_everyone()
    return data_cfg.path(data_cfg.output_dir)


def load_catalog(data_cfg: DataConfig, prepared: Path) -> Catalog:
    root = data_cfg.path(data_cfg.image_root)
    return Catalog.from_prepared(prepared, image_root=root)


def load_rows(prepared: Path, protocols: Sequence[str], split: str, *, pairs: bool = False,
              limit: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of ``split`` per protocol, tagged with ``protocol``; ``limit``: a seeded subset."""
    rows: list[dict[str, Any]] = []
    for protocol in protocols:
        part = read_rows(prepared, protocol, split, pairs=pairs)
        rows.extend({**r, "protocol": protocol} for r in part)
    if not rows:
        raise ValueError(f"no {split} rows for protocols {list(protocols)} in {prepared}")
    return subsample(rows, limit, seed)


def subsample(rows: list[dict[str, Any]], limit: int, seed: int) -> list[dict[str, Any]]:
    """A seeded subset of ``limit`` rows in their original order (all rows when ``limit`` is 0)."""
    if not limit or len(rows) <= limit:
        return rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]
    return [rows[i] for i in sorted(order.tolist())]


def make_collator(processor, catalog: Catalog, protocol: str,
                  prompt_cfg: PromptConfig) -> PromptCollator:
    return PromptCollator(processor, catalog, protocol, image_budget=prompt_cfg.image_budget,
                          max_length=prompt_cfg.max_length,
                          with_images=prompt_cfg.with_images, style=prompt_cfg.style())


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps`` or ``num_epochs`` worth of accumulated batches."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.floor(cfg.num_epochs * batches_per_epoch / cfg.gradient_accumulation_steps))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                    steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and a cosine schedule with linear warm-up."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    return optimizer, cosine_with_warmup(optimizer, round(cfg.warmup_ratio * steps), steps)


def prepare_training(accelerator: Accelerator, model: torch.nn.Module, cfg: TrainConfig,
                     num_examples: int, *, seed: int, out_dir: Path) -> Training:
    """The run :func:`hanorec.training.train_loop` takes: the deterministic order over
    ``num_examples`` rows, the step count, AdamW with its schedule, model and optimizer prepared
    by the accelerator."""
    order = EpochBatches(num_examples, cfg.per_device_batch_size, seed=seed,
                         rank=accelerator.process_index, world=accelerator.num_processes)
    steps = total_steps(cfg, len(order))
    optimizer, scheduler = build_optimizer(model, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Training(accelerator, model, optimizer, scheduler, cfg, order, steps, out_dir)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def ranking_check(model, collator: PromptCollator, rows: list[dict],
                  cfg: TrainConfig) -> dict[str, float]:
    """Likelihood HR@1 on the validation ``candidates`` rows (empty without such rows)."""
    from hanorec.scoring import quick_candidate_hr1

    rows = [r for r in rows if r.get("protocol") == "candidates"]
    if not rows:
        return {}
    return {"eval/candidates_hr1": quick_candidate_hr1(model, collator, rows,
                                                       cfg.per_device_batch_size)}


def write_stage_report(out_dir: Path, title: str) -> None:
    """``report.md`` with training-curve plots for a stage folder (skipped without matplotlib)."""
    try_write_report(out_dir, title=title, metrics_tables={})
