"""`--resume` on damaged checkpoints (issue class 6): the newest checkpoint is verified in full
and the newest valid one is used, with a one-line warning; each test damages its own files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hanorec.checkpoints import CheckpointError, CheckpointManager, LoopPosition
from hanorec.training import (
    MetricsLogger,
    TrainConfig,
    cosine_with_warmup,
    maybe_resume,
    read_metrics,
)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # like a frozen backbone under an adapter
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, optimizer, cosine_with_warmup(optimizer, 1, 10)


def _train_and_save(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints after steps 2 and 4; returns the trainable weights saved at each."""
    model, optimizer, scheduler = _setup()
    manager, saved = CheckpointManager(run_dir, keep=3), {}
    for step in range(1, 5):
        model(torch.ones(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            manager.save(model, optimizer, scheduler, LoopPosition(step=step, epoch=0,
                                                                   batch_in_epoch=step))
            saved[step] = {n: p.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad}
    return saved


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGES = {
    "truncated safetensors": lambda c: _truncate(c / "trainable.safetensors", 0.5),
    "zero-byte safetensors": lambda c: _truncate(c / "trainable.safetensors", 0.0),
    "truncated state.pt": lambda c: _truncate(c / "state.pt", 0.6),
    "foreign keys": lambda c: save_file({"other.weight": torch.zeros(2, 4)},
                                        str(c / "trainable.safetensors")),
    "wrong shapes": lambda c: save_file({"1.weight": torch.zeros(3, 4), "1.bias": torch.zeros(3)},
                                        str(c / "trainable.safetensors")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_falls_back_to_the_newest_valid_checkpoint(tmp_path, damage, capsys):
    """Damaging checkpoint-4 stopped --resume with a safetensors/zip traceback although
    checkpoint-2 was intact; now checkpoint-2 is restored and one warning line names the cause."""
    saved = _train_and_save(tmp_path)
    DAMAGES[damage](tmp_path / "checkpoint-4")
    model, optimizer, scheduler = _setup(seed=1)
    capsys.readouterr()
    position = maybe_resume(TrainConfig(resume=True), tmp_path, model, optimizer, scheduler)
    out = capsys.readouterr().out.splitlines()
    assert position.step == 2
    assert out[0].startswith("warning: --resume skips checkpoint-4: ") and len(out) == 2
    assert out[1] == f"resumed from {tmp_path / 'checkpoint-2'} (step 2)"
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, saved[2][name])


def test_resume_with_no_usable_checkpoint_is_a_clear_error(tmp_path):
    _train_and_save(tmp_path)
    for step in (2, 4):
        _truncate(tmp_path / f"checkpoint-{step}" / "state.pt", 0.3)
    model, optimizer, scheduler = _setup()
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints can be resumed"):
        CheckpointManager(tmp_path).resume(model, optimizer, scheduler)


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsLogger(path, resume_step=2)
    assert [row["step"] for row in read_metrics(path)] == [1, 2]


def test_training_fields_are_range_checked():
    """Non-positive batch sizes or learning rates are refused when the recipe is read."""
    from hanorec.config import FieldError

    for bad in ({"per_device_batch_size": 0}, {"learning_rate": 0.0},
                {"gradient_accumulation_steps": 0}, {"warmup_ratio": 1.5}):
        with pytest.raises(FieldError, match=next(iter(bad))):
            TrainConfig(**bad)
