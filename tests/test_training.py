"""Loop plumbing: data order, schedule, atomic checkpoints, exact RNG/optimizer restore, metrics
log."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hanorec.checkpoints import CheckpointManager, LoopPosition, rng_state, set_rng_state
from hanorec.training import (
    EarlyStopping,
    EpochBatches,
    MetricsLogger,
    MicroStep,
    TrainConfig,
    Training,
    cosine_with_warmup,
    read_metrics,
    train_loop,
)


def test_epoch_batches_are_deterministic_disjoint_and_resumable():
    one = EpochBatches(10, 2, seed=3)
    assert len(one) == 5
    assert list(one.epoch(0)) == list(EpochBatches(10, 2, seed=3).epoch(0))
    assert list(one.epoch(0)) != list(one.epoch(1))
    assert list(one.epoch(1, start=2)) == list(one.epoch(1))[2:]
    # Two processes split each global batch of 4: together they see exactly the 1-process batch.
    single = list(EpochBatches(9, 4, seed=0).epoch(0))
    r0 = list(EpochBatches(9, 2, seed=0, rank=0, world=2).epoch(0))
    r1 = list(EpochBatches(9, 2, seed=0, rank=1, world=2).epoch(0))
    assert len(single) == len(r0) == len(r1) == 2  # 9 // 4, last partial batch dropped
    for s, a, b in zip(single, r0, r1):
        assert sorted(a + b) == sorted(s) and not set(a) & set(b)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        EpochBatches(3, 2, seed=0, world=2)


def test_cosine_with_warmup_values():
    """Warm-up 2 of 10 steps: factors (1/2, 1) then 0.5·(1+cos(π·(s−2)/8)); s=6 gives 0.5."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, 2, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping(patience=2)
    assert [stop.update(v) for v in (3.0, 2.0, 2.5, 2.1)] == [False, False, False, True]


def test_rng_state_round_trip_reproduces_every_generator():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def _tiny_training_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)  # a frozen part must not be saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = cosine_with_warmup(opt, 1, 10)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_rng(tmp_path):
    model, opt, sched = _tiny_training_state()
    manager = CheckpointManager(tmp_path, keep=2)
    path = manager.save(model, opt, sched,
                        LoopPosition(step=3, epoch=1, batch_in_epoch=2, extra={"best": 1.5}))
    assert path.name == "checkpoint-3" and (path / "trainable.safetensors").is_file()
    expected_next = torch.rand(3)

    torch.manual_seed(123)
    fresh, fresh_opt, fresh_sched = _tiny_training_state()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    pos = CheckpointManager.load(path, fresh, fresh_opt, fresh_sched)
    assert (pos.step, pos.epoch, pos.batch_in_epoch, pos.extra) == (3, 1, 2, {"best": 1.5})
    assert torch.equal(fresh[1].weight,
                       model[1].weight) and torch.equal(fresh[0].bias, model[0].bias)
    assert not torch.equal(fresh[0].weight, model[0].weight)  # frozen: not in the checkpoint
    assert fresh_sched.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    s_new, s_old = fresh_opt.state_dict()["state"], opt.state_dict()["state"]
    assert all(torch.equal(s_new[k]["exp_avg"], s_old[k]["exp_avg"]) for k in s_old)
    assert torch.equal(torch.rand(3), expected_next)


def test_checkpoints_are_pruned_to_keep(tmp_path):
    model, opt, sched = _tiny_training_state()
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save(model, opt, sched, LoopPosition(step=step))
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-2", "checkpoint-3"]


def test_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    model, opt, sched = _tiny_training_state()
    path = CheckpointManager(tmp_path).save(model, opt, sched, LoopPosition(step=1))
    other = torch.nn.Linear(3, 3)
    other_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(ValueError, match="does not fit the model"):
        CheckpointManager.load(path, other, other_opt, None)


def test_killed_save_never_replaces_the_last_good_checkpoint(tmp_path):
    """A process is SIGKILLed half-way through writing checkpoint-2 (after the weights, before
    the state): checkpoint-1 must stay the newest complete one, and the next save cleans up."""
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {os.getcwd()!r})
        from hanorec.checkpoints import CheckpointManager, LoopPosition
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        manager = CheckpointManager({str(tmp_path)!r})
        manager.save(model, opt, None, LoopPosition(step=1))
        def hang(tmp):
            print("WRITING", flush=True)
            time.sleep(60)
        with torch.no_grad():
            model.weight.add_(1.0)
        manager.save(model, opt, None, LoopPosition(step=2), write_hook=hang)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    manager = CheckpointManager(tmp_path)
    assert manager.latest().name == "checkpoint-1"
    assert list(tmp_path.glob(".tmp-checkpoint-2-*"))  # the torn write is left aside, not used
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager.save(model, opt, None, LoopPosition(step=3))
    assert not list(tmp_path.glob(".tmp-*"))
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-1", "checkpoint-3"]


def test_metrics_logger_truncates_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path)
    for step in (1, 2, 3):
        log.log(step, {"train/loss": 1.0 / step})
    MetricsLogger(path, resume_step=2).log(3, {"train/loss": 0.25})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/loss"] == 0.25
    assert json.loads(path.read_text().splitlines()[0])["train/loss"] == 1.0


@pytest.mark.parametrize(("steps", "calls", "on_start"), [(4, 2, False), (5, 3, False),
                                                          (4, 3, True)])
def test_train_loop_validates_every_eval_every_and_once_at_the_end(tmp_path, steps, calls,
                                                                   on_start):
    """eval_every 2: 4 steps validate at steps 2 and 4, and step 4's validation is the final
    one (not run twice on the same weights); 5 steps validate at 2, 4 and once more at the
    end; with eval_on_start also once before the first step, logged as step 0 with the
    untrained weights' loss. The loss of the least-squares toy falls and the weight moves."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False)
    start = model.weight.detach().clone()
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    cfg = TrainConfig(max_steps=steps, eval_every=2, per_device_batch_size=4, save_every=0,
                      eval_on_start=on_start)
    untrained = float((model(x) - y).pow(2).mean())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Training(Accelerator(cpu=True), model, optimizer,
                   torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), cfg,
                   EpochBatches(16, 4, seed=0), steps, tmp_path)

    def step(ids: list[int], _: int) -> MicroStep:
        loss = (model(x[ids]) - y[ids]).pow(2).mean()
        return MicroStep(loss, {"train/loss": float(loss)}, 1.0)

    validations: list[float] = []

    def validate() -> dict[str, float]:
        with torch.no_grad():
            validations.append(float((model(x) - y).pow(2).mean()))
        return {"eval/loss": validations[-1]}

    result = train_loop(run, step, validate=validate, desc="toy")
    assert len(validations) == calls
    assert result.validation == {"eval/loss": validations[-1]}
    assert validations[-1] < validations[0] and not torch.equal(model.weight, start)
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/loss" in r]
    assert len(logged) == calls
    assert (logged[0]["step"] == 0 and logged[0]["eval/loss"] == untrained) is on_start
