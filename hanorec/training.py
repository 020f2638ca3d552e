"""Loop helpers shared by the training entry points (SFT, DPO, RecPO).

What lives here is the plumbing a training loop needs and that should be written once:

* ``TrainConfig`` — the optimisation fields every stage has (learning rate, schedule,
  accumulation, checkpoint cadence, early stopping).
* ``EpochBatches`` — a deterministic, resumable batch order: the permutation of an epoch is a
  function of (seed, epoch) only, and each process of a distributed run takes its own slice of
  every global batch, so "where the data was" is just ``(epoch, batch_in_epoch)``.
* ``CheckpointManager`` — atomic checkpoints (written to a temporary folder, fsynced, then
  renamed), kept N deep, with the trainable weights as safetensors, the optimizer and scheduler
  states, every RNG state and the data position; ``torch.load(weights_only=True)`` only. A
  checkpoint is verified in full (both files load, the tensor names and shapes fit the model,
  the optimizer groups match) before anything is restored, and :meth:`CheckpointManager.resume`
  falls back to the newest checkpoint that passes, with a one-line warning per damaged one.
* ``MetricsLogger`` — one JSON object per line in ``metrics.jsonl``; on resume, lines past the
  resumed step are dropped so the log reads as one uninterrupted run (a line torn by a kill is
  dropped too).
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

from hanorec.config import FieldError

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

    def __post_init__(self) -> None:
        for name, ok, message in self._train_checks():
            if not ok:
                raise FieldError(type(self).__name__, name, message)

    def _train_checks(self) -> list[tuple[str, bool, str]]:
        """``(field, holds, message)`` range checks of the optimisation fields."""
        def at_least(name: str, low: float) -> tuple[str, bool, str]:
            value = getattr(self, name)
            return name, math.isfinite(value) and value >= low, f"must be >= {low}, got {value}"

        return [
            ("learning_rate", math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"must be a positive number, got {self.learning_rate}"),
            at_least("weight_decay", 0), at_least("max_grad_norm", 0), at_least("max_steps", 0),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, f"must be in [0, 1), got {self.adam_beta1}"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, f"must be in [0, 1), got {self.adam_beta2}"),
            ("num_epochs", self.max_steps > 0 or (math.isfinite(self.num_epochs)
                                                  and self.num_epochs > 0),
             f"must be positive when max_steps is 0, got {self.num_epochs}"),
            at_least("per_device_batch_size", 1), at_least("gradient_accumulation_steps", 1),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1,
             f"must be in [0, 1], got {self.warmup_ratio}"),
            at_least("eval_every", 0), at_least("eval_examples", 0), at_least("save_every", 0),
            at_least("keep_checkpoints", 1), at_least("early_stopping_patience", 0),
            at_least("log_every", 1),
        ]


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
            kept = [ln for ln in self.path.read_text(errors="replace").splitlines() if _step_of(ln) is not None and _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v) for k, v in values.items()})
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def _step_of(line: str) -> int | None:
    """The ``step`` of a metrics line, or None for a line a kill tore in half."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return int(row.get("step", 0)) if isinstance(row, dict) else None


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

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[Path | None, LoopPosition]:
        """Restore the newest checkpoint that verifies; damaged ones are skipped with a warning.

        Returns:
            The checkpoint used (None when the run directory holds none) and its position.

        Raises:
            CheckpointError: Checkpoints exist but none of them can be restored.
        """
        found = self.checkpoints()
        for path in reversed(found):
            try:
                return path, self.load(path, model, optimizer, scheduler)
            except CheckpointError as err:
                print(f"warning: --resume skips {path.name}: {err}")
        if found:
            raise CheckpointError(f"{self.run_dir}: none of the {len(found)} checkpoints can be resumed (see the warnings); delete them or run without --resume")
        return None, LoopPosition()

    @staticmethod
    def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> LoopPosition:
        """Restore weights, optimizer, scheduler and RNG states; return the loop position.

        Everything is read and checked (:func:`read_checkpoint`) before anything is restored.

        Raises:
            CheckpointError: A file that does not load, names or shapes that do not fit the
                model, or optimizer groups that do not match.
        """
        path = Path(path)
        weights, state = read_checkpoint(path, model, optimizer)
        params = dict(model.named_parameters())
        try:
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor.to(params[name].device, params[name].dtype))
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path / 'state.pt'}: cannot be restored ({type(err).__name__}: {err})") from None
        pos = state["position"]
        return LoopPosition(step=pos["step"], epoch=pos["epoch"], batch_in_epoch=pos["batch_in_epoch"], extra=state.get("extra") or {})


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored (damaged file, or written for another model)."""


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / "trainable.safetensors"
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type (and OSError)
        raise CheckpointError(f"{file}: cannot be read ({err})") from None


def _load_state(path: Path) -> dict[str, Any]:
    file = path / "state.pt"
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - zip, unpickling and OS errors alike
        raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
    position = state.get("position") if isinstance(state, dict) else None
    if not isinstance(position, dict) or not all(isinstance(position.get(k), int) for k in ("step", "epoch", "batch_in_epoch")) or not {"optimizer", "rng", "scheduler"} <= set(state):
        raise CheckpointError(f"{file}: not a hanorec training state (optimizer, scheduler, rng and position expected)")
    return state


def read_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify a checkpoint against ``model`` (and ``optimizer``) without applying it.

    Returns:
        The trainable weights and the training state.

    Raises:
        CheckpointError: The reason, naming the file.
    """
    path = Path(path)
    weights = _load_weights(path)
    params = dict(model.named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(weights))
    unknown = sorted(set(weights) - set(params))
    if missing or unknown:
        raise CheckpointError(f"{path}: checkpoint does not fit the model (missing {missing[:3]}, unknown {unknown[:3]})")
    shapes = [n for n, t in weights.items() if tuple(t.shape) != tuple(params[n].shape)]
    if shapes:
        name = shapes[0]
        raise CheckpointError(f"{path}: checkpoint does not fit the model ({name} has shape {tuple(weights[name].shape)}, the model {tuple(params[name].shape)})")
    state = _load_state(path)
    if optimizer is not None:
        saved = state["optimizer"].get("param_groups", []) if isinstance(state["optimizer"], dict) else []
        if [len(g.get("params", [])) for g in saved] != [len(g["params"]) for g in optimizer.param_groups]:
            raise CheckpointError(f"{path / 'state.pt'}: the optimizer state does not match the model's trainable parameters")
    return weights, state


def batch_stream(order: EpochBatches, position: LoopPosition):
    """Endless (epoch, batch index, ids) from the saved data position onwards."""
    epoch, start = position.epoch, position.batch_in_epoch
    while True:
        for offset, ids in enumerate(order.epoch(epoch, start=start)):
            yield epoch, start + offset, ids
        epoch, start = epoch + 1, 0
