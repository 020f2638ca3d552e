"""The ``model:`` section of a recipe: which backbone, which dtype, LoRA / QLoRA, freezing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hanorec.config import FieldError


def default_builtin_cache_dir() -> str:
    """Return ``$HANOREC_CACHE/models`` or ``~/.cache/hanorec/models``."""
    root = os.environ.get("HANOREC_CACHE") or str(Path.home() / ".cache" / "hanorec")
    return str(Path(root) / "models")


@dataclass
class ModelConfig:
    """Backbone and adapter settings shared by SFT, DPO and evaluation."""

    model_name_or_path: str = field(
        default="tiny-llava",
        metadata={"help": "Hub id, local folder (save_pretrained layout), or a built-in name: "
                          "tiny-llava, tiny-qwen2-vl, tiny-idefics3 (random weights, for tests) or "
                          "smollm2-llava (pretrained SmolLM2-135M + a vision tower trained from "
                          "scratch)."},
    )
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata={"help": "Weight dtype. float32 on CPU; bfloat16 on recent GPUs; auto = as "
                          "saved."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow executing Python code shipped with a hub model. Off by "
                          "default: every "
                          "supported backbone is native to transformers, and remote code runs "
                          "with your "
                          "privileges."},
    )
    use_lora: bool = field(
        default=True,
        metadata={"help": "Train LoRA adapters instead of the full model (HaNoRec trains LoRA "
                          "in both "
                          "stages, arXiv 2511.18740 Sec. 5)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={
        "help": "LoRA scaling alpha (update scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "'all-linear' = every nn.Linear of the LANGUAGE MODEL (never the "
                          "vision tower, "
                          "the projector or lm_head), or a comma-separated list of module-name "
                          "suffixes "
                          "(e.g. 'q_proj,v_proj'), again restricted to the language model."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the language model's linear layers in 4-bit NF4 with "
                          "bitsandbytes "
                          "(double quantisation) and prepare them for k-bit training. Needs "
                          "use_lora."},
    )
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Keep the vision encoder frozen (LLaVA recipe)."},
    )
    freeze_projector: bool = field(
        default=False,
        metadata={"help": "Keep the multimodal projector frozen. When false it is fully trained "
                          "(saved "
                          "with the adapter as a modules_to_save copy under LoRA)."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass (less memory, ~30% slower; "
                          "disables the KV cache, so the shared-prompt forward packs sequences "
                          "instead)."},
    )
    attn_implementation: Literal["eager", "sdpa"] = field(
        default="sdpa",
        metadata={"help": "Attention kernel: sdpa (torch's fused scaled-dot-product attention; "
                          "on this "
                          "2-core CPU it scored the demo's 20 candidates 2.3x faster than eager "
                          "and "
                          "trained 1.5x faster, with the same loss) or eager (the reference "
                          "loop)."},
    )
    builtin_cache_dir: str = field(
        default_factory=default_builtin_cache_dir,
        metadata={"help": "Where built-in backbones are materialised once "
                          "(default $HANOREC_CACHE/models or ~/.cache/hanorec/models)."},
    )

    def __post_init__(self) -> None:
        """Check value ranges; raise a FieldError naming the field (the recipe adds the file)."""
        if self.lora_r <= 0:
            raise FieldError("ModelConfig", "lora_r", f"must be positive, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FieldError("ModelConfig", "lora_dropout",
                             f"must be in [0, 1), got {self.lora_dropout}")
        if self.load_in_4bit and not self.use_lora:
            raise FieldError("ModelConfig", "load_in_4bit",
                             "QLoRA needs model.use_lora: 4-bit weights cannot be trained")
