"""HaNoRecDPOTrainer (TRL 1.16) on tiny-llava: same loss as hanorec.dpo, HaRS β, NoDO scope, data.

TRL 1.16's vision path works on the tiny LLaVA: its ``DataCollatorForVisionPreference`` runs the
real ``LlavaProcessor`` (``<image>`` expanded to 16 tokens) and the trainer trains it.
The comparison with ``hanorec.dpo.preference_step`` uses one TRL-collated batch, rewritten into
hanorec's layout (prompt once, ``[B, 2, R]`` responses) — same tokens, same policy, same
reference (a perturbed copy, so that the margins ``h`` are not all 0), same β0 and λ.
The shared-prompt forward inside the trainer is compared with TRL's own ``DPOTrainer`` (its
fused-head forward over the duplicated batch) on tiny LLaVA and Qwen2-VL.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOTrainer

import hanorec.integrations.trl as hanorec_trl
from hanorec.dpo import DPOConfig, DPORun, preference_step
from hanorec.forward import resolve_mode
from hanorec.integrations.trl import (
    HaNoRecDPOConfig,
    HaNoRecDPOTrainer,
    HardnessCollator,
    shared_prompt_batch,
)
from hanorec.models.families import vision_tower

HARDNESS = [0.6, 1.0, 1.5, 0.9]
MARKERS = {"tiny-llava": "<image>", "tiny-qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def _dataset(with_hardness: bool = True, marker: str = "<image>") -> Dataset:
    """4 pairs, one image each; prompts of different lengths (padding is exercised)."""
    rows = {
        "images": [[Image.new("RGB", (40, 48), (40 * k, 200 - 40 * k, 90))] for k in range(4)],
        "prompt": [f"{marker}History: {'Title 1, ' * k}Title {k}. Which movie next?"
                   for k in range(4)],
        "chosen": [f" Title {k + 1} (199{k})" for k in range(4)],
        "rejected": [f" Title {k + 5}" for k in range(4)],
    }
    if with_hardness:
        rows["hardness"] = HARDNESS
    return Dataset.from_dict(rows)


def _trainer(folder, tmp_path, dataset=None, trainer_cls=HaNoRecDPOTrainer,
             **options) -> HaNoRecDPOTrainer:
    """Policy = the tiny VLM in ``folder``; reference = a seeded perturbed copy (policy ≠
    reference). ``trainer_cls=DPOTrainer`` builds TRL's own trainer on the same weights.

    ``bf16=False``: TRL's ``DPOConfig`` defaults to bf16, and on CPU the trainer then runs its
    forwards under bf16 autocast, which moves log-probs by ~1e-3.
    """
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for param in ref.parameters():
            param.add_(0.05 * torch.randn_like(param))
    settings = {"beta": 0.5, "hardness": "dynamic", "noise_std": 0.0, **options}
    args = HaNoRecDPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
        logging_steps=1,
        learning_rate=1e-3, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        disable_tqdm=True, seed=0, **settings,
    )
    processor = AutoProcessor.from_pretrained(folder)
    return trainer_cls(model=model, ref_model=ref, args=args,
                       train_dataset=dataset or _dataset(), processing_class=processor)


@pytest.fixture
def llava(tiny_backbone_dirs):
    return tiny_backbone_dirs["tiny-llava"]


def _full_batch(trainer: HaNoRecDPOTrainer) -> dict:
    return trainer.data_collator([dict(row) for row in trainer.train_dataset])


def _as_hanorec(batch: dict) -> tuple[dict, torch.Tensor]:
    """TRL's ``[chosen rows; rejected rows]`` batch → hanorec's prompt batch and ``[B, 2, R]``
    responses."""
    size = batch["hardness"].shape[0]
    ids, completion = batch["input_ids"], batch["completion_mask"].bool()
    prompt_mask = batch["attention_mask"].bool() & ~completion
    width = int(prompt_mask[:size].sum(1).max())
    prompts = {
        "input_ids": ids[:size, :width].masked_fill(~prompt_mask[:size, :width], 0),
        "attention_mask": prompt_mask[:size, :width].long(),
        "pixel_values": batch["pixel_values"][:size],
    }
    answers = [ids[row][completion[row]] for row in range(2 * size)]
    length = max(len(a) for a in answers)
    padded = torch.full((2 * size, length), -100, dtype=torch.long)
    for row, answer in enumerate(answers):
        padded[row, : len(answer)] = answer
    return prompts, torch.stack([padded[:size], padded[size:]], dim=1)


def _hanorec_loss(trainer: HaNoRecDPOTrainer, batch: dict, loss: str, hardness: str,
                  **extra) -> float:
    run = DPORun(dpo=DPOConfig(loss=loss, beta=trainer.beta, hardness=hardness, noise="none",
                               reference="frozen", forward_mode="duplicate", **extra))
    prompts, responses = _as_hanorec(batch)
    reference = trainer.ref_model

    class _Reference:
        def __enter__(self):
            return reference

        def __exit__(self, *exc):
            return False

    out = preference_step(trainer.model, _Reference, prompts, responses, None, batch["hardness"],
                          run, trainer.accelerator, None)
    return float(out.loss.detach())


def test_first_step_loss_equals_hanorec_dpo_and_beta_varies(llava, tmp_path):
    """3 steps, batch = the 4 pairs. The first logged loss is the loss of the untouched policy on
    the whole set, which ``hanorec.dpo.preference_step`` computes on the same batch (dynamic HaRS,
    β0 = 0.5, λ = [0.6, 1.0, 1.5, 0.9]) — equal within 1e-5. It is not log 2 (policy ≠ reference).
    β_i = β0·η·λ_i differs across samples (λ varies), so hars/beta_max > hars/beta_min, and
    hars/lambda_mean = mean λ = 1.0 on every step."""
    trainer = _trainer(llava, tmp_path)
    expected = _hanorec_loss(trainer, _full_batch(trainer), "sigmoid", "dynamic")
    assert abs(expected - math.log(2)) > 1e-3
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 3
    assert abs(logs[0]["loss"] - expected) < 1e-5
    for row in logs:
        assert row["hars/beta_max"] > row["hars/beta_min"] > 0
        assert abs(row["hars/lambda_mean"] - 1.0) < 1e-6
        assert row["nodo/std"] == 0.0 and "hars/eta" in row and "rewards/margins" in row
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.parametrize(
    ("loss_type", "hardness", "options", "extra"),
    [
        ("ipo", "static", {}, {}),
        ("hinge", "none", {}, {}),
        ("sigmoid", "static", {"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
    ],
)
def test_other_losses_match_hanorec_dpo(llava, tmp_path, loss_type, hardness, options, extra):
    """IPO (length-averaged log-probs on both sides), hinge and cDPO (ε = 0.2) agree with
    ``preference_step`` on the same batch within 1e-5."""
    trainer = _trainer(llava, tmp_path, loss_type=[loss_type], hardness=hardness, **options)
    batch = _full_batch(trainer)
    got = float(trainer.compute_loss(trainer.model, batch).detach())
    assert abs(got - _hanorec_loss(trainer, batch, loss_type, hardness, **extra)) < 1e-5


def test_nodo_noise_perturbs_the_policy_in_training_only(llava, tmp_path):
    """σ = 0.5: in train mode the loss changes (noise on the policy logits) while TRL's reference
    log-probs are unchanged (never perturbed); in eval mode the loss is the noise-free one."""
    quiet = _trainer(llava, tmp_path, noise_std=0.0)
    noisy = _trainer(llava, tmp_path, noise_std=0.5)
    batch = _full_batch(quiet)
    for trainer in (quiet, noisy):
        trainer.model.train()
    base = float(quiet.compute_loss(quiet.model, batch).detach())
    torch.manual_seed(1)
    assert abs(float(noisy.compute_loss(noisy.model, batch).detach()) - base) > 1e-4
    assert noisy._metrics["train"]["nodo/std"] == [0.5]
    ref_a = quiet.compute_ref_log_probs(quiet.ref_model, batch)
    ref_b = noisy.compute_ref_log_probs(noisy.ref_model, batch)
    assert all(torch.equal(a, b) for a, b in zip(ref_a, ref_b))
    noisy.model.eval()
    assert abs(float(noisy.compute_loss(noisy.model, batch)) - base) < 1e-6


def test_hardness_column_survives_column_removal_and_defaults_to_one(llava, tmp_path):
    """TRL drops non-signature columns; ``hardness`` reaches the batch. Without the column λ = 1."""
    trainer = _trainer(llava, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert sorted(batch["hardness"].tolist()) == pytest.approx(sorted(HARDNESS))
    plain = _trainer(llava, tmp_path, dataset=_dataset(with_hardness=False))
    assert next(iter(plain.get_train_dataloader()))["hardness"].tolist() == [1.0] * 4


def test_bad_hardness_and_unsupported_options_raise(llava, tmp_path):
    collator = HardnessCollator(lambda examples: {"n": len(examples)})
    with pytest.raises(ValueError, match="'hardness'.*> 0"):
        collator([{"hardness": -1.0}])
    with pytest.raises(ValueError, match="loss_type"):
        _trainer(llava, tmp_path, loss_type=["robust"])
    with pytest.raises(ValueError, match="hardness must be one of"):
        HaNoRecDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, hardness="always")


def test_unsupported_trl_version_is_an_import_error(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.15.0")
    with pytest.raises(ImportError,
                       match=r'supports TRL >=1\.16\.0,<1\.17.*pip install "hanorec\[trl\]"'):
        hanorec_trl._require_trl()


def test_text_only_pairs_with_precomputed_reference(llava, tmp_path):
    """TRL's text path (``DataCollatorForPreference``) with ``precompute_ref_log_probs``: the stored
    reference log-probs are the untouched policy's (TRL's fused LM head), so the first step's loss
    is exactly log 2 (h = 0 for every pair, whatever β_i) — which also checks that hanorec's
    ``sequence_logps`` and TRL's fused head agree — and training moves it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoProcessor.from_pretrained(llava).tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id))
    pairs = Dataset.from_dict({
        "prompt": [f"History: Title {k}. Next?" for k in range(4)],
        "chosen": [f" Title {k + 1}" for k in range(4)],
        "rejected": [f" Title {k + 7} (199{k})" for k in range(4)],
        "hardness": HARDNESS,
    })
    args = HaNoRecDPOConfig(
        output_dir=str(tmp_path / "text"), per_device_train_batch_size=4, max_steps=2,
        logging_steps=1, learning_rate=1e-2,
        report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
        precompute_ref_log_probs=True, noise_std=0.0,
    )
    with pytest.warns(RuntimeWarning, match="does not share the prompt for 'llama'"):
        trainer = HaNoRecDPOTrainer(model=model, args=args, train_dataset=pairs,
                                    processing_class=tokenizer)
    assert trainer.share_prompt is False
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-5
    assert logs[1]["loss"] < logs[0]["loss"] and logs[0]["hars/beta_max"] > logs[0]["hars/beta_min"]


def _vision_rows(*models) -> list[int]:
    """Record the leading size (images, or Qwen2-VL patches) of every vision-tower input."""
    seen: list[int] = []

    def hook(_module, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        seen.append(int(pixels.shape[0]))

    for model in models:
        vision_tower(model).register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_forward_equals_trls_own_forward(tiny_backbone_dirs, tmp_path, name,
                                                checkpointing):
    """One TRL-collated batch through TRL's own ``DPOTrainer`` (fused LM head over the
    duplicated batch) and through HaNoRecDPOTrainer with the shared prompt (KV cache; packed
    sequences under gradient checkpointing in train mode) and without it (``share_prompt=
    False``). HaRS off, no noise: HaNoRec's loss is TRL's sigmoid DPO loss. The reference
    log-probs of every response, the mean policy log-probs and the loss agree within 1e-5; the
    vision tower sees each prompt's images once on the shared path and twice on TRL's."""
    folder, data = tiny_backbone_dirs[name], _dataset(with_hardness=False, marker=MARKERS[name])
    options = {"hardness": "none", "gradient_checkpointing": checkpointing}
    theirs = _trainer(folder, tmp_path, data, trainer_cls=DPOTrainer, **options)
    shared = _trainer(folder, tmp_path, data, **options)
    unshared = _trainer(folder, tmp_path, data, share_prompt=False, **options)
    assert shared.share_prompt and not unshared.share_prompt
    batch = theirs.data_collator([dict(row) for row in data])
    losses, refs, rows = [], [], []
    seen = {}
    for trainer in (theirs, shared, unshared):
        seen[trainer] = _vision_rows(trainer.model, trainer.ref_model)
        trainer.model.train(checkpointing)
        if checkpointing:
            trainer.model.gradient_checkpointing_enable()
    assert resolve_mode(shared.model) == ("packed" if checkpointing else "kv")
    for trainer in (theirs, shared, unshared):
        refs.append(torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch)))
        seen[trainer].clear()
        losses.append(float(trainer.compute_loss(trainer.model, batch).detach()))
        rows.append(sum(seen[trainer]))
    assert abs(losses[0] - math.log(2)) > 1e-3
    for loss, ref in zip(losses[1:], refs[1:]):
        assert abs(loss - losses[0]) < 1e-5
        torch.testing.assert_close(ref, refs[0], rtol=0, atol=1e-5)
    mode = "train" if checkpointing else "eval"
    for key in ("logps/chosen", "logps/rejected"):
        assert shared._metrics[mode][key] == pytest.approx(theirs._metrics[mode][key], abs=1e-5)
    assert rows[1] * 2 == rows[0] == rows[2] > 0  # policy + reference: images once vs twice


def test_shared_prompt_batch_reads_trls_layout_back(llava, tmp_path):
    """TRL's batch → one prompt batch and ``[B, 2, R]`` responses, as the test's own loop
    (``_as_hanorec``) reads it; a batch whose halves hold different prompts (a custom collator)
    is refused (None: the trainer keeps TRL's duplicated forward)."""
    trainer = _trainer(llava, tmp_path)
    batch = _full_batch(trainer)
    prompt, responses = shared_prompt_batch(batch, skip=("hardness",))
    expected_prompt, expected_responses = _as_hanorec(batch)
    assert torch.equal(responses, expected_responses)
    for key, value in expected_prompt.items():
        assert torch.equal(prompt[key], value), key
    assert set(prompt) == {"input_ids", "attention_mask", "pixel_values"}
    mixed = dict(batch, input_ids=batch["input_ids"].roll(1, dims=0))
    assert shared_prompt_batch(mixed, skip=("hardness",)) is None
