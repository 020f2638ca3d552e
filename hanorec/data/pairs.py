"""Preference pairs: the chosen response and K rejected ones per protocol row.

- ``hit1``: chosen is the right answer (``"Yes"`` when ``label == 1`` else ``"No"``),
  rejected the other one (K = 1 whatever ``num_negatives``).
- ``candidates`` / ``hit3``: chosen = the target; the K rejected items come from the row's
  own candidate list minus the target, picked by ``negative_sampling``:
  ``random`` (uniform without replacement), ``popular`` (the K candidates with the highest
  training popularity, random tie-break) or ``hard`` (the K candidates nearest the target
  by cosine similarity of `item_embeddings`).
- ``full``: the K rejected items come from the catalogue minus the user's whole sequence:
  ``random`` (uniform), ``popular`` (drawn with ``p(v) ∝ popularity(v) + 1``) or ``hard``
  (the K nearest items to the target by cosine similarity outside the sequence).

``policy`` and ``collab`` negatives are drawn by a model in the preference stage
(:mod:`hanorec.negatives`); the prepared pairs hold ``random`` ones as placeholders.

S-DPO (Chen et al., NeurIPS 2024) uses K = 3 random negatives; DPO uses K = 1.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hanorec.data.config import MODEL_NEGATIVES
from hanorec.data.protocols import ProtocolRows, SamplingContext


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    matrix = np.asarray(embeddings, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def _from_candidates(rows: ProtocolRows, k: int, strategy: str, rng: np.random.Generator,
                     popularity: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
    size = rows.candidates.shape[1]
    if k > size - 1:
        raise ValueError(f"num_negatives={k} exceeds the {size - 1} negatives of a "
                         f"{rows.protocol} candidate list")
    keep = np.arange(size)[None, :] != rows.target_index[:, None]
    negatives = rows.candidates[keep].reshape(len(rows), size - 1)
    noise = rng.random(negatives.shape)
    if strategy == "random":
        score = noise
    elif strategy == "popular":
        score = -popularity[negatives] + noise * 0.5  # popularity is an int: noise breaks ties
    else:
        unit = _normalised(embeddings)
        score = -np.einsum("rd,rkd->rk", unit[rows.target_item], unit[negatives])
    order = np.argsort(score, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(negatives, order, axis=1)


def _hard_full(rows: ProtocolRows, k: int, context: SamplingContext,
               embeddings: np.ndarray) -> np.ndarray:
    unit = _normalised(embeddings)
    out = np.empty((len(rows), k), dtype=np.int64)
    users = rows.targets.user.astype(np.int64)
    for start in range(0, len(rows), 4096):
        stop = min(start + 4096, len(rows))
        scores = unit[rows.target_item[start:stop]] @ unit.T
        scores[context.exclude.contains(users[start:stop, None],
                                        np.arange(context.num_items)[None, :])] = -np.inf
        out[start:stop] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return out


def rejected_items(rows: ProtocolRows, *, k: int, strategy: str, rng: np.random.Generator,
                   context: SamplingContext, popularity: np.ndarray,
                   item_embeddings: np.ndarray | None = None) -> np.ndarray:
    """``[R, k]`` rejected item indices for an item protocol (see module docstring).

    Args:
        rows: Rows of ``candidates``, ``hit3`` or ``full``.
        k: Rejected items per row.
        strategy: ``random``, ``popular`` or ``hard``.
        rng: Random generator.
        context: Catalogue size and per-user exclusions.
        popularity: Training popularity per item.
        item_embeddings: ``[num_items, d]`` array (or CPU tensor), needed by ``hard``.
    """
    if strategy in MODEL_NEGATIVES:  # drawn by the preference stage; random placeholders here
        strategy = "random"
    if strategy == "hard":
        if item_embeddings is None:
            raise ValueError("negative_sampling 'hard' needs item_embeddings [num_items, d]")
        item_embeddings = np.asarray(item_embeddings)
        if item_embeddings.shape[0] != context.num_items:
            raise ValueError(f"item_embeddings has {item_embeddings.shape[0]} rows, catalogue "
                             f"has {context.num_items} items")
    if rows.candidates is not None:
        return _from_candidates(rows, k, strategy, rng, popularity, item_embeddings)
    if strategy == "hard":
        return _hard_full(rows, k, context, item_embeddings)
    weights = popularity.astype(np.float64) + 1.0 if strategy == "popular" else None
    return context.negatives(rng, rows.targets.user, k, weights)


def pair_columns(rows: ProtocolRows, item_ids: pa.Array, *, k: int, strategy: str,
                 rng: np.random.Generator, context: SamplingContext, popularity: np.ndarray,
                 item_embeddings: np.ndarray | None = None) -> dict[str, pa.Array]:
    """The ``chosen`` and ``rejected`` arrow columns for `rows`."""
    if rows.protocol == "hit1":
        chosen = np.where(rows.label == 1, "Yes", "No")
        other = np.where(rows.label == 1, "No", "Yes")
        rejected = pa.array(other.tolist(), pa.string())
        offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32))
        return {"chosen": pa.array(chosen.tolist(), pa.string()),
                "rejected": pa.ListArray.from_arrays(offsets, rejected)}
    items = rejected_items(rows, k=k, strategy=strategy, rng=rng, context=context,
                           popularity=popularity, item_embeddings=item_embeddings)
    flat = item_ids.take(pa.array(items.ravel(), pa.int64()))
    offsets = pa.array(np.arange(0, items.size + 1, k, dtype=np.int32))
    return {"chosen": item_ids.take(pa.array(rows.target_item, pa.int64())),
            "rejected": pa.ListArray.from_arrays(offsets, flat)}
