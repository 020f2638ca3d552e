"""The item encoder a recipe asks for, built from the prepared data and the backbone.

:class:`hanorec.item_tokens.ItemEncoder` is model-side and knows nothing of data; this module
fills it for one recipe (the ``prompt:`` and ``collab:`` sections):

* collaborative features when ``prompt.item_tokens`` is on: the recommender of
  :mod:`hanorec.collab` (trained on the training split once per prepared folder and cached),
  its item table for the item tokens and its network for the user token;
* title vectors when ``prompt.answer`` is ``head``: the mean input embedding of each item's
  displayed title (HaRS's ``e_txt``, :func:`hanorec.hardness.title_embeddings`);
* pooled poster features when ``prompt.image_tokens`` is ``pooled`` and images are on: the
  mean of the backbone's vision features per item image, computed once
  (:func:`hanorec.hardness.image_embeddings`) — the vision tower and its projector are then
  frozen by construction, and a poster costs one token.

A trained encoder travels with the stage's ``final/`` folder (:mod:`hanorec.models.lineage`), so
evaluation and later stages reload it rather than rebuild it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hanorec.collab import CollabConfig, CollabFeatures, collab_features
from hanorec.data.catalog import Catalog
from hanorec.data.prompts import PromptStyle
from hanorec.item_tokens import EncoderSpec, ItemEncoder, attach_item_encoder


def token_rms(model: nn.Module) -> float:
    """RMS of the backbone's input token embeddings (the scale injected tokens start at)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return float(base.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())


def _text_features(model: nn.Module, processor: Any, catalog: Catalog,
                   style: PromptStyle) -> torch.Tensor:
    from hanorec.hardness import title_embeddings

    tokenizer = getattr(processor, "tokenizer", processor)
    return title_embeddings(model, tokenizer, [style.display_title(t) for t in catalog.titles])


def _image_features(model: nn.Module, processor: Any, catalog: Catalog,
                    progress: bool) -> torch.Tensor:
    from hanorec.hardness import image_embeddings

    paths = [str(p) if p else None for p in map(catalog.image_path, catalog.item_ids)]
    table, _ = image_embeddings(model, processor.image_processor, paths, progress=progress)
    if table is None:
        raise ValueError("prompt.image_tokens: pooled, but no catalogue item has an image")
    return table


def build_encoder(model: nn.Module, processor: Any, catalog: Catalog, style: PromptStyle, *,
                  with_images: bool, collab: CollabFeatures | None, collab_cfg: CollabConfig,
                  progress: bool = True) -> ItemEncoder:
    """An encoder with exactly the features ``style`` uses, its projectors scaled to the LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_input_embeddings().embedding_dim
    pooled = style.image_tokens == "pooled" and with_images
    if style.item_tokens and collab is None:
        raise ValueError("prompt.item_tokens needs the collaborative features")
    spec = EncoderSpec(
        hidden=hidden, num_items=len(catalog),
        collab_dim=int(collab.item_embeddings.shape[-1]) if style.item_tokens else 0,
        text=style.answer == "head" and style.titles, image=pooled, user=style.user_token,
        projector_hidden=collab_cfg.projector_hidden, similarity=collab_cfg.head_similarity,
        tau=collab_cfg.head_tau, sasrec=collab.meta["sasrec"] if style.user_token else None,
        views=collab.views if style.item_tokens else 1,
        fit=collab.rows.fit if style.item_tokens else "insample",
        folds=collab.rows.folds if style.item_tokens else 0,
        fold_seed=collab.rows.fold_seed if style.item_tokens else 0,
        holdout=collab.rows.holdout if style.item_tokens else 0,
        prior=collab_cfg.head_prior and style.user_token)
    encoder = ItemEncoder(spec)
    encoder.set_features(
        collab=collab.item_embeddings if spec.collab_dim else None,
        text=_text_features(model, processor, catalog, style) if spec.text else None,
        image=_image_features(model, processor, catalog, progress) if spec.image else None,
        sasrec_states=[m.state_dict() for m in collab.models] if spec.user else None,
        token_rms=token_rms(model))
    return encoder


def attach_for_recipe(model: nn.Module, processor: Any, catalog: Catalog, prepared: str | Path,
                      style: PromptStyle, collab_cfg: CollabConfig, *, with_images: bool,
                      progress: bool = True) -> tuple[ItemEncoder | None, CollabFeatures | None]:
    """Build and attach the encoder the recipe needs (none when the style needs none).

    Returns:
        ``(encoder or None, collaborative features or None)``; the features also tell which
        training rows' views (:meth:`CollabFeatures.training_rows`).
    """
    if not style.needs_encoder:
        return None, None
    collab = collab_features(prepared, len(catalog), collab_cfg,
                             log=print if progress else None) if style.item_tokens else None
    encoder = build_encoder(model, processor, catalog, style, with_images=with_images,
                            collab=collab,
                            collab_cfg=collab_cfg, progress=progress)
    attach_item_encoder(model, encoder)
    return encoder, collab


__all__ = ["attach_for_recipe", "build_encoder", "token_rms"]
