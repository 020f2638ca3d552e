"""Negatives drawn from a model: items it ranks high that the user did not choose next.

With the ranking head, SFT's loss ``−log softmax(s)[target]`` over a row's candidates already
*is* S-DPO with every listed negative, β = 1 and no reference; a preference stage on 1–3
*random* negatives of the same list re-optimises a weaker copy of it, mostly pushing down items
already ranked low. What it can add is contrast SFT never had: the model's own current mistakes,
and items outside the listed candidates. So the preference stage can draw its rejected items
from a model's ranking (``data.negative_sampling``):

* ``policy`` — the starting policy's own top-ranked wrong items (self-play: SPRec, Gao et al.
  2025; RoDPO draws them at random from a top-k pool, so that a true like the data never
  recorded is not always the one pushed down);
* ``collab`` — the collaborative recommender's top-ranked wrong items (the row's view of
  :mod:`hanorec.collab`, so a training row's negatives are out of sample like its features);
* ``hard`` — the items nearest the target in the space the policy ranks with (cosine of the
  ranking head's item vectors), rather than in the backbone's token-embedding space.

Each row's K rejected items are drawn uniformly without replacement from the ``pool`` best-
scored allowed items (:func:`draw_from_pool`), where *allowed* excludes the target and every
item of the user's known sequence. ``scope: candidates`` draws from the row's own candidate
list; ``scope: catalogue`` from the whole catalogue, and the row then chooses among the whole
catalogue (its ``candidates`` are dropped), so the stage contrasts items SFT never saw as
negatives. The draw is seeded by (seed, round), so a run and its resume draw the same items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hanorec.data.prompts import VIEW_FIELD

__all__ = ["MODEL_STRATEGIES", "SCOPES", "NegativeDraws", "allowed_mask", "draw_from_pool",
           "redraw_negatives", "row_scores"]

#: The ``negative_sampling`` strategies that need a model (the rest are drawn at data time).
MODEL_STRATEGIES = ("policy", "collab", "hard")
SCOPES = ("candidates", "catalogue")


def draw_from_pool(scores: np.ndarray, allowed: np.ndarray, k: int, pool: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``[R, k]`` column indices: per row, ``k`` drawn uniformly without replacement from the
    ``pool`` highest-scored allowed columns (ties broken by column order).

    Args:
        scores: ``[R, M]`` scores (higher = ranked higher).
        allowed: ``[R, M]`` bool, the columns a row may draw.
        k: Negatives per row.
        pool: Size of the top pool (``pool = k``: the top-k themselves; ``pool ≥ M``: uniform
            over the allowed columns).
        rng: The generator of the draw.

    Raises:
        ValueError: ``pool < k``, or a row with fewer than ``k`` allowed columns.
    """
    if pool < k:
        raise ValueError(f"negative pool {pool} is smaller than the {k} negatives per row")
    short = np.flatnonzero(allowed.sum(axis=1) < k)
    if len(short):
        raise ValueError(f"row {int(short[0])} has {int(allowed[short[0]].sum())} allowed items, "
                         f"fewer than the {k} negatives it needs")
    masked = np.where(allowed, scores, -np.inf)
    width = min(pool, scores.shape[1])
    top = np.argsort(-masked, axis=1, kind="stable")[:, :width]
    size = np.minimum(allowed.sum(axis=1), width)  # the pool never reaches a disallowed column
    keys = rng.random((len(scores), width))
    keys[np.arange(width)[None, :] >= size[:, None]] = np.inf
    return np.take_along_axis(top, np.argsort(keys, axis=1)[:, :k], axis=1)


def allowed_mask(rows: Sequence[Mapping[str, Any]], columns: np.ndarray | None,
                 known: Mapping[str, Sequence[int]], index: Mapping[str, int],
                 num_items: int) -> np.ndarray:
    """``[R, M]`` the columns a row may draw: not its target, not an item of its user's known
    sequence (nor of its own history). ``columns`` ``[R, C]`` are the rows' candidate indices
    (``scope: candidates``), or None for the catalogue (``M = num_items``)."""
    width = num_items if columns is None else columns.shape[1]
    allowed = np.ones((len(rows), width), dtype=bool)
    for n, row in enumerate(rows):
        banned = {index[row["chosen"]], *(index[i] for i in row["history"]),
                  *known.get(str(row["user_id"]), ())}
        if columns is None:
            allowed[n, list(banned)] = False
        else:
            allowed[n] = ~np.isin(columns[n], list(banned))
    return allowed


@torch.no_grad()
def row_scores(strategy: str, model: nn.Module, collator: Any, rows: Sequence[Mapping[str, Any]],
               columns: np.ndarray | None, *, batch_size: int = 16) -> np.ndarray:
    """``[R, M]`` the scores ``strategy`` ranks a row's columns by (catalogue when ``columns`` is
    None), each row in its own recommender view.

    ``policy``: the ranking head's scores from the model's answer-position state; ``collab``:
    the row's view of the collaborative recommender, its state over the history · each item's
    embedding; ``hard``: cosine between the target's and each item's head vector.
    """
    from hanorec.readout import require_encoder, score_states
    from hanorec.scoring import head_states

    encoder = require_encoder(model)
    index = collator.catalog.index
    views = torch.tensor([int(row.get(VIEW_FIELD) or 0) for row in rows])
    if strategy == "policy":
        was_training = model.training
        model.eval()
        try:
            states = head_states(model, collator, rows, batch_size=batch_size, progress=False)
        finally:
            model.train(was_training)
        scores, _, _ = score_states(encoder, states.to(_device(encoder)), [None] * len(rows),
                                    views.to(_device(encoder)))
    elif strategy == "collab":
        scores = torch.empty(len(rows), encoder.spec.num_items)
        histories = [[index[i] for i in row["history"]] for row in rows]
        for view in views.unique().tolist():
            where = (views == view).nonzero().squeeze(-1)
            state = encoder.user_states([histories[n] for n in where.tolist()], view)
            scores[where] = (state @ encoder.collab[view].T).float().cpu()
    elif strategy == "hard":
        vectors = torch.nn.functional.normalize(encoder.item_vectors(view=0).float(), dim=-1)
        targets = torch.tensor([index[row["chosen"]] for row in rows])
        scores = vectors[targets.to(vectors.device)] @ vectors.T
    else:
        raise ValueError(f"negative_sampling {strategy!r} is not drawn from a model "
                         f"({', '.join(MODEL_STRATEGIES)})")
    scores = scores.float().cpu().numpy()
    if columns is None:
        return scores
    return np.take_along_axis(scores, columns, axis=1)


def redraw_negatives(strategy: str, model: nn.Module, collator: Any,
                     rows: Sequence[Mapping[str, Any]], *, k: int, pool: int, scope: str,
                     known: Mapping[str, Sequence[int]], rng: np.random.Generator,
                     batch_size: int = 16) -> list[dict[str, Any]]:
    """The rows with ``k`` rejected items each drawn from ``strategy``'s top ``pool`` (module
    docstring); with ``scope: catalogue`` their ``candidates`` are dropped (they choose among
    the catalogue)."""
    if scope not in SCOPES:
        raise ValueError(f"negative scope must be one of {SCOPES}, got {scope!r}")
    catalog = collator.catalog
    index = catalog.index
    columns = None
    if scope == "candidates":
        if not all(row.get("candidates") for row in rows):
            raise ValueError("negative scope candidates needs rows with candidate lists (the "
                             "candidates or hit3 protocol); use scope catalogue")
        columns = np.array([[index[i] for i in row["candidates"]] for row in rows])
    scores = row_scores(strategy, model, collator, rows, columns, batch_size=batch_size)
    allowed = allowed_mask(rows, columns, known, index, len(catalog))
    picks = draw_from_pool(scores, allowed, k, pool, rng)
    items = picks if columns is None else np.take_along_axis(columns, picks, axis=1)
    out = []
    for row, drawn in zip(rows, items):
        new = {**row, "rejected": [catalog.item_ids[i] for i in drawn]}
        if scope == "catalogue":
            new.pop("candidates", None)
            new.pop("target_index", None)
        out.append(new)
    return out


def _device(module: nn.Module) -> torch.device:
    return next(module.buffers()).device


class NegativeDraws:
    """The training rows' negatives drawn by a model, round after round (a refresh is a round).

    Round ``r`` draws with a generator seeded by ``(seed, r)``, so an interrupted run that
    resumes redraws the same items.

    Args:
        strategy: ``policy``, ``collab`` or ``hard`` (:data:`MODEL_STRATEGIES`).
        collator: Renders the rows (its catalogue maps ids to indices).
        known: ``{user_id: item indices}`` the user interacted with (never drawn).
        k: Negatives per row.
        pool: The top pool they are drawn from.
        scope: ``candidates`` or ``catalogue``.
        seed: The run's seed.
        batch_size: Prompts per scoring forward.
    """

    def __init__(self, strategy: str, collator: Any, known: Mapping[str, Sequence[int]], *,
                 k: int, pool: int, scope: str, seed: int, batch_size: int = 16) -> None:
        if strategy not in MODEL_STRATEGIES:
            raise ValueError(f"negative_sampling {strategy!r} is not drawn from a model")
        self.strategy, self.collator, self.known = strategy, collator, known
        self.k, self.pool, self.scope, self.seed = k, pool, scope, seed
        self.batch_size = batch_size

    def draw(self, model: nn.Module, rows: Sequence[Mapping[str, Any]],
             round_: int) -> list[dict[str, Any]]:
        """The rows with their rejected items redrawn by ``model`` (round ``round_``)."""
        rng = np.random.default_rng([self.seed, round_, 7919])
        return redraw_negatives(self.strategy, model, self.collator, rows, k=self.k,
                                pool=self.pool, scope=self.scope, known=self.known, rng=rng,
                                batch_size=self.batch_size)
