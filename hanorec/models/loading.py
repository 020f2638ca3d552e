"""Load a vision-language backbone with its processor, then freeze, quantise and add LoRA.

Order of operations in :func:`load_backbone`:

1. resolve a built-in name to its cached ``save_pretrained`` folder (built on first use);
2. ``AutoModelForImageTextToText.from_pretrained`` (dtype, attention kernel, optional 4-bit NF4
   quantisation of the language model only) and ``AutoProcessor.from_pretrained``;
3. freeze the vision tower (and the projector if asked);
4. QLoRA: ``prepare_model_for_kbit_training``; gradient checkpointing if asked;
5. LoRA on the language model's linear layers only (a regex that excludes the vision tower,
   the projector and ``lm_head``); a trainable projector is kept as a ``modules_to_save`` copy.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    ProcessorMixin,
)

from hanorec.models.builtin import ensure_builtin, is_builtin
from hanorec.models.config import ModelConfig
from hanorec.models.families import (
    family_layout,
    language_model_prefix,
    projector,
    unwrap,
    vision_tower,
)

_FULL_PRECISION = ("vision_tower", "multi_modal_projector", "visual", "vision_model", "connector",
                   "lm_head")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(cfg: ModelConfig) -> str:
    """Return a hub id or local folder for ``cfg.model_name_or_path`` (building built-ins once)."""
    if is_builtin(cfg.model_name_or_path):
        return str(ensure_builtin(cfg.model_name_or_path, cfg.builtin_cache_dir))
    return cfg.model_name_or_path


def _quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig:
    """NF4 4-bit config (QLoRA, Dettmers et al. 2023) for the language model's linear layers."""
    compute = _DTYPES.get(cfg.torch_dtype, torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        # vision tower, projector and LM head stay in full precision (transformers matches these
        # patterns as regexes from the start of the module name, up to a module boundary)
        llm_int8_skip_modules=[rf".*\b{name}" for name in _FULL_PRECISION],
    )


def _from_pretrained(cfg: ModelConfig, path: str) -> nn.Module:
    kwargs: dict = {
        "dtype": "auto" if cfg.torch_dtype == "auto" else _DTYPES[cfg.torch_dtype],
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = _quantization_config(cfg)
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs)


def lora_target_regex(model: nn.Module, target_modules: str = "all-linear") -> str:
    """Return a PEFT ``target_modules`` regex matching the language model's linear layers only.

    Args:
        model: The (unwrapped) backbone.
        target_modules: ``"all-linear"`` or comma-separated module-name suffixes.

    Returns:
        A regex (PEFT full-matches it against module names) of the form
        ``<language prefix>\\..*\\.(q_proj|k_proj|...)``.

    Raises:
        ValueError: If no linear layer of the language model matches.
    """
    prefix = language_model_prefix(model)
    language = unwrap(model).get_submodule(prefix)
    leaves = sorted({name.rsplit(".", 1)[-1] for name, mod in language.named_modules()
                     if isinstance(mod, nn.Linear)})
    if target_modules != "all-linear":
        wanted = {t.strip() for t in target_modules.split(",") if t.strip()}
        missing = wanted - set(leaves)
        if missing:
            raise ValueError(f"model.lora_target_modules: {sorted(missing)} are not linear "
                             "layers of the "
                             f"language model (available: {leaves})")
        leaves = sorted(wanted)
    if not leaves:
        raise ValueError("model.lora_target_modules: the language model has no linear layer")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})"


def _lora_config(model: nn.Module, cfg: ModelConfig) -> LoraConfig:
    modules_to_save = None if cfg.freeze_projector else [family_layout(model).projector]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_regex(model, cfg.lora_target_modules),
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )


def _freeze(model: nn.Module, cfg: ModelConfig) -> None:
    if cfg.freeze_vision_tower:
        vision_tower(model).requires_grad_(False)
    if cfg.freeze_projector:
        projector(model).requires_grad_(False)


def add_lora(model: nn.Module, cfg: ModelConfig) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter on its language model (:func:`lora_target_regex`).

    Also re-applies the vision-tower freeze, since a trainable projector is a ``modules_to_save``
    copy that PEFT leaves trainable while it freezes everything else.
    """
    peft_model = get_peft_model(model, _lora_config(model, cfg))
    _freeze(peft_model, cfg)
    return peft_model


def _enable_checkpointing(model: nn.Module) -> None:
    """Turn on activation (gradient) checkpointing, non-reentrant (transformers 5 name first)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_backbone(cfg: ModelConfig, *,
                  for_training: bool = True) -> tuple[nn.Module, ProcessorMixin]:
    """Load model and processor as configured.

    Args:
        cfg: The model section of the recipe.
        for_training: When false the model is returned in eval mode, without LoRA, checkpointing
            or k-bit preparation (for evaluation, or to load an adapter onto).

    Returns:
        ``(model, processor)``; the model is a ``PeftModel`` when ``for_training and cfg.use_lora``.
    """
    path = resolve_model_path(cfg)
    model = _from_pretrained(cfg, path)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if not for_training:
        model.requires_grad_(False)
        return model.eval(), processor
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if not cfg.use_lora:
        model.requires_grad_(True)
    _freeze(model, cfg)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
        if cfg.use_lora:
            model.enable_input_require_grads()
    if cfg.use_lora:
        model = add_lora(model, cfg)
    return model.train(), processor


def load_adapter_for_inference(base_cfg: ModelConfig,
                               adapter_dir: str | Path) -> tuple[PeftModel, ProcessorMixin]:
    """Load the base backbone frozen and put the saved LoRA adapter of ``adapter_dir`` on it.

    Args:
        base_cfg: Model config of the base backbone the adapter was trained on.
        adapter_dir: Folder written by ``PeftModel.save_pretrained``.

    Returns:
        ``(model, processor)`` with the model in eval mode and nothing trainable.
    """
    model, processor = load_backbone(base_cfg, for_training=False)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return peft_model.eval(), processor


def merge_and_add_adapter(model: PeftModel, cfg: ModelConfig) -> PeftModel:
    """Merge the current (SFT) adapter into the base weights, then add a fresh LoRA adapter.

    This is how HaNoRec starts preference optimisation from the SFT model (arXiv 2511.18740,
    Sec. 5): the SFT update becomes part of the base, so "adapter disabled" is the SFT model
    (the frozen reference) and the new adapter is the DPO update.

    Under QLoRA the merged weights are re-quantised to NF4 (PEFT warns about rounding), so the
    "disabled adapter" reference differs from the SFT model by that rounding only.

    Args:
        model: A ``PeftModel`` carrying the SFT adapter.
        cfg: Model config (LoRA rank, targets, freezing) for the new adapter.

    Returns:
        A new ``PeftModel`` whose only trainable parameters are the new adapter (and the projector
        copy unless ``cfg.freeze_projector``).
    """
    merged = model.merge_and_unload()
    merged.requires_grad_(False)
    return add_lora(merged, cfg).train()
