"""Checkpoints: atomic, verified, resumable (the trainable weights, optimizer, schedule, RNGs).

A checkpoint ``checkpoint-<step>/`` holds ``trainable.safetensors`` (the parameters that train)
and ``state.pt`` (optimizer and scheduler states, every RNG state, the :class:`LoopPosition`),
read back with ``torch.load(weights_only=True)`` only. It is written to a temporary folder,
fsynced and renamed (an atomic rename on POSIX), kept N deep, and verified in full before
anything is restored (:func:`read_checkpoint`: both files load, the tensor names and shapes fit
the model, the optimizer groups match); :meth:`CheckpointManager.resume` falls back to the
newest checkpoint that passes, with a one-line warning per damaged one.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"


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
    random.setstate((state["python_version"], tuple(state["python"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- checkpoints


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (LoRA weights, or all when fully fine-tuned), detached on CPU."""
    return {n: p.detach().to("cpu").contiguous().clone() for n,
            p in model.named_parameters() if p.requires_grad}


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
        found = [p for p in self.run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()
                 and (p / "state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             position: LoopPosition, *, write_hook: Any = None) -> Path:
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
            "position": {"step": position.step, "epoch": position.epoch,
                         "batch_in_epoch": position.batch_in_epoch},
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

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any) -> tuple[Path | None, LoopPosition]:
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
            raise CheckpointError(f"{self.run_dir}: none of the {len(found)} checkpoints can be "
                                  "resumed (see the warnings); delete them or run without "
                                  "--resume")
        return None, LoopPosition()

    @staticmethod
    def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> LoopPosition:
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
            raise CheckpointError(f"{path / 'state.pt'}: cannot be restored "
                                  f"({type(err).__name__}: {err})") from None
        pos = state["position"]
        return LoopPosition(step=pos["step"], epoch=pos["epoch"],
                            batch_in_epoch=pos["batch_in_epoch"], extra=state.get("extra") or {})


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
        raise CheckpointError(
            f"{file}: cannot be read ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    position = state.get("position") if isinstance(state, dict) else None
    if (
        not isinstance(position, dict)
        or not all(isinstance(position.get(k), int) for k in ("step", "epoch", "batch_in_epoch"))
        or not {"optimizer", "rng", "scheduler"} <= set(state)
    ):
        raise CheckpointError(f"{file}: not a hanorec training state (optimizer, scheduler, rng "
                              "and position expected)")
    return state


def read_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer
                    | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
        raise CheckpointError(f"{path}: checkpoint does not fit the model (missing "
                              f"{missing[:3]}, unknown {unknown[:3]})")
    shapes = [n for n, t in weights.items() if tuple(t.shape) != tuple(params[n].shape)]
    if shapes:
        name = shapes[0]
        raise CheckpointError(f"{path}: checkpoint does not fit the model ({name} has shape "
                              f"{tuple(weights[name].shape)}, the model "
                              f"{tuple(params[name].shape)})")
    state = _load_state(path)
    if optimizer is not None:
        saved = state["optimizer"].get("param_groups",
                                       []) if isinstance(state["optimizer"], dict) else []
        if [len(g.get("params", []))
            for g in saved] != [len(g["params"]) for g in optimizer.param_groups]:
            raise CheckpointError(f"{path / 'state.pt'}: the optimizer state does not match the "
                                  "model's trainable parameters")
    return weights, state
