"""Per-architecture facts: where the vision tower, projector and language model live.

Every stage talks to the backbone through these accessors so that LLaVA, Qwen2-VL and
Idefics3 (SmolVLM) differ in one table, not in every loop: :data:`FAMILIES` (the backbones
hanorec loads, with their layout and whether their positions are M-RoPE), and the sets the
shared-prompt forward (:mod:`hanorec.forward`) and the read-outs derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilyLayout:
    """Module names (relative to the inner ``model.model``) of one backbone family.

    Attributes:
        vision: Attribute of the vision encoder.
        projector: Name suffix of the vision→text projector (for LoRA ``modules_to_save``).
        language: Attribute of the language model (decoder without the LM head).
        image_inputs: Batch keys the vision encoder reads.
        mrope: Positions are multimodal RoPE (3-axis ``position_ids``).
    """

    vision: str
    projector: str
    language: str
    image_inputs: tuple[str, ...]
    mrope: bool = False


FAMILIES: dict[str, FamilyLayout] = {
    "llava": FamilyLayout("vision_tower", "multi_modal_projector", "language_model",
                          ("pixel_values",)),
    "qwen2_vl": FamilyLayout("visual", "merger", "language_model",
                             ("pixel_values", "image_grid_thw"), mrope=True),
    "qwen2_5_vl": FamilyLayout("visual", "merger", "language_model",
                               ("pixel_values", "image_grid_thw"), mrope=True),
    "idefics3": FamilyLayout("vision_model", "connector", "text_model",
                             ("pixel_values", "pixel_attention_mask")),
}

#: ``model_type`` of backbones whose shared-prompt paths match the duplicated batch in
#: tests/test_forward.py: every family above, and SmolVLM (Idefics3's architecture under its own
#: name). Other causal backbones are probed once at first use (:mod:`hanorec.forward`).
SHARED_FAMILIES: frozenset[str] = frozenset({*FAMILIES, "smolvlm"})
#: Backbones with multimodal RoPE (3-axis ``position_ids`` from ``get_rope_index``).
MROPE_FAMILIES: frozenset[str] = frozenset(name for name, f in FAMILIES.items() if f.mrope)
#: Backbones whose prompt attention is not causal (prefix-LM / bidirectional image tokens):
#: a response cannot branch from their prompt's cache.
UNSHARED_FAMILIES: frozenset[str] = frozenset({"paligemma", "gemma3"})


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model under a PEFT wrapper (or ``model`` itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def backbone_family(model: nn.Module) -> str:
    """Return the family key of ``model`` (``'llava'``, ``'qwen2_vl'``, ``'idefics3'``, ...).

    Raises:
        ValueError: If the architecture is not in :data:`FAMILIES`.
    """
    family = unwrap(model).config.model_type
    if family not in FAMILIES:
        raise ValueError(f"unsupported backbone model_type {family!r}; supported: "
                         f"{sorted(FAMILIES)}")
    return family


def family_layout(model: nn.Module) -> FamilyLayout:
    """Return the :class:`FamilyLayout` of ``model``."""
    return FAMILIES[backbone_family(model)]


def _inner(model: nn.Module) -> nn.Module:
    """Return the ``*Model`` that holds vision tower, projector and language model."""
    return unwrap(model).model


def vision_tower(model: nn.Module) -> nn.Module:
    """Return the vision encoder module of ``model``."""
    return getattr(_inner(model), family_layout(model).vision)


def projector(model: nn.Module) -> nn.Module:
    """Return the vision→text projector (for Qwen2-VL the patch merger inside ``visual``)."""
    layout = family_layout(model)
    inner = _inner(model)
    for name, module in inner.named_modules():
        if name == layout.projector or name.endswith("." + layout.projector):
            return module
    raise ValueError(f"projector {layout.projector!r} not found in {type(inner).__name__}")


def language_model_and_embeddings(model: nn.Module) -> tuple[nn.Module, nn.Embedding]:
    """Return the language model (decoder stack, no LM head) and its input token embeddings.

    The embeddings give HaRS's text item embedding ``e_txt`` (mean of the title's token
    embeddings, arXiv 2511.18740 Sec. 4.1).
    """
    language = getattr(_inner(model), family_layout(model).language)
    return language, unwrap(model).get_input_embeddings()


def language_model_prefix(model: nn.Module) -> str:
    """Return the dotted module name of the language model inside ``model`` (unwrapped)."""
    language, _ = language_model_and_embeddings(model)
    for name, module in unwrap(model).named_modules():
        if module is language:
            return name
    raise ValueError("language model not found among the model's modules")


def image_features(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run the vision tower + projector and return one ``(tokens, hidden)`` tensor per image.

    The token count of each tensor equals the number of image placeholder tokens the processor
    writes for that image (checked in the collation tests). HaRS's image embedding ``e_img`` is
    the mean over its rows.

    Args:
        model: A backbone (PEFT-wrapped or not).
        batch: Processor output holding the family's image inputs (see :class:`FamilyLayout`).

    Returns:
        A list with one tensor per image, in the order the images appear in the batch (for
        Idefics3 with image splitting on, one per sub-image: the processor splits before the
        model sees anything).
    """
    base = unwrap(model)
    family = backbone_family(model)
    inputs = {key: batch[key] for key in FAMILIES[family].image_inputs if key in batch}
    pooled = base.get_image_features(**inputs).pooler_output
    if family != "idefics3":
        return [f.reshape(-1, f.shape[-1]) for f in pooled]
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in pooled])
    cfg = base.config
    per_image = (cfg.vision_config.image_size
                 // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor**2
    return list(flat.split(per_image))
