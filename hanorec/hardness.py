"""HaRS item embeddings and per-pair hardness (HaNoRec, arXiv 2511.18740, Sec. 3.2).

Everything HaRS needs before training, in the order the DPO stage uses it:
:func:`hardness_item_embeddings` (the item vectors whose neighbourhoods define hardness, one
of :data:`HARDNESS_EMBEDDINGS`; ``backbone``, the paper's, is :func:`sft_item_embeddings`: the
catalogue encoded once by the SFT model, cached) → :func:`pair_lambdas` (Δ and the static λ of
every training pair, eqs. 5–6, with the profile temperature τ). Per batch, β comes from
:func:`hanorec.losses.hars_betas` (eqs. 8, 11). ``docs/methods.md`` has the formulas.

The other choices read the SFT model's item encoder (:mod:`hanorec.item_tokens`): ``head`` its
ranking-head item vectors (``ItemEncoder.item_vectors(view=0)``, the space the policy ranks
in), ``collab`` the collaborative recommender's item embeddings (``ItemEncoder.collab[0]``).

For ``backbone`` the model encodes the whole catalogue once:

* ``e_txt(v)`` — the mean of the backbone's *input token embeddings* over the tokens of the
  item's title (no forward pass: a table look-up, so it is cheap for 100k items);
* ``e_img(v)`` — the mean of the vision features the backbone feeds its language model for the
  item's image (``model.get_image_features``: vision tower + projector, the features that
  replace the image tokens);
* ``e(v) = normalize(normalize(e_txt) + normalize(e_img))``, or ``normalize(e_txt)`` for an item
  without an image (``hanorec.losses.fuse_item_embeddings``).

The fused matrix is cached on disk under a key made of the model's identity (its weights'
file hashes) and the catalogue's content, so a DPO run, its ``--negatives hard`` sampling and
its evaluation share one encoding. Pair distances Δ (eq. 5) and static hardness λ (eq. 6)
come from ``hanorec.losses``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hanorec.data.catalog import Catalog
from hanorec.item_tokens import attached_encoder
from hanorec.losses import fuse_item_embeddings, hardness_lambdas, pair_deltas
from hanorec.models.families import image_features, unwrap

#: Item embeddings HaRS can measure hardness in (``dpo.hardness_embedding``): the SFT backbone's
#: fused title + image embeddings (the paper), the ranking head's item vectors, or the
#: collaborative recommender's item embeddings.
HARDNESS_EMBEDDINGS: tuple[str, ...] = ("backbone", "head", "collab")


@torch.no_grad()
def title_embeddings(model: torch.nn.Module, tokenizer, titles: Sequence[str], *,
                     batch_size: int = 512) -> torch.Tensor:
    """Mean input-token embedding over each title's tokens: ``e_txt`` [N, d] (float32)."""
    table = unwrap(model).get_input_embeddings().weight
    out = torch.empty(len(titles), table.shape[1], dtype=torch.float32)
    for start in range(0, len(titles), batch_size):
        chunk = [t if t.strip() else " " for t in titles[start : start + batch_size]]
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for row, token_ids in enumerate(ids):
            if not token_ids:
                raise ValueError(f"title {chunk[row]!r} (item {start + row}) has no tokens")
            idx = torch.tensor(token_ids, device=table.device)
            out[start + row] = table[idx].float().mean(0).cpu()
    return out


@torch.no_grad()
def image_embeddings(
    model: torch.nn.Module,
    image_processor,
    image_paths: Sequence[str | None],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Mean vision feature per item image: ``e_img`` [N, d] and a mask of items that have one.

    Items whose path is ``None`` are text-only (mask False, zero row). Images are opened with
    PIL and converted to RGB; the processor resizes them as in training.
    """
    has_image = torch.tensor([p is not None for p in image_paths], dtype=torch.bool)
    todo = [i for i, p in enumerate(image_paths) if p is not None]
    if not todo:
        return None, has_image
    inner = unwrap(model)
    device = next(inner.parameters()).device
    rows: dict[int, torch.Tensor] = {}
    for start in tqdm(range(0, len(todo), batch_size), desc="item images", disable=not progress,
                      unit="batch"):
        ids = todo[start : start + batch_size]
        images = []
        for i in ids:
            with Image.open(image_paths[i]) as im:
                images.append(im.convert("RGB"))
        inputs = {k: v.to(device) for k, v in _image_inputs(image_processor, images).items()}
        if inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(inner.dtype)
        for i, features in zip(ids, image_features(model, inputs)):
            rows[i] = features.float().mean(0).cpu()
    dim = next(iter(rows.values())).shape[0]
    matrix = torch.zeros(len(image_paths), dim)
    for i, v in rows.items():
        matrix[i] = v
    return matrix, has_image


def _image_inputs(image_processor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Image-processor outputs for single images, one image per batch element."""
    if "idefics" in type(image_processor).__name__.lower():  # (B, 1, C, H, W) without splitting
        enc = image_processor([[im] for im in images], return_tensors="pt",
                              do_image_splitting=False)
    else:
        enc = image_processor(images=images, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def catalogue_key(model_files: Sequence[str | Path], titles: Sequence[str],
                  image_paths: Sequence[str | None]) -> str:
    """A cache key from the model's weight files (content hashes) and the catalogue's content."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in model_files):
        digest.update(path.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps([list(titles), list(image_paths)]).encode())
    return digest.hexdigest()[:24]


def catalogue_embeddings(
    model: torch.nn.Module,
    processor,
    titles: Sequence[str],
    image_paths: Sequence[str | None],
    *,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    use_images: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Fused, L2-normalised item embeddings [N, d] for the whole catalogue, cached on disk."""
    cache_file = (
        Path(cache_dir) / f"item-embeddings-{cache_key}.safetensors"
        if cache_dir and cache_key
        else None
    )
    if cache_file is not None and cache_file.is_file():
        return load_file(str(cache_file))["embeddings"]
    tokenizer = getattr(processor, "tokenizer", processor)
    text = title_embeddings(model, tokenizer, titles)
    image, has_image = (None, None)
    if use_images and any(p is not None for p in image_paths):
        image, has_image = image_embeddings(model, processor.image_processor, image_paths,
                                            progress=progress)
    fused = fuse_item_embeddings(text, image,
                                 has_image) if image is not None else fuse_item_embeddings(text)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file({"embeddings": fused.contiguous()}, str(tmp))
        tmp.replace(cache_file)
    return fused


def pair_hardness(embeddings: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, *,
                  top_k: int = 10,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ (eq. 5, profiles divided by ``temperature`` τ) and static λ (eq. 6) for every training
    pair; ``rejected`` is [P] or [P, K]."""
    deltas = pair_deltas(embeddings, chosen, rejected, top_k=top_k, temperature=temperature)
    return deltas, hardness_lambdas(deltas)


def sft_item_embeddings(model: torch.nn.Module, processor, catalog: Catalog, model_dir: Path, *,
                        cache_dir: str | Path, progress: bool = True) -> torch.Tensor:
    """The catalogue's fused item embeddings under the model trained in ``model_dir``.

    Cached in ``cache_dir`` under a key of ``model_dir``'s weight files and the catalogue
    (:func:`catalogue_key`), so a resumed or repeated stage encodes the catalogue once.
    """
    images = [str(p) if p else None for p in map(catalog.image_path, catalog.item_ids)]
    key = catalogue_key(sorted(Path(model_dir).glob("*.safetensors")), catalog.titles, images)
    return catalogue_embeddings(model, processor, catalog.titles, images, cache_dir=cache_dir,
                                cache_key=key, progress=progress)


@torch.no_grad()
def hardness_item_embeddings(kind: str, model: torch.nn.Module, processor, catalog: Catalog,
                             model_dir: Path, *, cache_dir: str | Path,
                             progress: bool = True) -> torch.Tensor:
    """``[N, d]`` item embeddings of HaRS's neighbourhoods (float32, CPU), one of
    :data:`HARDNESS_EMBEDDINGS`, read from the SFT model (the policy before any DPO step).

    * ``backbone``: :func:`sft_item_embeddings` (title-token mean + vision-feature mean, fused;
      HaNoRec's);
    * ``head``: the ranking head's item vectors ``ItemEncoder.item_vectors(view=0)``;
    * ``collab``: the collaborative recommender's item embeddings ``ItemEncoder.collab[0]``.

    Raises:
        ValueError: an unknown kind; ``head``/``collab`` on a model without an item encoder,
            ``collab`` without collaborative features, or an encoder of another catalogue size.
    """
    if kind not in HARDNESS_EMBEDDINGS:
        raise ValueError(f"hardness_embedding must be one of {HARDNESS_EMBEDDINGS}, got {kind!r}")
    if kind == "backbone":
        return sft_item_embeddings(model, processor, catalog, model_dir, cache_dir=cache_dir,
                                   progress=progress)
    encoder = attached_encoder(model)
    if encoder is None:
        need = ("prompt.answer: head (a ranking head)" if kind == "head"
                else "item tokens (prompt.item_tokens: true)")
        raise ValueError(f"hardness_embedding: {kind} reads the SFT model's item encoder, and "
                         f"{model_dir} has none; it needs {need}, or use backbone")
    if encoder.spec.num_items != len(catalog):
        raise ValueError(f"hardness_embedding: {kind}: the item encoder has "
                         f"{encoder.spec.num_items} items, the catalogue {len(catalog)}")
    if kind == "head":
        return encoder.item_vectors(None, view=0).float().cpu()
    if encoder.collab is None:
        raise ValueError("hardness_embedding: collab needs the collaborative recommender's item "
                         "embeddings (item tokens with collaborative features), and the SFT "
                         "model's item encoder has none; use backbone or head")
    return encoder.collab[0].float().cpu()


def item_indices(rows: list[dict],
                 catalog: Catalog) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen [N] and rejected [N, K] catalogue indices, and a mask of rows that are item pairs."""
    is_item = torch.tensor([r["chosen"] in catalog.index for r in rows])
    chosen = torch.tensor([catalog.index.get(r["chosen"], 0) for r in rows])
    rejected = torch.tensor([[catalog.index.get(x, 0) for x in r["rejected"]] for r in rows])
    return chosen, rejected, is_item


def static_hardness(embeddings: torch.Tensor, rows: list[dict], catalog: Catalog, *, top_k: int,
                    pairwise: bool, temperature: float = 1.0) -> torch.Tensor:
    """λ per pair (eq. 6): [N] (mean Δ over the negatives, S-DPO) or [N, K] (every negative its
    own pair), Δ with the profile temperature τ (eq. 5). Rows that are not item pairs (Yes/No
    answers, free text) get λ = 1 and stay out of eq. 6's mean Δ, which runs over the item
    pairs only."""
    chosen, rejected, is_item = item_indices(rows, catalog)
    k = rejected.shape[1]
    lam = torch.ones(len(rows), k) if pairwise else torch.ones(len(rows))
    if not bool(is_item.any()):
        return lam
    chosen, rejected = chosen[is_item], rejected[is_item]
    if pairwise:
        _, found = pair_hardness(embeddings, chosen.repeat_interleave(k), rejected.reshape(-1),
                                 top_k=top_k, temperature=temperature)
        found = found.view(-1, k)
    else:
        _, found = pair_hardness(embeddings, chosen, rejected, top_k=top_k,
                                 temperature=temperature)
    lam[is_item] = found.to(lam.dtype)
    return lam


def pair_lambdas(embeddings: torch.Tensor | None, rows: list[dict], catalog: Catalog, *,
                 top_k: int, pairwise: bool, temperature: float = 1.0) -> torch.Tensor:
    """:func:`static_hardness`, or λ = 1 for every pair when there are no embeddings (HaRS off,
    or a catalogue without items)."""
    if embeddings is not None:
        return static_hardness(embeddings, rows, catalog, top_k=top_k, pairwise=pairwise,
                               temperature=temperature)
    k = len(rows[0]["rejected"]) if rows else 1
    return torch.ones(len(rows), k if pairwise else 1).squeeze(-1)
