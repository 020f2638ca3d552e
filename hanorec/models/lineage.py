"""Model lineage: what a stage's ``final/`` folder holds and how it becomes a model again.

A stage exports its adapter (or, fully fine-tuned, its whole model) with the processor and a
``hanorec.json`` that records the base model, whether the folder is an adapter, the ``parent``
adapter it was trained on top of (DPO's parent is SFT's ``final/``), and the ``model:`` and
``prompt:`` sections it ran with. An item encoder attached to the model
(:mod:`hanorec.item_tokens`) is saved beside it as ``item_encoder.*``.

* :func:`export_model` — write such a folder atomically (temporary name, then a rename);
* :func:`check_model_folder` — refuse, in one line, a folder that must not be loaded: pickled
  weights (hanorec writes safetensors only, and a pickle can run code when read) or a damaged
  safetensors file (truncated, bad header);
* :func:`load_trained` — the model as trained: the base, then every adapter of the lineage
  merged oldest first, and the newest item encoder re-attached (frozen, eval mode);
* :func:`load_policy_from_sft` — the preference-optimisation policy: the SFT lineage merged and
  a fresh trainable LoRA adapter on top, so that "adapter disabled" is the SFT model (the
  frozen reference of HaNoRec, arXiv 2511.18740, Sec. 5).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from hanorec.config import to_dict
from hanorec.item_tokens import (
    SPEC_FILE,
    attach_item_encoder,
    attached_encoder,
    encoder_detached,
    load_item_encoder,
    save_item_encoder,
)
from hanorec.models.config import ModelConfig
from hanorec.models.loading import add_lora, load_backbone

LINEAGE_FILE = "hanorec.json"
#: Weight files that are pickles: never read, whatever ``weights_only`` would make of them.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_model_folder(folder: Path) -> None:
    """Refuse a stage folder whose weights must not be loaded.

    Every ``*.safetensors`` file must open (its header parses and covers the file: a truncated
    copy fails here); no pickled weights file may be present.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    from safetensors import safe_open

    for pattern in PICKLED_WEIGHTS:
        for path in sorted(folder.glob(pattern)):
            raise ValueError(f"{path}: pickled weights are refused (hanorec reads safetensors "
                             "only; loading a pickle can run code). Re-export the model with "
                             "save_pretrained(safe_serialization=True)")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as weights:
                weights.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
            raise ValueError(f"{path}: damaged safetensors file ({err}); re-export the stage "
                             "or point at an intact copy") from None


def read_lineage(folder: Path) -> dict[str, Any]:
    """The ``hanorec.json`` of a stage's model folder.

    Raises:
        ValueError: The folder has no ``hanorec.json`` (it is not a stage's ``final/``).
    """
    meta = folder / LINEAGE_FILE
    if not meta.is_file():
        raise ValueError(f"{folder} is not a hanorec model folder (no {LINEAGE_FILE}); pass the "
                         "'final' folder a stage wrote")
    return json.loads(meta.read_text())


def lineage_chain(folder: str | Path) -> list[Path]:
    """The folders of a lineage, oldest first (``[sft/final, dpo/final]`` for a DPO model)."""
    chain: list[Path] = []
    current: Path | None = Path(folder)
    while current is not None:
        info = read_lineage(current)
        check_model_folder(current)
        chain.append(current)
        current = Path(info["parent"]) if info.get("parent") else None
    return chain[::-1]


def load_trained(model_cfg: ModelConfig, folder: str | Path) -> tuple[nn.Module, Any]:
    """Load a stage's output for inference: the base, then every adapter of its lineage merged.

    ``<run>/dpo/final`` names its parent ``<run>/sft/final``; the chain is applied oldest first
    (each adapter merged into the base before the next), so the result is the model as trained.
    A fully fine-tuned first stage is the base itself.

    Returns:
        ``(model, processor)``, the model frozen and in eval mode.
    """
    from peft import PeftModel

    chain = lineage_chain(folder)
    adapter_first = read_lineage(chain[0])["adapter"]
    base_cfg = model_cfg if adapter_first else replace(model_cfg, model_name_or_path=str(chain[0]))
    model, processor = load_backbone(base_cfg, for_training=False)
    for adapter in chain if adapter_first else chain[1:]:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        model = model.merge_and_unload()
    encoders = [stage for stage in chain if (stage / SPEC_FILE).is_file()]
    if encoders:  # the newest stage's item encoder (a later stage saves the one it ran with)
        attach_item_encoder(model, load_item_encoder(encoders[-1]))
    model.requires_grad_(False)
    return model.eval(), processor


def load_policy_from_sft(model_cfg: ModelConfig, sft_dir: str | Path) -> tuple[nn.Module, Any]:
    """The preference policy: the SFT model (adapter chain merged) with a fresh trainable adapter.

    Raises:
        ValueError: ``model.use_lora`` is off (the reference is the policy, adapter disabled).
    """
    model, processor = load_trained(model_cfg, sft_dir)
    if not model_cfg.use_lora:
        raise ValueError("preference optimisation needs model.use_lora: the reference is the "
                         "policy with its adapter disabled")
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return add_lora(model, model_cfg).train(), processor


def export_model(model: nn.Module, processor: Any, folder: Path, model_cfg: ModelConfig, *,
                 parent: str | None = None, prompt_cfg: Any = None) -> None:
    """Save the adapter (or the full model) with the processor and a ``hanorec.json`` lineage.

    Args:
        model: The trained model (a ``PeftModel`` when it trained an adapter).
        processor: Its processor.
        folder: The output folder (``<run_dir>/<stage>/final``).
        model_cfg: The ``model:`` section it was loaded with.
        parent: An adapter folder merged into the base before this one (DPO on SFT).
        prompt_cfg: The ``prompt:`` section it was trained with, recorded in ``hanorec.json``.

    An attached item encoder is written beside the weights (``item_encoder.*``). The folder is
    written next to its final name and renamed into place (atomic).
    """
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    encoder = attached_encoder(model)
    with encoder_detached(model):  # the encoder is saved on its own, not inside the model's weights
        model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if encoder is not None:
        save_item_encoder(encoder, tmp)
    lineage = {"base_model": model_cfg.model_name_or_path, "adapter": hasattr(model, "peft_config"),
               "parent": parent, "model": to_dict(model_cfg),
               "prompt": to_dict(prompt_cfg) if prompt_cfg is not None else None}
    (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
