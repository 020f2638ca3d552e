"""Tiny built-in backbones through the real loading path: build, save, reload, LoRA, QLoRA, DPO
merge."""

from __future__ import annotations

import re

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image

from hanorec.models.builtin import builtin_folder, ensure_builtin
from hanorec.models.config import ModelConfig
from hanorec.models.families import (
    backbone_family,
    language_model_and_embeddings,
    language_model_prefix,
    unwrap,
    vision_tower,
)
from hanorec.models.loading import (
    load_adapter_for_inference,
    load_backbone,
    lora_target_regex,
    merge_and_add_adapter,
)
from hanorec.models.tiny import build_tiny_backbone
from hanorec.models.tokenizer import chatml_template, tiny_hf_tokenizer, train_tiny_tokenizer

NAMES = ("tiny-llava", "tiny-qwen2-vl", "tiny-idefics3")
FAMILY = {"tiny-llava": "llava", "tiny-qwen2-vl": "qwen2_vl", "tiny-idefics3": "idefics3"}


def _batch(processor, num_images: int = 2):
    """One prompt with ``num_images`` images, labels = input ids."""
    content = [{"type": "text", "text": "History:"}]
    for k in range(num_images):
        content += [{"type": "image"}, {"type": "text", "text": f' "Movie {k}"'}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True,
                                         tokenize=False) + "Title<|im_end|>"
    images = [Image.new("RGB", (32, 32), (40 * k, 90, 200)) for k in range(num_images)]
    batch = processor(text=[text], images=[images], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return batch


@pytest.mark.parametrize("name", NAMES)
def test_build_writes_safetensors_and_reloads(name, tiny_backbone_dirs, tiny_model_config):
    """Folder has model.safetensors and no pickle (.bin); reload gives the family and frozen eval
    model."""
    folder = tiny_backbone_dirs[name]
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    model, processor = load_backbone(tiny_model_config(name), for_training=False)
    assert backbone_family(model) == FAMILY[name]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert processor.tokenizer.eos_token == "<|im_end|>"
    language, embeddings = language_model_and_embeddings(model)
    assert embeddings.num_embeddings == len(processor.tokenizer)
    assert language is model.get_submodule(language_model_prefix(model))


def test_build_is_deterministic(tmp_path):
    """Same seed → identical safetensors bytes; another seed → different weights."""
    a = build_tiny_backbone("tiny-llava", tmp_path / "a", seed=3)
    b = build_tiny_backbone("tiny-llava", tmp_path / "b", seed=3)
    c = build_tiny_backbone("tiny-llava", tmp_path / "c", seed=4)
    blob = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert blob(a) == blob(b)
    assert blob(a) != blob(c)


def test_trust_remote_code_defaults_off():
    """The safe default: no hub code is executed unless asked."""
    assert ModelConfig().trust_remote_code is False


@pytest.mark.parametrize("name", NAMES)
def test_lora_forward_backward_trains_only_adapter(name, tiny_model_config):
    """Trainable = LoRA A/B of the language model + the projector copy; vision tower frozen, gets no
    grad."""
    model, processor = load_backbone(tiny_model_config(name))
    out = model(**_batch(processor))
    out.loss.backward()
    prefix = language_model_prefix(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for param_name in trainable:
        is_lora = "lora_" in param_name and prefix in param_name
        assert is_lora or "modules_to_save" in param_name, param_name
    lora = [p for n, p in trainable.items() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert all(p.grad.abs().sum() > 0 for p in lora)  # lora_B gets grad first (B starts at 0)
    assert all(not p.requires_grad and p.grad is None for p in vision_tower(model).parameters())


@pytest.mark.parametrize("name", NAMES)
def test_lora_targets_language_model_only(name, tiny_model_config):
    """The regex matches linear layers under the language model and nothing in
    vision/projector/lm_head."""
    model, _ = load_backbone(tiny_model_config(name), for_training=False)
    regex = lora_target_regex(model)
    matched = [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]
    prefix = language_model_prefix(model)
    assert matched and all(n.startswith(prefix + ".") for n in matched)
    assert not any("lm_head" in n for n in matched)
    assert len(matched) == 2 * 7  # 2 layers × (q, k, v, o, gate, up, down)
    only_q = [n for n,
              _ in model.named_modules() if re.fullmatch(lora_target_regex(model, "q_proj"), n)]
    assert len(only_q) == 2
    with pytest.raises(ValueError, match="lora_target_modules"):
        lora_target_regex(model, "patch_embedding")


@pytest.mark.parametrize("name", NAMES)
def test_qlora_builds_4bit_layers_and_trains(name, tiny_model_config):
    """load_in_4bit: language-model linears become bnb Linear4bit (NF4), vision tower stays float;
    LoRA gets grads on CPU."""
    model, processor = load_backbone(tiny_model_config(name, load_in_4bit=True))
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(language_model_prefix(model) in n for n in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in vision_tower(model).modules())
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.weight.quant_state.quant_type == "nf4"
    model(**_batch(processor)).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_qlora_requires_lora():
    """4-bit weights cannot be trained, so QLoRA without LoRA is a config error."""
    with pytest.raises(ValueError, match="load_in_4bit"):
        ModelConfig(load_in_4bit=True, use_lora=False)


def test_gradient_checkpointing_with_lora(tiny_model_config):
    """Checkpointing + LoRA still gives LoRA grads (inputs made to require grad)."""
    model, processor = load_backbone(tiny_model_config("tiny-llava", gradient_checkpointing=True))
    assert unwrap(model).is_activation_checkpointing
    model(**_batch(processor)).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_adapter_roundtrip_and_merge(tiny_model_config, tmp_path):
    """Saved adapter (LoRA + trained projector copy) reloads to the same logits; after
    merge_and_add_adapter, the model with the new adapter disabled == the SFT model, and the
    base model alone differs from it (so the comparison can fail)."""
    cfg = tiny_model_config("tiny-llava")
    model, processor = load_backbone(cfg)
    with torch.no_grad():  # make adapter and projector copy non-trivial (lora_B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    batch = _batch(processor)
    batch.pop("labels")
    with torch.no_grad():
        sft_logits = model(**batch).logits
        base_logits = load_backbone(cfg, for_training=False)[0](**batch).logits
    assert not torch.allclose(base_logits, sft_logits, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded, _ = load_adapter_for_inference(cfg, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, sft_logits, atol=1e-5, rtol=1e-5)
    dpo = merge_and_add_adapter(model, cfg).eval()
    with torch.no_grad(), dpo.disable_adapter():
        torch.testing.assert_close(dpo(**batch).logits, sft_logits, atol=1e-4, rtol=1e-4)
    assert all("lora_" in n or "modules_to_save" in n for n,
               p in dpo.named_parameters() if p.requires_grad)


def test_builtin_name_builds_once(tmp_path):
    """A built-in name is materialised into the cache on first use and reused afterwards."""
    cfg = ModelConfig(model_name_or_path="tiny-idefics3", builtin_cache_dir=str(tmp_path),
                      use_lora=False)
    model, _ = load_backbone(cfg, for_training=False)
    folder = builtin_folder("tiny-idefics3", tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin("tiny-idefics3", tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no staging left over
    with pytest.raises(ValueError, match="not a built-in"):
        ensure_builtin("tiny-nothing", tmp_path)


def test_tokenizer_is_deterministic_and_byte_level():
    """Two trainings give the same vocabulary; unseen text (accents, CJK) encodes without unknowns
    and decodes back exactly."""
    a, b = train_tiny_tokenizer(), train_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab() and a.get_vocab_size() == 1024
    text = 'Amélie (2001) 千と千尋 "Léon"'
    assert a.decode(a.encode(text).ids) == text


def test_chat_template_renders_multimodal_content():
    """List content renders images as the marker, string content as is; the default system prompt
    is added only when the conversation has none."""
    tok = tiny_hf_tokenizer(chatml_template("<IMG>", default_system="Be brief."))
    user = {"role": "user",
            "content": [{"type": "text", "text": "a "}, {"type": "image"},
                        {"type": "text", "text": " b"}]}
    text = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na <IMG> "
                    "b<|im_end|>\n<|im_start|>assistant\n")
    system = {"role": "system", "content": "S"}
    text = tok.apply_chat_template([system, {"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_full_finetune_and_dtype(tiny_model_config):
    """use_lora=False trains the language model and projector but not the vision tower; bfloat16
    loads bf16 weights."""
    model, processor = load_backbone(tiny_model_config("tiny-llava", use_lora=False))
    assert not any(p.requires_grad for p in vision_tower(model).parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    frozen_proj, _ = load_backbone(tiny_model_config("tiny-llava", use_lora=False,
                                                     freeze_projector=True))
    assert not any(p.requires_grad for p in frozen_proj.model.multi_modal_projector.parameters())
    bf16, _ = load_backbone(tiny_model_config("tiny-llava", torch_dtype="bfloat16"),
                            for_training=False)
    assert next(bf16.model.language_model.parameters()).dtype == torch.bfloat16


def test_cli_builds_builtin(tmp_path, capsys):
    """`python -m hanorec.models build tiny-qwen2-vl --builtin-cache-dir DIR` prints the built
    folder."""
    from hanorec.models.__main__ import main

    assert main(["build", "tiny-qwen2-vl", "--builtin-cache-dir", str(tmp_path)]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder == str(builtin_folder("tiny-qwen2-vl", tmp_path))
    assert (tmp_path / folder / "model.safetensors").exists()
