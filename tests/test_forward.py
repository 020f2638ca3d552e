"""Shared-prompt forward (hanorec/forward.py) against the duplicated batch, on tiny VLMs.

Tiny LLaVA (CLIP + Llama), Qwen2-VL (M-RoPE) and Idefics3 are built from configs with seeded
random weights; prompts carry 1–3 images (4 image tokens each) and have unequal lengths. The
duplicated batch (each prompt and its images repeated per response, TRL's way) is the
reference; it is itself checked against an unpadded per-row computation done here with
``log_softmax`` + ``gather``. Qwen2.5-VL and SmolVLM get a lighter check; GPT-2 (unlisted,
passes the capability check), Mamba (unlisted, fails it) and PaliGemma (prefix-LM) cover the
``auto`` fallbacks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MambaConfig,
    MambaForCausalLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from hanorec import forward
from hanorec.forward import resolve_mode, response_logps, score_candidates

TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
)
ROWS = [(12, 2), (7, 1), (9, 3)]  # (text tokens, images) per prompt: unequal lengths
# image placeholder block per family (4 image tokens = the tiny vision towers' feature count)
BLOCKS = {"llava": [63] * 4, "idefics3": [63] * 4, "qwen2_vl": [58] + [60] * 4 + [59]}
IMAGE_TOKEN = {"llava": 63, "idefics3": 63, "qwen2_vl": 60}
LAYOUT = {"qwen2_5_vl": "qwen2_vl", "smolvlm": "idefics3"}  # families sharing a prompt layout


def build(family: str) -> torch.nn.Module:
    """A tiny seeded VLM of ``family`` in eval mode (float32, sdpa attention)."""
    torch.manual_seed(0)
    if family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=16,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**TEXT),
            image_token_id=63,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
        return LlavaForConditionalGeneration(config).eval()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(
            TEXT,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
            bos_token_id=1,
            eos_token_id=2,
        )
        ids = dict(
            image_token_id=60, video_token_id=61, vision_start_token_id=58, vision_end_token_id=59
        )
        vision = dict(
            depth=1,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        if family == "qwen2_vl":
            config = Qwen2VLConfig(
                text_config=text,
                vision_config=dict(vision, embed_dim=16, hidden_size=32, mlp_ratio=2),
                **ids,
            )
            return Qwen2VLForConditionalGeneration(config).eval()
        vision.update(
            hidden_size=16,
            intermediate_size=32,
            out_hidden_size=32,
            fullatt_block_indexes=[0],
            window_size=8,
        )
        return Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        ).eval()
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    kind = SmolVLMConfig if family == "smolvlm" else Idefics3Config
    config = kind(
        vision_config=vision,
        text_config=dict(TEXT, model_type="llama"),
        image_token_id=63,
        scale_factor=2,
    )
    head = (
        SmolVLMForConditionalGeneration if family == "smolvlm" else Idefics3ForConditionalGeneration
    )
    return head(config).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {family: build(family) for family in BLOCKS}


def prompt_batch(family: str, padding: str, rows=ROWS, seed: int = 1) -> dict[str, torch.Tensor]:
    """Prompts interleaving 2 text tokens and an image block, padded on ``padding`` side."""
    family = LAYOUT.get(family, family)
    gen = torch.Generator().manual_seed(seed)
    seqs, counts = [], []
    for num_text, num_images in rows:
        text = torch.randint(1, 50, (num_text,), generator=gen).tolist()
        seq: list[int] = []
        for i in range(num_images):
            seq += text[2 * i : 2 * i + 2] + BLOCKS[family]
        seqs.append(seq + text[2 * num_images :])
        counts.append(num_images)
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if padding == "left" else slice(0, len(seq))
        ids[b, span], mask[b, span] = torch.tensor(seq), 1
    batch = {"input_ids": ids, "attention_mask": mask}
    total = sum(counts)
    if family == "llava":
        batch["pixel_values"] = torch.randn(total, 3, 16, 16, generator=gen)
    elif family == "qwen2_vl":
        batch["pixel_values"] = torch.randn(total * 16, 96, generator=gen)  # 4x4 patches of 3·2·4·4
        batch["image_grid_thw"] = torch.tensor([[1, 4, 4]] * total)
        batch["mm_token_type_ids"] = (ids == 60).long()
    else:
        pixels = torch.zeros(len(rows), max(counts), 3, 16, 16)  # all-zero images are padding
        for b, n in enumerate(counts):
            pixels[b, :n] = torch.randn(n, 3, 16, 16, generator=gen)
        batch["pixel_values"] = pixels
    return batch


def responses(batch: int, num: int, length: int = 5, seed: int = 2) -> torch.Tensor:
    """``[batch, num, length]`` random responses of random length 1..length, right-padded -100."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, num, length), generator=gen)
    lengths = torch.randint(1, length + 1, (batch, num), generator=gen)
    return ids.masked_fill(torch.arange(length) >= lengths[..., None], -100)


def unpadded_reference(model, family: str, batch: dict, resp: torch.Tensor) -> torch.Tensor:
    """Row by row, no padding, natural positions: Σ_t log_softmax(z)[y_t] over [prompt,
    response]."""
    out = torch.zeros(resp.shape[:2])
    images = 0
    for b in range(resp.shape[0]):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        count = int((ids == IMAGE_TOKEN[family]).sum()) // 4
        for k in range(resp.shape[1]):
            y = resp[b, k][resp[b, k] != -100]
            seq = torch.cat([ids, y])[None]
            extra: dict = {}
            if family == "llava":
                extra["pixel_values"] = batch["pixel_values"][images : images + count]
            elif family == "qwen2_vl":
                extra["pixel_values"] = batch["pixel_values"][16 * images : 16 * (images + count)]
                extra["image_grid_thw"] = batch["image_grid_thw"][images : images + count]
                extra["mm_token_type_ids"] = (seq == 60).long()
            else:
                extra["pixel_values"] = batch["pixel_values"][b : b + 1, :count]
            logits = model(input_ids=seq, **extra).logits[0, len(ids) - 1 : -1]
            out[b, k] = logits.log_softmax(-1).gather(-1, y[:, None]).sum()
        images += count
    return out


def grads(model, batch, resp, mode: str, weights: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    value = (response_logps(model, batch, resp, mode=mode) * weights).sum()
    return [
        g if g is not None else torch.zeros_like(p)
        for g, p in zip(torch.autograd.grad(value, params, allow_unused=True), params)
    ]


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.pow(2).sum()) for y in b) ** 0.5


@pytest.mark.parametrize("family", list(BLOCKS))
def test_duplicate_matches_unpadded_rows(models, family):
    """The reference path equals a per-row unpadded forward (left and right padding alike)."""
    model, resp = models[family], responses(3, 2)
    with torch.no_grad():
        expected = unpadded_reference(model, family, prompt_batch(family, "left"), resp)
        for padding in ("left", "right"):
            got = response_logps(model, prompt_batch(family, padding), resp, mode="duplicate")
            assert (got - expected).abs().max() < 1e-4, padding


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("num", [2, 4])
@pytest.mark.parametrize("family", list(BLOCKS))
def test_shared_modes_match_duplicate(models, family, num, padding):
    """kv and packed: log-probs within 1e-4 (max abs) and gradients within 1e-4 (relative L2)
    of the duplicated batch, K = num − 1, three prompts of unequal length with 1–3 images."""
    model, batch, resp = models[family], prompt_batch(family, padding), responses(3, num)
    weights = torch.randn(3, num, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = response_logps(model, batch, resp, mode="duplicate")
    reference_grads = grads(model, batch, resp, "duplicate", weights)
    assert sum(float(g.abs().sum()) for g in reference_grads) > 0
    for mode in ("kv", "packed"):
        with torch.no_grad():
            got = response_logps(model, batch, resp, mode=mode)
        assert got.shape == (3, num)
        assert (got - reference).abs().max() < 1e-4, mode
        assert rel_diff(grads(model, batch, resp, mode, weights), reference_grads) < 1e-4, mode


@pytest.mark.parametrize("family", list(LAYOUT))
def test_more_families_match_duplicate(family):
    """Qwen2.5-VL (M-RoPE) and SmolVLM: kv and packed log-probs within 1e-4 of the duplicated
    batch (K = 3, right padding)."""
    model, batch, resp = build(family), prompt_batch(family, "right"), responses(3, 4)
    with torch.no_grad():
        reference = response_logps(model, batch, resp, mode="duplicate")
        for mode in ("kv", "packed"):
            assert (response_logps(model, batch, resp, mode=mode) - reference).abs().max() < 1e-4, (
                mode
            )


def test_text_only_mrope_prompt(models):
    """Qwen2-VL without images: M-RoPE is 1-D RoPE on three axes; a left-padded row equals the
    same row unpadded, in every mode."""
    model, resp = models["qwen2_vl"], responses(2, 3)
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])}
    with torch.no_grad():
        alone = response_logps(model, {"input_ids": ids[:1, 2:]}, resp[:1], mode="duplicate")
        for mode in ("kv", "packed", "duplicate"):
            got = response_logps(model, batch, resp, mode=mode)
            assert (got[:1] - alone).abs().max() < 1e-4, mode


def test_images_reach_the_responses(models):
    """Changing the prompt images changes every mode's log-probs (the vision tower is used)."""
    model, batch, resp = models["llava"], prompt_batch("llava", "left"), responses(3, 2)
    other = dict(batch, pixel_values=batch["pixel_values"] + 1.0)
    with torch.no_grad():
        for mode in ("kv", "packed", "duplicate"):
            a = response_logps(model, batch, resp, mode=mode)
            b = response_logps(model, other, resp, mode=mode)
            assert (a - b).abs().max() > 1e-4, mode


def test_average_divides_by_length(models):
    """average=True equals the sum divided by each response's token count."""
    model, batch, resp = models["llava"], prompt_batch("llava", "right"), responses(3, 3)
    with torch.no_grad():
        total = response_logps(model, batch, resp, mode="kv")
        mean = response_logps(model, batch, resp, mode="kv", average=True)
    assert torch.allclose(mean, total / (resp != -100).sum(-1), atol=1e-6)


def test_noise_is_seeded_and_mode_independent(models):
    """NoDO noise (σ = 0.5) changes the result, reproduces with the same seed, differs with
    another seed, and is drawn in the same (b, k, t) order by every mode."""
    model, batch, resp = models["qwen2_vl"], prompt_batch("qwen2_vl", "left"), responses(3, 4)

    def noisy(mode: str, seed: int) -> torch.Tensor:
        with torch.no_grad():
            return response_logps(
                model,
                batch,
                resp,
                mode=mode,
                noise_std=0.5,
                generator=torch.Generator().manual_seed(seed),
            )

    with torch.no_grad():
        clean = response_logps(model, batch, resp, mode="kv")
    first = noisy("kv", 7)
    assert (first - clean).abs().max() > 1e-3
    assert torch.equal(first, noisy("kv", 7))
    assert (first - noisy("kv", 8)).abs().max() > 1e-3
    for mode in ("packed", "duplicate"):
        assert (first - noisy(mode, 7)).abs().max() < 1e-4, mode


def test_score_twenty_candidates(models):
    """score_candidates on 20 candidates: no graph, equal to the duplicated batch."""
    model, batch, cands = models["llava"], prompt_batch("llava", "left"), responses(3, 20, length=4)
    scores = score_candidates(model, batch, cands)
    assert scores.shape == (3, 20) and not scores.requires_grad
    with torch.no_grad():
        reference = response_logps(model, batch, cands, mode="duplicate")
    assert (scores - reference).abs().max() < 1e-4
    chunked = score_candidates(model, batch, cands, candidates_per_pass=6)  # chunks 6, 6, 6, 2
    assert (chunked - reference).abs().max() < 1e-4


def test_auto_mode_follows_gradient_checkpointing():
    """auto: kv in eval mode; packed in training mode (one pass, the duplicated batch's operator
    count), kv there when the attention kernel takes no block mask; packed under gradient
    checkpointing in training (where kv is refused), and packed training gradients still
    match the duplicated batch."""
    model = build("llava")
    assert resolve_mode(model, "auto") == "kv"
    model.train()
    assert resolve_mode(model, "auto") == "packed"
    text = model.config.get_text_config()
    kernel, text._attn_implementation = text._attn_implementation, "flash_attention_2"
    assert resolve_mode(model, "auto") == "kv"
    text._attn_implementation = kernel
    model.eval()
    enable = (
        getattr(model, "activation_checkpointing_enable", None)
        or model.gradient_checkpointing_enable
    )
    enable()
    model.train()
    assert resolve_mode(model, "auto") == "packed"
    with pytest.raises(ValueError, match="gradient checkpointing"):
        resolve_mode(model, "kv")
    batch, resp = prompt_batch("llava", "right"), responses(3, 2)
    weights = torch.ones(3, 2)
    assert (
        rel_diff(
            grads(model, batch, resp, "auto", weights),
            grads(model, batch, resp, "duplicate", weights),
        )
        < 1e-4
    )


def test_lora_gradients_match():
    """Through a PEFT LoRA wrapper, kv gradients on the LoRA matrices match the duplicated batch."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        build("qwen2_vl"),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    batch, resp = prompt_batch("qwen2_vl", "right"), responses(3, 2)
    weights = torch.tensor([[1.0, -1.0]] * 3)
    got, expected = (
        grads(model, batch, resp, "kv", weights),
        grads(model, batch, resp, "duplicate", weights),
    )
    assert len(got) > 0 and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    assert rel_diff(got, expected) < 1e-4


def test_unknown_family_is_probed_once():
    """An unlisted backbone (GPT-2) passes the capability check and runs kv, no warning."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    ).eval()
    batch = {
        "input_ids": torch.randint(1, 50, (2, 9)),
        "attention_mask": torch.tensor([[1] * 9, [0] * 3 + [1] * 6]),
    }
    resp = responses(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_mode(model, "auto", prompt_batch=batch, responses=resp) == "kv"
        got = response_logps(model, batch, resp)
    assert forward._PROBED[model] == {"kv": None}
    with torch.no_grad():
        assert (got - response_logps(model, batch, resp, mode="duplicate")).abs().max() < 1e-4


def test_failed_capability_check_falls_back_with_one_warning():
    """An unlisted backbone whose kv path fails the capability check (Mamba: no KV cache)
    warns once, on one line, and then runs the duplicated batch."""
    torch.manual_seed(0)
    model = MambaForCausalLM(
        MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    model.eval()
    batch = {
        "input_ids": torch.randint(1, 50, (2, 7)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }
    resp = responses(2, 3)
    forward._WARNED.discard(("mamba", "kv"))
    with pytest.warns(RuntimeWarning, match="mamba cannot share the prompt in kv mode") as record:
        with torch.no_grad():
            first = response_logps(model, batch, resp)
            second = response_logps(model, batch, resp)
    messages = [str(w.message) for w in record if "hanorec.forward" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and "capability check" in messages[0]
    with torch.no_grad():
        assert torch.equal(first, response_logps(model, batch, resp, mode="duplicate"))
    assert torch.equal(first, second)


def test_prefix_lm_backbone_falls_back_with_one_warning():
    """PaliGemma (bidirectional prefix attention) cannot share: auto warns once, then matches
    the duplicated batch."""
    torch.manual_seed(0)
    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=dict(
            model_type="gemma",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        ),
        image_token_id=63,
        projection_dim=32,
    )
    model = PaliGemmaForConditionalGeneration(config).eval()
    ids = torch.tensor([[63] * 4 + [5, 6, 7], [63] * 4 + [8, 9, 10]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 3, 16, 16),
        "token_type_ids": torch.zeros_like(ids),
    }
    resp = responses(2, 2)
    forward._WARNED.discard(("paligemma", "kv"))
    with pytest.warns(RuntimeWarning, match="paligemma cannot share") as record:
        with torch.no_grad():
            first = response_logps(model, batch, resp)
            second = response_logps(model, batch, resp)
    assert len([w for w in record if "hanorec.forward" in str(w.message)]) == 1
    assert "\n" not in str(record[0].message)
    with torch.no_grad():
        assert torch.equal(first, response_logps(model, batch, resp, mode="duplicate"))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="prefix-LM"):
        response_logps(model, batch, resp, mode="kv")


@pytest.mark.parametrize(
    ("batch", "resp", "match"),
    [
        (
            {"input_ids": torch.ones(2, 3, dtype=torch.long)},
            torch.ones(3, 2, 2, dtype=torch.long),
            "B=2",
        ),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long)},
            torch.tensor([[[5, -100, 6]]]),
            "right-padded",
        ),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3)},
            torch.ones(1, 1, 1),
            "labels",
        ),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.zeros(1, 3)},
            torch.ones(1, 1, 1, dtype=torch.long),
            "no real token",
        ),
    ],
)
def test_bad_inputs_raise(models, batch, resp, match):
    """Malformed prompts or responses raise ValueErrors naming forward.py and the field."""
    with pytest.raises(ValueError, match=match):
        response_logps(models["llava"], batch, resp, mode="duplicate")


def test_unknown_mode_raises(models):
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_mode(models["llava"], "fast")
