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


# --------------------------------------------------------------------------- best model


LOSS_SCRIPT = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5, 10: 2.7, 12: 2.9}  # best at 4, lower is better
HR_SCRIPT = {2: 0.1, 4: 0.5, 6: 0.3, 8: 0.2, 10: 0.15, 12: 0.1}  # best at 4, higher is better


def _scripted_run(out_dir, script, *, steps=12, crash_at=None, **cfg_fields):
    """A least-squares toy whose validation reports ``script[step]`` under the metric's name
    (plus eval/loss), and the weights it saw at every validation. ``crash_at``: the step
    function raises at that step (an interrupted run)."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False)
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    cfg = TrainConfig(**{"max_steps": steps, "per_device_batch_size": 4, "eval_every": 2,
                         **cfg_fields})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Training(Accelerator(cpu=True), model, optimizer,
                   torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), cfg,
                   EpochBatches(16, 4, seed=0), steps, out_dir)
    seen = {"step": 0, "weights": {}}

    def step(ids: list[int], at: int) -> MicroStep:
        if at == crash_at:
            raise KeyboardInterrupt("killed")
        seen["step"] = at + 1
        loss = (model(x[ids]) - y[ids]).pow(2).mean()
        return MicroStep(loss, {"train/loss": float(loss)}, 1.0)

    def validate() -> dict[str, float]:
        seen["weights"][seen["step"]] = model.weight.detach().clone()
        value = script[seen["step"]]
        return {"eval/loss": float((model(x) - y).pow(2).mean()), cfg.metric_for_best_model: value,
                "eval/step": float(seen["step"])}

    return run, step, validate, seen


@pytest.mark.parametrize("load_best", [True, False])
def test_early_stopping_on_a_metric_restores_the_best_step(tmp_path, load_best):
    """A hit rate rising to step 4 then falling, patience 2: the run stops at step 8 (6 and 8
    did not improve); with load_best_model_at_end the model then holds step 4's weights (not
    step 8's) and returns step 4's validation; without it the last weights stay. Either way
    best/ holds step 4's weights and says so, and the result names step 4 and its value."""
    from safetensors.torch import load_file

    run, step, validate, seen = _scripted_run(
        tmp_path, HR_SCRIPT, metric_for_best_model="eval/hr1", early_stopping_patience=2,
        load_best_model_at_end=load_best)
    result = train_loop(run, step, validate=validate, desc="toy")
    weights = seen["weights"]
    assert result.position.step == 8 and sorted(weights) == [2, 4, 6, 8]
    assert (result.best_step, result.best_metric) == (4, 0.5)
    assert not torch.equal(weights[4], weights[8])
    restored = run.model.weight.detach()
    assert torch.equal(restored, weights[4] if load_best else weights[8])
    assert result.validation["eval/step"] == (4.0 if load_best else 8.0)
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (info["step"], info["metric"], info["value"]) == (4, "eval/hr1", 0.5)
    assert torch.equal(load_file(str(tmp_path / "best" / "trainable.safetensors"))["weight"],
                       weights[4])
    logged = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/hr1" in r]
    assert logged == [2, 4, 6, 8]  # the restored validation is not logged a second time


@pytest.mark.parametrize(("metric", "greater", "script"), [
    ("eval/loss", None, LOSS_SCRIPT),       # "loss" in the name: lower is better
    ("eval/hr1", None, HR_SCRIPT),          # otherwise higher is better
    ("eval/score", False, LOSS_SCRIPT),     # explicit choices override the name
    ("eval/loss", True, HR_SCRIPT),
])
def test_greater_is_better_both_ways(tmp_path, metric, greater, script):
    """Each script peaks (in its direction) at step 4; read the wrong way round the best would
    be step 2 and the run would stop at step 6."""
    run, step, validate, seen = _scripted_run(
        tmp_path, script, metric_for_best_model=metric, greater_is_better=greater,
        early_stopping_patience=2, load_best_model_at_end=True)
    result = train_loop(run, step, validate=validate, desc="toy")
    assert (result.position.step, result.best_step, result.best_metric) == (8, 4, script[4])
    assert torch.equal(run.model.weight.detach(), seen["weights"][4])


@pytest.mark.parametrize("crashed_run_improved_later", [False, True])
def test_resume_ends_with_the_same_best_weights(tmp_path, crashed_run_improved_later):
    """Run A goes straight: best step 4, stops at step 10 (patience 3). Run B checkpoints every
    3 steps and dies at step 9, so it resumes from checkpoint-6; it must end like A: stopped at
    10, best step 4, A's restored weights and A's returned validation. In the second case the
    dying run's validation at step 8 had improved (a nondeterministic validation), so best/ on
    disk holds step 8 when it dies: the resume must put back the snapshot checkpoint-6 knew."""
    settings = {"early_stopping_patience": 3, "load_best_model_at_end": True}
    run_a, step_a, validate_a, _ = _scripted_run(tmp_path / "a", LOSS_SCRIPT, **settings)
    result_a = train_loop(run_a, step_a, validate=validate_a, desc="a")
    assert (result_a.position.step, result_a.best_step) == (10, 4)

    dying_script = {**LOSS_SCRIPT, 8: 0.5} if crashed_run_improved_later else LOSS_SCRIPT
    run_b, step_b, validate_b, _ = _scripted_run(tmp_path / "b", dying_script, save_every=3,
                                                 crash_at=8, **settings)
    with pytest.raises(KeyboardInterrupt):
        train_loop(run_b, step_b, validate=validate_b, desc="b")
    best_info = json.loads((tmp_path / "b" / "best" / "best.json").read_text())
    assert best_info["step"] == (8 if crashed_run_improved_later else 4)

    run_c, step_c, validate_c, _ = _scripted_run(tmp_path / "b", LOSS_SCRIPT, save_every=3,
                                                 resume=True, **settings)
    result_c = train_loop(run_c, step_c, validate=validate_c, desc="b resumed")
    assert (result_c.position.step, result_c.best_step) == (10, 4)
    assert result_c.best_metric == result_a.best_metric == 1.0
    assert torch.equal(run_c.model.weight, run_a.model.weight)
    assert result_c.validation == result_a.validation
    b_rows = [(r["step"], r["eval/loss"]) for r in read_metrics(tmp_path / "b" / "metrics.jsonl")
              if "eval/loss" in r]
    a_rows = [(r["step"], r["eval/loss"]) for r in read_metrics(tmp_path / "a" / "metrics.jsonl")
              if "eval/loss" in r]
    assert b_rows == a_rows


@pytest.mark.parametrize("more_patience", [False, True])
def test_resuming_a_stopped_run_trains_no_further(tmp_path, capsys, more_patience):
    """The early stop's checkpoint holds the used-up patience: resuming it (say, after a kill
    during the export) runs no step and ends with the same best weights and validation. A
    recipe that now allows more patience (5) trains on from step 8 to the last step, 12."""
    settings = {"load_best_model_at_end": True, "metric_for_best_model": "eval/hr1"}
    run, step, validate, _ = _scripted_run(tmp_path, HR_SCRIPT, early_stopping_patience=2,
                                           **settings)
    first = train_loop(run, step, validate=validate, desc="first")
    again_run, again_step, again_validate, seen = _scripted_run(
        tmp_path, HR_SCRIPT, resume=True, early_stopping_patience=5 if more_patience else 2,
        **settings)
    again = train_loop(again_run, again_step, validate=again_validate, desc="again")
    assert (again.best_step, again.validation) == (4, first.validation)
    assert torch.equal(again_run.model.weight, run.model.weight)
    if more_patience:
        assert again.position.step == 12 and sorted(seen["weights"]) == [10, 12]
    else:
        assert again.position.step == 8 and not seen["weights"]  # no step, no validation
        assert "step 8 already meets a stop rule" in capsys.readouterr().out


def test_an_unknown_metric_is_a_clear_error(tmp_path):
    from hanorec.config import FieldError

    run, step, validate, _ = _scripted_run(tmp_path, HR_SCRIPT, metric_for_best_model="eval/hr1")
    original = validate

    def without_metric() -> dict[str, float]:
        values = original()
        values.pop("eval/hr1")
        return values

    with pytest.raises(FieldError, match=r"metric_for_best_model: 'eval/hr1' is not among the "
                                         r"validation's values \(eval/loss, eval/step\)"):
        train_loop(run, step, validate=without_metric, desc="toy")


def test_max_train_seconds_stops_like_an_early_stop(tmp_path, monkeypatch):
    """A fake training clock (10 s per step, no real timing): a 35 s budget stops after step 4,
    writes that step's checkpoint, validates the stopped weights once, and restores the best."""
    from hanorec import training

    run, step, validate, seen = _scripted_run(
        tmp_path, {3: 0.5, 4: 0.1}, metric_for_best_model="eval/hr1", max_train_seconds=35,
        eval_every=3, load_best_model_at_end=True)
    monkeypatch.setattr(training._Clock, "training", lambda self: 10.0 * seen["step"])
    result = train_loop(run, step, validate=validate, desc="toy")
    assert result.position.step == 4 and (tmp_path / "checkpoint-4").is_dir()
    assert sorted(seen["weights"]) == [3, 4]  # periodic at 3, final at the stop
    assert (result.best_step, result.validation["eval/step"]) == (3, 3.0)
    assert torch.equal(run.model.weight.detach(), seen["weights"][3])


def test_the_starting_model_can_be_the_best(tmp_path):
    """eval_on_start: a run whose validation only falls after step 0 (0.6, then 0.5, 0.4, ...)
    stops after patience 2 at step 4 and restores the starting weights — step 0 is a candidate
    for the best like any validation (a preference stage that only hurts gives back its SFT
    model), not ignored."""
    script = {0: 0.6, **{s: 0.6 - 0.05 * s for s in range(1, 13)}}
    run, step, validate, seen = _scripted_run(
        tmp_path, script, metric_for_best_model="eval/hr1", early_stopping_patience=2,
        load_best_model_at_end=True, eval_on_start=True)
    result = train_loop(run, step, validate=validate, desc="toy")
    assert (result.position.step, result.best_step, result.best_metric) == (4, 0, 0.6)
    assert torch.equal(run.model.weight.detach(), seen["weights"][0])
    assert not torch.equal(seen["weights"][0], seen["weights"][4])
