"""The best model end to end in the SFT stage: the exported adapter is the restored best step's,
the recipe's config.yaml records the resolved precision, and the summary reports the restored
step's validation."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hanorec import sft
from hanorec.training import read_metrics


@pytest.fixture
def fresh_accelerator_state():
    """mixed_precision auto may resolve to bf16 here; accelerate keeps one precision per
    process, so reset its state around the test (the other tests run in fp32)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_sft_exports_the_restored_best_step(tiny_recipe, capsys, fresh_accelerator_state):
    """Eval every 2 of 6 steps, "best" read as the highest validation loss (so the best is an
    early step while the loss falls): the final adapter must hold best/'s weights, not the last
    step's, and summary.json must carry that step's logged validation."""
    recipe = tiny_recipe("tiny-llava", sft={
        "max_train_examples": 4, "max_steps": 6, "learning_rate": 1e-2, "eval_every": 2,
        "metric_for_best_model": "eval/loss", "greater_is_better": True,
        "load_best_model_at_end": True, "mixed_precision": "auto"})
    final = sft.main(["--config", str(recipe)])
    stage = final.parent
    info = json.loads((stage / "best" / "best.json").read_text())
    rows = {r["step"]: r for r in read_metrics(stage / "metrics.jsonl") if "eval/loss" in r}
    assert sorted(rows) == [2, 4, 6]
    best_step = max(rows, key=lambda s: rows[s]["eval/loss"])
    assert info["step"] == best_step != 6, (info, {s: r["eval/loss"] for s, r in rows.items()})
    assert f"restored the weights of step {best_step}" in capsys.readouterr().out

    best = load_file(str(stage / "best" / "trainable.safetensors"))
    adapter = load_file(str(final / "adapter_model.safetensors"))
    lora = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora and all(any(v.shape == b.shape and torch.equal(v, b) for b in best.values())
                        for v in lora.values())
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["eval/loss"] == rows[best_step]["eval/loss"] != rows[6]["eval/loss"]
    resolved = yaml.safe_load((stage / "config.yaml").read_text())["sft"]["mixed_precision"]
    assert resolved in ("no", "bf16")  # auto is resolved before the config is saved
