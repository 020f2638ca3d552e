"""Stage 1 end to end on tiny backbones: learning, what trains, exact resume, 2 processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hanorec import sft
from hanorec.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir / "sft" / "metrics.jsonl")
            if "train/loss" in r]


def _run_dir(recipe: Path) -> Path:
    import yaml

    return Path(yaml.safe_load(recipe.read_text())["run_dir"])


@pytest.mark.parametrize("backbone", ["tiny-llava", "tiny-qwen2-vl", "tiny-idefics3"])
def test_sft_learns_and_trains_only_the_adapter(tiny_recipe, backbone):
    """4 examples, batch 2, 8 steps = 4 epochs on the same rows: the mean loss of the last
    epoch must fall below the first epoch's; only LoRA and the projector are trainable."""
    recipe = tiny_recipe(backbone,
                         sft={"max_train_examples": 4, "max_steps": 8, "learning_rate": 1e-2})
    final = sft.main(["--config", str(recipe)])
    losses = _losses(_run_dir(recipe))
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses

    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k or "projector" in k or "connector" in k or "merger" in k
                           for k in adapter), sorted(adapter)[:5]
    # B starts at 0: it moved
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    # no LoRA in the vision tower
    assert not any("vision" in k.split("lora_")[0] and "lora_" in k for k in adapter)


def test_final_adapter_loads_with_plain_peft_and_keeps_the_vision_tower(tiny_recipe,
                                                                        tiny_backbone_dirs):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    recipe = tiny_recipe("tiny-llava", sft={"max_steps": 3})
    final = sft.main(["--config", str(recipe)])
    base = AutoModelForImageTextToText.from_pretrained(tiny_backbone_dirs["tiny-llava"])
    before = {k: v.clone() for k, v in base.state_dict().items() if "vision_tower" in k}
    model = PeftModel.from_pretrained(base, str(final))
    merged = model.merge_and_unload()
    after = {k: v for k, v in merged.state_dict().items() if "vision_tower" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in merged.state_dict().items() if "language_model" in k and "proj" in k]
    fresh = AutoModelForImageTextToText.from_pretrained(
        tiny_backbone_dirs["tiny-llava"]
    ).state_dict()
    # LoRA did change the LM
    assert any(not torch.equal(fresh[k], merged.state_dict()[k]) for k in changed)


def test_resume_after_a_kill_ends_bit_identical(tiny_recipe, capsys):
    """Run A goes 12 steps straight. Run B is SIGKILLed once checkpoint-3 exists and resumed with
    --resume true: its final adapter and its logged losses must equal A's exactly."""
    settings = {"max_steps": 12, "save_every": 3, "max_train_examples": 6, "lora_dropout": 0.1}
    model_cfg = {"lora_dropout": 0.1}  # dropout draws from the RNG: resume must restore it
    straight = tiny_recipe("tiny-llava",
                           sft={k: v for k, v in settings.items() if k != "lora_dropout"},
                           model=model_cfg)
    final_a = sft.main(["--config", str(straight)])

    broken = tiny_recipe("tiny-llava",
                         sft={k: v for k, v in settings.items() if k != "lora_dropout"},
                         model=model_cfg)
    run_b = _run_dir(broken)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "hanorec.sft", "--config", str(broken)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_b / "sft"
               / "checkpoint-3").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_b / "sft" / "final").exists(), "the run finished before it could be interrupted"
    capsys.readouterr()
    final_b = sft.main(["--config", str(broken), "--resume", "true"])
    assert "resumed from" in capsys.readouterr().out

    a, b = (
        load_file(str(final_a / "adapter_model.safetensors")),
        load_file(str(final_b / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(_run_dir(straight)) == _losses(run_b)


def test_two_process_launch_averages_gradients_like_one_process(tiny_recipe, tmp_path):
    """A real `accelerate launch` with 2 CPU processes (gloo), batch 2 each, must produce the same
    first-step gradients as one process on the combined batch of 4 (same 4 rows)."""
    recipe = tiny_recipe("tiny-llava", sft={"max_steps": 1, "max_train_examples": 8})
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    sft.main(["--config", str(recipe), "--per-device-batch-size", "4", "--debug-gradients-path",
              str(one), "--run-dir", str(tmp_path / "r1")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu-2proc.yaml"),
           "--main_process_port", "29533", "-m", "hanorec.sft", "--config", str(recipe),
           "--per-device-batch-size", "2",
           "--debug-gradients-path", str(two), "--run-dir", str(tmp_path / "r2")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    g1, g2 = load_file(str(one)), load_file(str(two))
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_sft_trains_on_cpu(tiny_recipe):
    """4-bit NF4 base (bitsandbytes on CPU) with LoRA on top: a few steps run and the adapter
    moves."""
    recipe = tiny_recipe("tiny-llava", model={"load_in_4bit": True}, sft={"max_steps": 3})
    final = sft.main(["--config", str(recipe)])
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
