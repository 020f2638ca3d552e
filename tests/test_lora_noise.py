"""NoDO, LoRA mode: ``hanorec.losses.lora_noise`` on a real tiny Llama wrapped with real PEFT
LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hanorec.losses import lora_noise

TARGETS = ["q_proj", "v_proj"]


def _tiny_lora_model(init_lora_weights: bool = True):
    """2-layer Llama (vocab 64, hidden 32) + LoRA r=4 on q/v; default init has lora_B = 0."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config).eval()
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        init_lora_weights=init_lora_weights,
    )
    return get_peft_model(base, lora).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_lora_model()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _lora_modules(model) -> list[torch.nn.Module]:
    """lora_A/lora_B Linear modules in module order (A before B within a layer)."""
    return [
        m
        for name, m in model.named_modules()
        if name.endswith(("lora_A.default", "lora_B.default"))
    ]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_noise_changes_output_then_everything_is_restored(model, input_ids) -> None:
    """Inside: logits change, and each forward draws fresh noise. After: clean logits, identical
    weights, no hooks."""
    clean = _logits(model, input_ids)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with lora_noise(model, 0.5, generator=torch.Generator().manual_seed(0)):
        first = _logits(model, input_ids)
        second = _logits(model, input_ids)
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)
    assert torch.equal(_logits(model, input_ids), clean)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert _hooks(model) == 0


def test_noise_equals_forward_with_perturbed_weights(model, input_ids) -> None:
    """Hook noise == using W + ε: draw ε in forward order (layer by layer, q then v, A then B)
    from the same seeded generator, add it to a copy's LoRA weights, and compare logits.

    With the default init lora_B = 0, so noise on A alone would change nothing; the change
    comes through ε_B (and ε_B·(A + ε_A)).
    """
    gen = torch.Generator().manual_seed(3)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for module in _lora_modules(perturbed):
            module.weight += 0.3 * torch.randn(module.weight.shape, generator=gen)
    with lora_noise(model, 0.3, generator=torch.Generator().manual_seed(3)):
        noisy = _logits(model, input_ids)
    torch.testing.assert_close(noisy, _logits(perturbed, input_ids), rtol=1e-5, atol=1e-5)


def test_zero_std_is_a_no_op(model, input_ids) -> None:
    """std = 0 registers nothing and leaves the output bit-identical."""
    clean = _logits(model, input_ids)
    with lora_noise(model, 0.0):
        assert _hooks(model) == 0
        assert torch.equal(_logits(model, input_ids), clean)


def test_hooks_removed_when_forward_raises(model, input_ids) -> None:
    """A forward that raises inside the context (ids out of the 64-token vocabulary) leaves no
    hooks."""
    with pytest.raises(IndexError), lora_noise(model, 0.5):
        assert _hooks(model) == 2 * len(TARGETS) * 2  # (A + B) × targets × layers
        model(input_ids=input_ids + 1000)
    assert _hooks(model) == 0


def test_disabled_adapter_forward_stays_clean(model, input_ids) -> None:
    """A reference forward (adapter disabled) inside the context is not perturbed."""
    with model.disable_adapter():
        reference = _logits(model, input_ids)
    with lora_noise(model, 1.0), model.disable_adapter():
        assert torch.equal(_logits(model, input_ids), reference)


def test_gradients_flow_to_lora_weights_under_noise(input_ids) -> None:
    """Training use: backward inside the context reaches the (trainable) LoRA weights."""
    model = _tiny_lora_model(init_lora_weights=False)
    with lora_noise(model, 0.1):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = [m.weight.grad for m in _lora_modules(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_errors() -> None:
    """No LoRA layer, merged adapter and negative std raise clear ValueErrors."""
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no PEFT LoRA layer"), lora_noise(plain, 0.1):
        pass
    model = _tiny_lora_model()
    with pytest.raises(ValueError, match="std"), lora_noise(model, -1.0):
        pass
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"), lora_noise(model, 0.1):
        pass
