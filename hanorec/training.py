"""The training loop of every stage (SFT, DPO, RecPO) and the plumbing it needs, written once.

* :func:`train_loop` — the loop itself: resume, then per optimizer step the micro-batches of
  the deterministic order (each through the stage's step function, gradient sync only on the
  last), the optimizer step, logging, periodic validation with early stopping on any validation
  value (the best one's weights kept in ``best/``, loaded back at the end on request), a
  training-time budget, checkpoints, and a final validation. A stage supplies only its step
  function (one micro-batch → loss and values to log, :class:`MicroStep`) and, optionally, its
  validation.
* ``TrainConfig`` — the optimisation fields every stage has (learning rate, schedule,
  accumulation, precision, checkpoint cadence, early stopping and the best model, time budget).
* ``EpochBatches`` — a deterministic, resumable batch order: the permutation of an epoch is a
  function of (seed, epoch) only, and each process of a distributed run takes its own slice of
  every global batch, so "where the data was" is just ``(epoch, batch_in_epoch)``.
* checkpoints (:mod:`hanorec.checkpoints`): atomic, verified, with every RNG state and the data
  position, so a resumed run ends bit-identical to an uninterrupted one (on CPU).
* ``MetricsLogger`` — one JSON object per line in ``metrics.jsonl``; on resume, lines past the
  resumed step are dropped so the log reads as one uninterrupted run (a line torn by a kill is
  dropped too).
* ``cosine_with_warmup`` and ``EarlyStopping`` (the best value of ``metric_for_best_model``,
  its step and validation, and the patience count; Hugging Face Trainer's field names).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from hanorec.checkpoints import (
    BEST_DIR,
    CheckpointManager,
    LoopPosition,
    load_best,
    restore_best,
    write_best,
)
from hanorec.config import FieldError

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training stage."""

    learning_rate: float = field(default=1e-4, metadata={
        "help": "Peak AdamW learning rate (HaNoRec: 1e-4 with LoRA)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Gradient clipping norm (0 disables)."})
    num_epochs: float = field(default=1.0, metadata={
        "help": "Training epochs (fractions allowed); ignored when max_steps > 0."})
    max_steps: int = field(default=0, metadata={
        "help": "Optimizer steps to run; 0 means num_epochs worth."})
    per_device_batch_size: int = field(default=2, metadata={
        "help": "Examples per process per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step."})
    warmup_ratio: float = field(default=0.05, metadata={
        "help": "Fraction of steps with linear warm-up before the cosine decay."})
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = field(default="no", metadata={
        "help": "Mixed precision: no (fp32), bf16 or fp16 autocast (need hardware that has "
                "them), or auto: bf16 where a bf16 matmul measures faster than fp32 on the "
                "run's device at stage start (hanorec.hardware.bf16_speedup; CPU flags do not "
                "decide), fp32 otherwise. The run log prints the choice and the measured "
                "ratio; <stage>/config.yaml records the resolved value."})
    eval_every: int = field(default=0, metadata={
        "help": "Evaluate on the validation split every N optimizer steps (0: only at the end)."})
    eval_on_start: bool = field(default=False, metadata={
        "help": "Also validate before the first optimizer step (logged as step 0): where the "
                "validation curve starts, e.g. the SFT model a preference stage begins from "
                "(TRL's eval_on_start)."})
    eval_examples: int = field(default=64, metadata={
        "help": "Validation examples used by the periodic evaluation (0: all)."})
    save_every: int = field(default=0, metadata={
        "help": "Write a checkpoint every N optimizer steps (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "How many checkpoints to keep on disk (oldest deleted first)."})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "Stop after N periodic evaluations without improvement of "
                "metric_for_best_model (0: off)."})
    metric_for_best_model: str = field(default="eval/loss", metadata={
        "help": "The validation value that early stopping and the best weights follow: a key "
                "of the stage's validation (eval/loss, eval/candidates_hr1, eval/accuracies, "
                "...; Hugging Face Trainer's name). Every improvement writes the trainable "
                "weights to <stage>/best/."})
    greater_is_better: bool | None = field(default=None, metadata={
        "help": "Whether a larger metric_for_best_model is better; unset: false for names "
                "containing 'loss', true otherwise."})
    load_best_model_at_end: bool = field(default=False, metadata={
        "help": "When training ends (or stops early), load back the weights of the best "
                "validation (<stage>/best/) so the stage exports them and reports their "
                "validation."})
    max_train_seconds: float = field(default=0.0, metadata={
        "help": "Stop, as an early stop, once the training time (evaluation excluded, counted "
                "across --resume) passes this many seconds (0: off): a wall-time budget."})
    log_every: int = field(default=1, metadata={
        "help": "Write training metrics every N optimizer steps."})
    resume: bool = field(default=False, metadata={
        "help": "Resume from the newest complete checkpoint in the run directory."})
    debug_gradients_path: str | None = field(default=None, metadata={
        "help": "Write the (process-averaged) gradients of the first optimizer step to this "
                "safetensors file and continue; used by the distributed-equivalence test."})

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
            at_least("log_every", 1), at_least("max_train_seconds", 0),
            ("metric_for_best_model", bool(self.metric_for_best_model.strip()),
             "must name a validation value (e.g. eval/loss), got an empty string"),
        ]

    def best_is_greater(self) -> bool:
        """Whether a larger ``metric_for_best_model`` is better (``greater_is_better``, or the
        Hugging Face default: lower for names containing "loss", higher otherwise)."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return "loss" not in self.metric_for_best_model


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

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, rank: int = 0,
                 world: int = 1, shuffle: bool = True):
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


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EarlyStopping:
    """The best value of one validation metric, and a stop after ``patience`` evaluations
    without improving it.

    Besides the best value it keeps the step that reached it and that step's whole validation
    (what :func:`train_loop` returns when it loads the best weights back); all of it is in
    :meth:`state_dict`, so it survives ``--resume`` inside a checkpoint.

    Args:
        patience: Evaluations without improvement before :meth:`update` says stop (0: never).
        greater_is_better: True when a larger value is better (a hit rate), False for a loss.
    """

    def __init__(self, patience: int, *, greater_is_better: bool = False):
        self.patience, self.greater_is_better = patience, greater_is_better
        self.best = -math.inf if greater_is_better else math.inf
        self.bad = 0
        self.best_step: int | None = None
        self.best_values: dict[str, Any] = {}

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (NaN never does)."""
        if self.greater_is_better:
            return value > self.best + 1e-12
        return value < self.best - 1e-12

    def observe(self, value: float, step: int = 0,
                values: dict[str, Any] | None = None) -> bool:
        """Record a validation of ``step``; return True when it is a new best."""
        if not self.improves(value):
            self.bad += 1
            return False
        self.best, self.bad, self.best_step = value, 0, step
        self.best_values = _plain(values or {})
        return True

    def update(self, value: float, step: int = 0, values: dict[str, Any] | None = None) -> bool:
        """Record a value (:meth:`observe`); return True when training should stop."""
        self.observe(value, step, values)
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "best_step": self.best_step,
                "best_values": self.best_values}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a checkpoint written before best tracking has no step)."""
        self.best, self.bad = float(state["best"]), int(state["bad"])
        step = state.get("best_step")
        self.best_step = None if step is None else int(step)
        self.best_values = dict(state.get("best_values") or {})


def metric_value(values: dict[str, Any], name: str, owner: str = "TrainConfig") -> float:
    """``values[name]`` as a float; a clear error naming the metric and the keys present.

    Raises:
        FieldError: ``name`` is not a key of ``values`` (``owner`` names the recipe section).
    """
    if name not in values:
        raise FieldError(owner, "metric_for_best_model",
                         f"{name!r} is not among the validation's values "
                         f"({', '.join(sorted(values)) or 'none'}); name one of them")
    return float(values[name])


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Numbers as Python floats (what ``torch.load(weights_only=True)`` reads back)."""
    return {k: float(v) if isinstance(v, (int, float, np.number, torch.Tensor)) else v
            for k, v in values.items()}


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
            kept = [ln for ln in self.path.read_text(errors="replace").splitlines()
                    if _step_of(ln) is not None and _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v)
                    for k, v in values.items()})
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


def batch_stream(order: EpochBatches,
                 position: LoopPosition) -> Iterator[tuple[int, int, list[int]]]:
    """Endless (epoch, batch index, ids) from the saved data position onwards."""
    epoch, start = position.epoch, position.batch_in_epoch
    while True:
        for offset, ids in enumerate(order.epoch(epoch, start=start)):
            yield epoch, start + offset, ids
        epoch, start = epoch + 1, 0


# --------------------------------------------------------------------------- the loop


@dataclass
class MicroStep:
    """A stage's step function's answer for one micro-batch.

    Attributes:
        loss: What to backpropagate: the micro-batch's share of the optimizer step's loss
            (already divided by the number of micro-batches, and normalised as the stage needs).
        metrics: Values to log. The step logs ``Σ metrics / Σ weight`` over its micro-batches.
        weight: The micro-batch's weight in that ratio: 1 for a plain mean over micro-batches,
            or a count (tokens, rows) when ``metrics`` hold sums over it.
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    weight: float = 1.0


#: ``(this process's row ids, optimizer step) -> MicroStep``.
StepFn = Callable[[list[int], int], MicroStep]


@dataclass
class Training:
    """A run ready for :func:`train_loop` (built by :func:`hanorec.runtime.prepare_training`).

    Attributes:
        accelerator: The run's accelerator.
        model: The model, prepared by the accelerator.
        optimizer: Its optimizer, prepared by the accelerator.
        scheduler: The learning-rate schedule.
        cfg: The stage's optimisation section.
        order: The deterministic batch order.
        steps: Optimizer steps to run.
        out_dir: The stage folder (checkpoints, ``metrics.jsonl``).
    """

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cfg: TrainConfig
    order: EpochBatches
    steps: int
    out_dir: Path

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without its distributed wrapper (what is saved and evaluated)."""
        return self.accelerator.unwrap_model(self.model)


@dataclass
class LoopResult:
    """Where :func:`train_loop` ended.

    Attributes:
        position: The final position (steps done, data position).
        train_seconds: Training time without evaluation, counting on after a resume.
        validation: The final validation (``{}`` without one): with ``load_best_model_at_end``,
            that of the best step whose weights the model holds again.
        best_step: The step of the best validation (None without validation).
        best_metric: Its ``metric_for_best_model`` value (None without validation).
    """

    position: LoopPosition
    train_seconds: float
    validation: dict[str, float]
    best_step: int | None = None
    best_metric: float | None = None


def train_loop(run: Training, step_fn: StepFn, *,
               validate: Callable[[], dict[str, float]] | None = None,
               before_step: Callable[[int], dict[str, float]] | None = None,
               desc: str = "train") -> LoopResult:
    """Run ``run.steps`` optimizer steps of ``step_fn`` from the resumed position.

    Per optimizer step: ``before_step(step)`` (its values join the step's log), then
    ``gradient_accumulation_steps`` micro-batches of ``run.order``, each through
    ``step_fn(ids, step)`` and backward (DDP syncs gradients on the last one only), then the
    optimizer step (:func:`optimizer_step`). Every ``log_every`` steps it logs the step's values
    (:class:`MicroStep`), ``train/grad_norm``, ``train/lr``, ``train/epoch``,
    ``train/examples`` (``steps × accumulation × global batch``) and ``train/seconds``
    (training time without evaluation, counting on after a resume). Every ``eval_every`` steps
    it logs ``validate()`` with ``eval/seconds``; a validation that improves
    ``metric_for_best_model`` writes the trainable weights to ``<out_dir>/best/``, and
    ``early_stopping_patience`` validations without improvement stop the run, as does a
    training time past ``max_train_seconds``. Every ``save_every`` steps, and when it stops,
    it writes a checkpoint (on the main process). At the end it runs and logs ``validate()``
    once more, unless the last step was just validated (then that validation is the final
    one); with ``load_best_model_at_end`` it then loads the best weights back into the model
    and returns their validation (already measured when they were the best; not re-run).

    Args:
        run: The prepared run.
        step_fn: The stage's step function.
        validate: The stage's validation (``eval/loss`` and more); None: no validation.
        before_step: Work before a step's micro-batches (e.g. a refresh), returning values to log.
        desc: Label of the progress bar.

    Returns:
        The final position, the training seconds, the final validation and the best step.

    Raises:
        FieldError: ``metric_for_best_model`` is not a key of the validation.
    """
    cfg, accelerator = run.cfg, run.accelerator
    position, tracker, clock = _resumed_state(run)
    log = MetricsLogger(run.out_dir / "metrics.jsonl", enabled=accelerator.is_main_process,
                        resume_step=position.step if cfg.resume else None)
    val, validated_at = _resumed_validation(position)
    stopped = _stop_reason(cfg, tracker, clock)
    if stopped:
        print(f"--resume: step {position.step} already meets a stop rule ({stopped}); "
              "no further steps")
    batches = batch_stream(run.order, position)
    bar = tqdm(total=run.steps, initial=position.step, desc=desc,
               disable=not accelerator.is_main_process)
    run.model.train()
    if validate is not None and cfg.eval_on_start and position.step == 0:  # not on a resume
        start = clock.evaluation(validate)
        metric_value(start, cfg.metric_for_best_model, type(cfg).__name__)  # fail early
        log.log(0, {**start, "eval/seconds": clock.last_evaluation})
        _track(run, tracker, start, 0)  # the starting model is a candidate for the best too
    while stopped is None and position.step < run.steps:
        values = _optimizer_step_of(run, step_fn, batches, position, before_step)
        position.step += 1
        bar.update()
        if position.step % cfg.log_every == 0 or position.step == run.steps:
            log.log(position.step, {**values, **_progress(run, position, clock)})
        if validate is not None and cfg.eval_every and position.step % cfg.eval_every == 0:
            val, validated_at = clock.evaluation(validate), position.step
            log.log(position.step, {**val, "eval/seconds": clock.last_evaluation})
            _track(run, tracker, val, position.step)
        stopped = _stop_reason(cfg, tracker, clock)
        if (cfg.save_every and position.step % cfg.save_every == 0) or stopped:
            _save(run, position, tracker, clock, val if validated_at == position.step else None)
        if stopped:
            print(f"early stopping at step {position.step}: {stopped}")
    bar.close()
    train_seconds = clock.training()
    if validate is not None and validated_at != position.step:  # not twice on the same step
        val, validated_at = validate(), position.step
        log.log(position.step, val)
        _track(run, tracker, val, position.step)
    final = _best_at_end(run, tracker, position, val if validated_at == position.step else {})
    best = tracker.best if tracker.best_step is not None else None
    return LoopResult(position, train_seconds, final, tracker.best_step, best)


def _resumed_state(run: Training) -> tuple[LoopPosition, EarlyStopping, _Clock]:
    """The position, the best-metric state and the clock to start from (a checkpoint's under
    ``--resume``), with ``best/`` put back to what that checkpoint knew."""
    cfg = run.cfg
    position, checkpoint = resume_checkpoint(cfg, run.out_dir, run.unwrapped, run.optimizer,
                                             run.scheduler)
    if run.accelerator.is_main_process:
        restore_best(run.out_dir, checkpoint)
    run.accelerator.wait_for_everyone()
    tracker = EarlyStopping(cfg.early_stopping_patience, greater_is_better=cfg.best_is_greater())
    if "early_stopping" in position.extra:
        tracker.load_state_dict(position.extra["early_stopping"])
    return position, tracker, _Clock(float(position.extra.get("train_seconds", 0.0)))


def _stop_reason(cfg: TrainConfig, tracker: EarlyStopping, clock: _Clock) -> str | None:
    """Why the run must stop now (patience used up, time budget spent), or None.

    Read from the state, so a run resumed from its stop's checkpoint stops again, unless the
    recipe now allows more (a larger patience or budget).
    """
    if tracker.should_stop:
        return (f"no improvement of {cfg.metric_for_best_model} in "
                f"{cfg.early_stopping_patience} evaluations")
    if 0 < cfg.max_train_seconds <= clock.training():
        return (f"training time {clock.training():.0f} s reached max_train_seconds "
                f"{cfg.max_train_seconds:g}")
    return None


def _resumed_validation(position: LoopPosition) -> tuple[dict[str, float], int]:
    """The validation a resumed checkpoint saved of its own step (``{}, -1`` without one)."""
    saved = position.extra.get("validation") or {}
    if saved.get("step") == position.step and position.step > 0:
        return dict(saved.get("values") or {}), position.step
    return {}, -1


def _track(run: Training, tracker: EarlyStopping, values: dict[str, float], step: int) -> None:
    """Record a validation of ``step``; when it is the best so far, write ``best/``."""
    cfg = run.cfg
    value = metric_value(values, cfg.metric_for_best_model, type(cfg).__name__)
    if tracker.observe(value, step, values) and run.accelerator.is_main_process:
        write_best(run.out_dir, run.unwrapped,
                   {"step": step, "metric": cfg.metric_for_best_model, "value": value,
                    "greater_is_better": tracker.greater_is_better})
    run.accelerator.wait_for_everyone()


def _best_at_end(run: Training, tracker: EarlyStopping, position: LoopPosition,
                 final: dict[str, float]) -> dict[str, float]:
    """With ``load_best_model_at_end``, load the best weights back and return their
    validation; otherwise (or when the last step is the best) ``final`` as it is."""
    cfg, best_step = run.cfg, tracker.best_step
    if not cfg.load_best_model_at_end or best_step is None:
        return final
    name = cfg.metric_for_best_model
    if best_step == position.step:
        print(f"load_best_model_at_end: the last step ({best_step}) is the best "
              f"({name} {tracker.best:.6g}); nothing to restore")
        return final
    load_best(run.out_dir, run.unwrapped, step=best_step)
    last = final.get(name)
    print(f"load_best_model_at_end: restored the weights of step {best_step} ({name} "
          f"{tracker.best:.6g}; the last step, {position.step}, had "
          f"{'no validation' if last is None else f'{float(last):.6g}'})")
    return dict(tracker.best_values)


class _Clock:
    """Training seconds net of evaluation, starting from those of the resumed checkpoint."""

    def __init__(self, resumed_seconds: float) -> None:
        self.started, self.eval_seconds = time.time(), -resumed_seconds
        self.last_evaluation = 0.0

    def evaluation(self, validate: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Run ``validate`` and keep its time out of the training seconds."""
        started = time.time()
        values = validate()
        self.last_evaluation = time.time() - started
        self.eval_seconds += self.last_evaluation
        return values

    def training(self) -> float:
        return time.time() - self.started - self.eval_seconds


def _optimizer_step_of(run: Training, step_fn: StepFn,
                       batches: Iterator[tuple[int, int, list[int]]],
                       position: LoopPosition,
                       before_step: Callable[[int], dict[str, float]] | None) -> dict[str, float]:
    """One optimizer step: its micro-batches, backward, the update; returns the step's values."""
    cfg, accelerator = run.cfg, run.accelerator
    extra = before_step(position.step) if before_step is not None else {}
    sums: dict[str, float] = {}
    weight = 0.0
    for micro in range(cfg.gradient_accumulation_steps):
        epoch, index, ids = next(batches)
        last = micro == cfg.gradient_accumulation_steps - 1
        with accelerator.no_sync(run.model) if not last else nullcontext():
            out = step_fn(ids, position.step)
            accelerator.backward(out.loss)
        for key, value in out.metrics.items():
            sums[key] = sums.get(key, 0.0) + value
        weight += out.weight
        position.epoch, position.batch_in_epoch = epoch, index + 1
    if cfg.debug_gradients_path and position.step == 0 and accelerator.is_main_process:
        save_gradients(run.unwrapped, cfg.debug_gradients_path)
    values = {key: total / (weight or 1.0) for key, total in sums.items()}
    grad_norm = optimizer_step(accelerator, run.model, run.optimizer, run.scheduler, cfg)
    return {**values, **extra, "train/grad_norm": grad_norm,
            "train/lr": run.scheduler.get_last_lr()[0]}


def _progress(run: Training, position: LoopPosition, clock: _Clock) -> dict[str, float]:
    """Where the run is: epochs, examples seen, training seconds."""
    return {"train/epoch": position.epoch + position.batch_in_epoch / len(run.order),
            "train/examples": position.step * run.cfg.gradient_accumulation_steps
            * run.order.global_batch,
            "train/seconds": clock.training()}


def _save(run: Training, position: LoopPosition, tracker: EarlyStopping, clock: _Clock,
          validation: dict[str, float] | None) -> None:
    """A checkpoint of the run (main process) with what a resume needs beyond the weights:
    the best-metric state, the clock, this step's validation and a copy of ``best/``."""
    extra = position.extra
    extra["early_stopping"] = tracker.state_dict()
    extra["train_seconds"] = clock.training()
    extra.pop("validation", None)
    if validation is not None:
        extra["validation"] = {"step": position.step, "values": _plain(validation)}
    if run.accelerator.is_main_process:
        CheckpointManager(run.out_dir, keep=run.cfg.keep_checkpoints).save(
            run.unwrapped, run.optimizer, run.scheduler, position,
            include={BEST_DIR: run.out_dir / BEST_DIR})
    run.accelerator.wait_for_everyone()


def maybe_resume(cfg: TrainConfig, out_dir: Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any) -> LoopPosition:
    """Restore the newest checkpoint when ``--resume`` is on (a fresh position otherwise)."""
    return resume_checkpoint(cfg, out_dir, model, optimizer, scheduler)[0]


def resume_checkpoint(cfg: TrainConfig, out_dir: Path, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer,
                      scheduler: Any) -> tuple[LoopPosition, Path | None]:
    """:func:`maybe_resume`, also returning the checkpoint it restored.

    Returns:
        Its position and path, or a fresh position and None (no ``--resume``, no checkpoint).
    """
    if not cfg.resume:
        return LoopPosition(), None
    manager = CheckpointManager(out_dir)
    latest, position = manager.resume(model, optimizer, scheduler)  # skips damaged ones
    if latest is None:
        print(f"--resume: no checkpoint in {out_dir}, starting from scratch")
        return LoopPosition(), None
    print(f"resumed from {latest} (step {position.step})")
    return position, latest


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig) -> float:
    """Clip, step, schedule, zero; returns the pre-clip gradient norm."""
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def save_gradients(model: torch.nn.Module, path: str | Path) -> None:
    """Write the gradients of the trainable parameters (the distributed-equivalence check)."""
    from safetensors.torch import save_file

    grads = {n: p.grad.detach().cpu().contiguous() for n, p in model.named_parameters()
             if p.grad is not None}
    save_file(grads, str(path))
