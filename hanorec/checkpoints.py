"""Checkpoints: atomic, verified, resumable (the trainable weights, optimizer, schedule, RNGs).

A checkpoint ``checkpoint-<step>/`` holds ``trainable.safetensors`` (the parameters that train)
and ``state.pt`` (optimizer and scheduler states, every RNG state, the :class:`LoopPosition`),
read back with ``torch.load(weights_only=True)`` only. It is written to a temporary folder,
fsynced and renamed (an atomic rename on POSIX), kept N deep, and verified in full before
anything is restored (:func:`read_checkpoint`: both files load, the tensor names and shapes fit
the model, the optimizer groups match); :meth:`CheckpointManager.resume` falls back to the
newest checkpoint that passes, with a one-line warning per damaged one.

The best validation's weights (:func:`write_best`) live beside them in ``best/``:
``trainable.safetensors`` and ``best.json`` (step, metric, value), written the same atomic way
whenever a validation improves. Each checkpoint carries a hard-linked copy of ``best/`` as of
its step, so a resumed run puts back the best snapshot its checkpoint knew
(:func:`restore_best`), even when the interrupted run had written a later one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"
WEIGHTS_FILE = "trainable.safetensors"
BEST_DIR = "best"
BEST_INFO = "best.json"


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


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_tree(src: Path, dst: Path) -> None:
    """Copy the files of ``src`` into a new folder ``dst``, hard links where possible.

    Safe because every file here is written once and replaced by a rename, never in place.
    """
    dst.mkdir()
    for path in sorted(src.iterdir()):
        if path.is_file():
            try:
                os.link(path, dst / path.name)
            except OSError:
                shutil.copy2(path, dst / path.name)


def _install(tmp: Path, final: Path) -> Path:
    """Move the complete folder ``tmp`` to ``final``, replacing the folder there.

    The old folder is renamed aside first (a directory cannot be renamed onto a non-empty one),
    then removed; a kill between the two renames leaves no ``final``, never a torn one.
    """
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _clean_stale(run_dir: Path, name: str) -> None:
    """Remove temporary folders an interrupted write of ``name`` left in ``run_dir``."""
    for pattern in (f".tmp-{name}*", f".old-{name}-*"):
        for stale in run_dir.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


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
             position: LoopPosition, *, write_hook: Any = None,
             include: Mapping[str, Path] | None = None) -> Path:
        """Write a checkpoint atomically and prune old ones; returns its final path.

        ``include`` maps a subfolder name to a folder whose files the checkpoint carries too
        (hard-linked; the loop passes ``{"best": <run_dir>/best}``); absent folders are skipped.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        final = self.run_dir / f"{CHECKPOINT_PREFIX}{position.step}"
        tmp = self.run_dir / f".tmp-{CHECKPOINT_PREFIX}{position.step}-{os.getpid()}"
        tmp.mkdir()
        save_file(trainable_state_dict(model), str(tmp / WEIGHTS_FILE))
        for name, folder in (include or {}).items():
            if Path(folder).is_dir():
                _link_tree(Path(folder), tmp / name)
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
        try:
            _copy_into(model, weights)
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


def _copy_into(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy checked ``weights`` into the model's parameters of the same names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_FILE
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
    _check_fit(path, weights, model)
    state = _load_state(path)
    if optimizer is not None:
        saved = state["optimizer"].get("param_groups",
                                       []) if isinstance(state["optimizer"], dict) else []
        if [len(g.get("params", []))
            for g in saved] != [len(g["params"]) for g in optimizer.param_groups]:
            raise CheckpointError(f"{path / 'state.pt'}: the optimizer state does not match the "
                                  "model's trainable parameters")
    return weights, state


def _check_fit(path: Path, weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``weights`` are exactly the model's trainable
    parameters (names and shapes)."""
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


# --------------------------------------------------------------------------- best weights


def write_best(run_dir: str | Path, model: torch.nn.Module, info: dict[str, Any]) -> Path:
    """Write the trainable weights and ``info`` (step, metric, value) to ``<run_dir>/best/``.

    Atomic like a checkpoint: a temporary folder, fsynced, then renamed into place.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(run_dir, BEST_DIR)
    tmp = run_dir / f".tmp-{BEST_DIR}-{os.getpid()}"
    tmp.mkdir()
    save_file(trainable_state_dict(model), str(tmp / WEIGHTS_FILE))
    (tmp / BEST_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    _fsync_tree(tmp)
    return _install(tmp, run_dir / BEST_DIR)


def read_best_info(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``best.json`` of ``<run_dir>/best/`` (None when there is no complete snapshot)."""
    folder = Path(run_dir) / BEST_DIR
    if not (folder / WEIGHTS_FILE).is_file():
        return None
    try:
        info = json.loads((folder / BEST_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def load_best(run_dir: str | Path, model: torch.nn.Module, *, step: int) -> dict[str, Any]:
    """Load ``<run_dir>/best/`` into ``model`` after checking it is the snapshot of ``step``.

    Returns:
        The snapshot's ``best.json``.

    Raises:
        CheckpointError: No snapshot, one of another step, or weights that do not fit.
    """
    folder = Path(run_dir) / BEST_DIR
    info = read_best_info(run_dir)
    if info is None or info.get("step") != step:
        found = "none" if info is None else f"step {info.get('step')}"
        raise CheckpointError(f"{folder}: expected the best weights of step {step}, found "
                              f"{found}")
    weights = _load_weights(folder)
    _check_fit(folder, weights, model)
    _copy_into(model, weights)
    return info


def restore_best(run_dir: str | Path, checkpoint: str | Path | None) -> None:
    """Make ``<run_dir>/best/`` the copy in ``checkpoint`` (what the loop knew at that step).

    Without a checkpoint (a fresh run) or a copy in it (no validation improved yet), a
    ``best/`` on disk belongs to another run or to the interrupted run's future: it is removed.
    """
    run_dir = Path(run_dir)
    final = run_dir / BEST_DIR
    _clean_stale(run_dir, BEST_DIR)
    source = Path(checkpoint) / BEST_DIR if checkpoint is not None else None
    if source is None or not (source / WEIGHTS_FILE).is_file():
        if final.exists():
            shutil.rmtree(final)
        return
    tmp = run_dir / f".tmp-{BEST_DIR}-{os.getpid()}"
    _link_tree(source, tmp)
    _install(tmp, final)
