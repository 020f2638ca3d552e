"""Loop helpers shared by the training entry points (SFT, DPO, RecPO).

What lives here is the plumbing a training loop needs and that should be written once:

* ``TrainConfig`` — the optimisation fields every stage has (learning rate, schedule,
  accumulation, checkpoint cadence, early stopping).
* ``EpochBatches`` — a deterministic, resumable batch order: the permutation of an epoch is a
  function of (seed, epoch) only, and each process of a distributed run takes its own slice of
  every global batch, so "where the data was" is just ``(epoch, batch_in_epoch)``.
* ``CheckpointManager`` — atomic checkpoints (written to a temporary folder, fsynced, then
  renamed), kept N deep, with the trainable weights as safetensors, the optimizer and scheduler
  states, every RNG state and the data position; ``torch.load(weights_only=True)`` only.
* ``MetricsLogger`` — one JSON object per line in ``metrics.jsonl``; on resume, lines past the
  resumed step are dropped so the log reads as one uninterrupted run.
* ``cosine_with_warmup`` and ``EarlyStopping``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training stage."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (HaNoRec: 1e-4 with LoRA)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    num_epochs: float = field(default=1.0, metadata={"help": "Training epochs (fractions allowed); ignored when max_steps > 0."})
    max_steps: int = field(default=0, metadata={"help": "Optimizer steps to run; 0 means num_epochs worth."})
    per_device_batch_size: int = field(default=2, metadata={"help": "Examples per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps with linear warm-up before the cosine decay."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={"help": "Mixed precision (bf16/fp16 need hardware that has it)."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate on the validation split every N optimizer steps (0: only at the end)."})
    eval_examples: int = field(default=64, metadata={"help": "Validation examples used by the periodic evaluation (0: all)."})
    save_every: int = field(default=0, metadata={"help": "Write a checkpoint every N optimizer steps (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many checkpoints to keep on disk (oldest deleted first)."})
    early_stopping_patience: int = field(default=0, metadata={"help": "Stop after N evaluations without improvement of the validation loss (0: off)."})
    log_every: int = field(default=1, metadata={"help": "Write training metrics every N optimizer steps."})
    resume: bool = field(default=False, metadata={"help": "Resume from the newest complete checkpoint in the run directory."})


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- data order


class EpochBatches:
    """Deterministic global batches; process ``rank`` of ``world`` takes every world-th row.

    The permutation of epoch ``e`` is ``randperm(n, generator=seed + e)``. The last incomplete
    global batch is dropped so every process sees the same number of equally sized batches
    (the requirement for exact gradient averaging across processes).
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        if num_examples < batch_size * world:
            raise ValueError(
                f"{num_examples} training examples cannot fill one global batch of "
                f"{batch_size} x {world} processes"
            )
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def __len__(self) -> int:
        return self.num_examples // self.global_batch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """Yield this process's index lists of ``epoch``, skipping the first ``start`` batches."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_examples, generator=gen).tolist()
        else:
            order = list(range(self.num_examples))
        for b in range(start, len(self)):
            chunk = order[b * self.global_batch : (b + 1) * self.global_batch]
            yield chunk[self.rank :: self.world]


# --------------------------------------------------------------------------- schedule


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EarlyStopping:
    """Stop when a lower-is-better metric has not improved for ``patience`` evaluations."""

    def __init__(self, patience: int):
        self.patience, self.best, self.bad = patience, math.inf, 0

    def update(self, value: float) -> bool:
        """Record a value; return True when training should stop."""
        if value < self.best - 1e-12:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])


# --------------------------------------------------------------------------- metrics log


class MetricsLogger:
    """Append-only JSONL metrics, one object per line with at least ``step``."""

    def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v) for k, v in values.items()})
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` back into a list of dicts."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, in a form ``torch.load(weights_only=True)`` accepts."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- checkpoints


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (LoRA weights, or all when fully fine-tuned), detached on CPU."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())


@dataclass
class LoopPosition:
    """Where a run is: optimizer steps done, and the data position of the next batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    """Atomic, N-deep checkpoints under ``run_dir`` named ``checkpoint-<step>``.

    A checkpoint is first written to ``.tmp-checkpoint-<step>-<pid>``, fsynced, and only then
    renamed to its final name (an atomic rename on POSIX), so an interrupted write never
    replaces or corrupts the last good checkpoint; stale temporary folders are ignored and
    cleaned on the next save.
    """

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.run_dir, self.keep = Path(run_dir), max(1, keep)

    def checkpoints(self) -> list[Path]:
        found = [p for p in self.run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, position: LoopPosition, *, write_hook: Any = None) -> Path:
        """Write a checkpoint atomically and prune old ones; returns its final path."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.run_dir / f"{CHECKPOINT_PREFIX}{position.step}"
        tmp = self.run_dir / f".tmp-{CHECKPOINT_PREFIX}{position.step}-{os.getpid()}"
        tmp.mkdir()
        save_file(trainable_state_dict(model), str(tmp / "trainable.safetensors"))
        if write_hook is not None:  # lets tests interrupt a save half-way
            write_hook(tmp)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "position": {"step": position.step, "epoch": position.epoch, "batch_in_epoch": position.batch_in_epoch},
            "extra": position.extra,
        }
        torch.save(state, tmp / "state.pt")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> LoopPosition:
        """Restore weights, optimizer, scheduler and RNG states; return the loop position."""
        path = Path(path)
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(weights))
        unknown = sorted(set(weights) - set(params))
        if missing or unknown:
            raise ValueError(f"{path}: checkpoint does not fit the model (missing {missing[:3]}, unknown {unknown[:3]})")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        pos = state["position"]
        return LoopPosition(step=pos["step"], epoch=pos["epoch"], batch_in_epoch=pos["batch_in_epoch"], extra=state.get("extra") or {})


def batch_stream(order: EpochBatches, position: LoopPosition):
    """Endless (epoch, batch index, ids) from the saved data position onwards."""
    epoch, start = position.epoch, position.batch_in_epoch
    while True:
        for offset, ids in enumerate(order.epoch(epoch, start=start)):
            yield epoch, start + offset, ids
        epoch, start = epoch + 1, 0
