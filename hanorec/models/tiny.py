"""Tiny built-in vision-language backbones, built from config with seeded random weights.

No model can be downloaded at run time, so tests and demos use tiny versions of three real
architectures. Each is saved with its real processor class (``save_pretrained``, safetensors) and
loaded back through the same :func:`hanorec.models.loading.load_backbone` path as a hub model.

| name            | architecture                     | image size | tokens / image             |
|-----------------|----------------------------------|------------|----------------------------|
| ``tiny-llava``    | LlavaForConditionalGeneration    | 32 × 32    | (32/8)² = 16 (CLS dropped) |
| ``tiny-qwen2-vl`` | Qwen2VLForConditionalGeneration  | ≈ 64 × 64  | (64/8)² / 2² = 16 (square) |
| ``tiny-idefics3`` | Idefics3ForConditionalGeneration | 32 × 32    | (32/8)² / 2² = 4 (+3 tags) |

The token count per image equals the number of vision features the model produces, which the
collation tests check with a real forward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from hanorec.models.tokenizer import chatml_template, tiny_hf_tokenizer

IMAGE_SIZE = 32
PATCH_SIZE = 8
QWEN_IMAGE_SIZE = 64  # Qwen2-VL resizes to ~this many pixels, keeping the aspect ratio
TEXT_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
_MEAN, _STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _text_ids(tokenizer) -> dict[str, int]:
    """Return the pad/bos/eos ids of ``tokenizer`` as config keyword arguments."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _tiny_llava(image_size: int = IMAGE_SIZE, vision_hidden: int = 32,
                text_dims: dict[str, int] | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """LLaVA-1.5 layout: CLIP vision tower, 2-layer GELU projector, Llama language model.

    The sizes default to ``tiny-llava``'s; the speed benchmarks pass larger ones
    (``(image_size / 8)²`` tokens per image, ``text_dims`` overriding :data:`TEXT_DIMS`).
    """
    tok = tiny_hf_tokenizer(chatml_template("<image>"))
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
        num_attention_heads=max(2, vision_hidden // 32), image_size=image_size,
        patch_size=PATCH_SIZE, projection_dim=vision_hidden,
    )
    text = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False,
                       **{**TEXT_DIMS, **(text_dims or {})}, **_text_ids(tok))
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        **_text_ids(tok),
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=_MEAN, image_std=_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return LlavaForConditionalGeneration(config), processor


def _tiny_qwen2_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Qwen2-VL layout: native-resolution ViT with 2×2 patch merger and M-RoPE language model."""
    tok = tiny_hf_tokenizer(chatml_template("<|vision_start|><|image_pad|><|vision_end|>"))
    head_dim = TEXT_DIMS["hidden_size"] // TEXT_DIMS["num_attention_heads"]
    half = head_dim // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    text = {"vocab_size": len(tok), "rope_parameters": rope, **TEXT_DIMS, **_text_ids(tok)}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": TEXT_DIMS["hidden_size"], "num_heads": 2,
              "patch_size": PATCH_SIZE, "spatial_merge_size": 2, "temporal_patch_size": 2}
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    pixels = QWEN_IMAGE_SIZE * QWEN_IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        min_pixels=pixels, max_pixels=pixels,
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2, image_mean=_MEAN,
        image_std=_STD,
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=pixels, max_pixels=pixels,
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2, image_mean=_MEAN,
        image_std=_STD,
    )
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=video_processor, chat_template=tok.chat_template)
    return Qwen2VLForConditionalGeneration(config), processor


def _tiny_idefics3() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Idefics3 / SmolVLM layout: SigLIP-style tower, pixel-shuffle connector, Llama LM."""
    tok = tiny_hf_tokenizer(chatml_template("<image>"))
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}
    text = {"model_type": "llama", "vocab_size": len(tok), "tie_word_embeddings": False,
            **TEXT_DIMS, **_text_ids(tok)}
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), **_text_ids(tok))
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE}, image_mean=_MEAN, image_std=_STD,
    )
    seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=seq_len, chat_template=tok.chat_template)
    return Idefics3ForConditionalGeneration(config), processor


TINY_BUILDERS: dict[str, Callable[..., tuple[PreTrainedModel, ProcessorMixin]]] = {
    "tiny-llava": _tiny_llava,
    "tiny-qwen2-vl": _tiny_qwen2_vl,
    "tiny-idefics3": _tiny_idefics3,
}


def build_tiny_backbone(name: str, output_dir: str | Path, *, seed: int = 0,
                        **sizes: Any) -> Path:
    """Build the tiny backbone ``name`` with seeded random weights and save model + processor.

    Args:
        name: One of :data:`TINY_BUILDERS` (``tiny-llava``, ``tiny-qwen2-vl``, ``tiny-idefics3``).
        output_dir: Folder to write (``config.json``, ``model.safetensors``, processor files).
        seed: Seed of the weight initialisation (same seed, same weights).
        **sizes: Size overrides the builder takes (``tiny-llava``: ``image_size``,
            ``vision_hidden``, ``text_dims``); none gives the tests' tiny sizes.

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        ValueError: If ``name`` is not a tiny backbone.
    """
    if name not in TINY_BUILDERS:
        raise ValueError(f"unknown tiny backbone {name!r}; choose one of {sorted(TINY_BUILDERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = TINY_BUILDERS[name](**sizes)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    return output_dir
