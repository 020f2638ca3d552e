"""Read-outs: how the model's choice among items becomes scores and log-probabilities.

Three read-outs (the ``prompt.answer`` setting), one contract: for a prompt ``x`` and a set
of items ``C`` (the row's candidates, or the whole catalogue), a log-probability
``log π(v | x)`` for each ``v`` in ``C`` — what SFT maximises for the target, what DPO, S-DPO
and HaNoRec's HaRS/NoDO take as the policy's chosen and rejected log-probs, and what the
evaluation ranks by.

* ``title`` — ``log π(title_v ⊕ eos | x)``, the title's sequence log-likelihood under the LM
  (:mod:`hanorec.forward`; the prompt is shared by the candidates).
* ``index`` — candidates listed with labels ``A``, ``B``, …; ``log π(label_v | x)``, the
  label token's log-probability at the answer position: every candidate from one forward
  (LlamaRec, Yue et al. 2023).
* ``head`` — a ranking head over the final hidden state ``h`` at the answer position (the
  prompt's last token): ``s_v = ⟨h, e_v⟩/√d`` (``dot``) or ``cos(h, e_v)/τ`` (``cos``, R²ec,
  arXiv 2505.16994), with ``e_v`` the item's vector from :class:`hanorec.item_tokens.ItemEncoder`
  (its projected collaborative embedding, plus learned title and poster terms), and
  ``log π(v | x) = s_v − log Σ_{u∈C} exp s_u``. NoDO's logit noise (HaNoRec eq. 9) is added
  to ``s`` before the softmax (:func:`hanorec.losses.score_noise`: σ absolute, or σ times the
  spread of the row's scores).

This module holds the ``head`` computations and the final-state extraction that R²ec's item
head (:mod:`hanorec.r2ec`) and the hidden-state scoring share; ``title`` and ``index`` go
through :func:`hanorec.forward.response_logps` with the collator's responses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hanorec.collate import ChoiceBatch
from hanorec.forward import response_logps
from hanorec.item_tokens import VIRTUAL_BASE, ItemEncoder, attached_encoder, row_views
from hanorec.losses import score_noise, score_spread
from hanorec.models.families import MROPE_FAMILIES


def forward_states(model: nn.Module, batch: Mapping[str, Any], *, logits_to_keep: int = 1) -> Any:
    """Model output with hidden states; ``labels`` dropped, positions set for left padding.

    For a left-padded batch the positions follow each row's real tokens
    (``cumsum(mask) − 1``), as in generation; M-RoPE backbones compute theirs.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    family = str(getattr(getattr(model, "config", None), "model_type", ""))
    mask = inputs.get("attention_mask")
    if family not in MROPE_FAMILIES and mask is not None and bool((mask[:, 0] == 0).any()):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(**inputs, output_hidden_states=True, use_cache=False,
                 logits_to_keep=logits_to_keep)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (left or right padding)."""
    return attention_mask.long().cumsum(-1).argmax(-1)


def final_states(model: nn.Module, batch: Mapping[str, Any], *,
                 share_prefix: bool = False) -> Tensor:
    """``[B, H]`` final-layer hidden state at each row's last real token (float32).

    With ``share_prefix`` the tokens every row starts with (:func:`shared_prefix_length`; the
    system turn and the instruction of a ``head`` prompt, ~20 of ~130 tokens) are encoded once
    and their KV cache is repeated for the batch; the states equal the plain forward's up to
    float rounding (causal attention: a prefix token never sees what follows it).
    """
    plen = shared_prefix_length(model, batch) if share_prefix else 0
    if plen:
        return _states_after_prefix(model, batch, plen)
    hidden = forward_states(model, batch).hidden_states[-1]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_positions(batch["attention_mask"]).to(hidden.device)].float()


def answer_states(model: nn.Module, batch: Mapping[str, Any], *,
                  share_prefix: bool = False) -> Tensor:
    """What the ranking head scores from: the final state at the answer position ``[B, H]``
    (:func:`final_states`), followed by the recommender's own state at the user token
    ``[B, d]`` when the encoder has a head prior (``[B, H + d]``)."""
    states = final_states(model, batch, share_prefix=share_prefix)
    encoder = attached_encoder(model)
    if encoder is None or not encoder.spec.prior:
        return states
    return torch.cat([states, encoder.prior_states(batch["input_ids"]).to(states)], dim=-1)


def shared_prefix_length(model: nn.Module, batch: Mapping[str, Any], minimum: int = 4) -> int:
    """Leading tokens that every row of a right-padded, text-only batch shares (0: don't share).

    The prefix stops before the first item, poster or user placeholder (their embeddings come
    from the item encoder, and the user token reads the history tokens of its own forward) and
    leaves every row at least one token. Batches with image inputs, left padding, a single row
    or M-RoPE positions are not shared.
    """
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    family = str(getattr(getattr(model, "config", None), "model_type", ""))
    if (ids.shape[0] < 2 or mask is None or set(batch) - {"input_ids", "attention_mask"}
            or family in MROPE_FAMILIES or not bool(mask[:, 0].all())):
        return 0
    same = (ids == ids[:1]).all(0) & (ids[0] < VIRTUAL_BASE) & mask.bool().all(0)
    plen = int(same.long().cumprod(0).sum())
    plen = min(plen, int(mask.sum(-1).min()) - 1)
    return plen if plen >= minimum else 0


def _states_after_prefix(model: nn.Module, batch: Mapping[str, Any], plen: int) -> Tensor:
    """:func:`final_states` with the first ``plen`` tokens encoded once and their KV repeated."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = model(input_ids=ids[:1, :plen], use_cache=True).past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    positions = torch.arange(plen, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    out = model(input_ids=ids[:, plen:], attention_mask=mask, past_key_values=cache,
                position_ids=positions, output_hidden_states=True, use_cache=True,
                logits_to_keep=1)
    hidden = out.hidden_states[-1]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, (last_positions(mask) - plen).to(hidden.device)].float()


def similarity(users: Tensor, items: Tensor, kind: str = "cos", tau: float = 0.02) -> Tensor:
    """Scores ``[U, N]`` (or ``[U, C]`` for per-user ``items`` ``[U, C, H]``).

    ``dot``: ``⟨h, e⟩ / √d``; ``cos``: ``cos(h, e) / τ`` (R²ec's item head, τ = 0.02 there).
    """
    if kind == "cos":
        if tau <= 0:
            raise ValueError(f"similarity: tau must be positive, got {tau}")
        users, items, scale = F.normalize(users, dim=-1), F.normalize(items, dim=-1), 1.0 / tau
    elif kind == "dot":
        scale = 1.0 / math.sqrt(users.shape[-1])
    else:
        raise ValueError(f"similarity: kind must be 'dot' or 'cos', got {kind!r}")
    if items.dim() == 3:
        return torch.einsum("uh,uch->uc", users, items) * scale
    return users @ items.T * scale


def require_encoder(model: nn.Module) -> ItemEncoder:
    """The model's attached item encoder (the head's item vectors); a clear error without one."""
    encoder = attached_encoder(model)
    if encoder is None:
        raise ValueError("answer: head needs an item encoder on the model (see "
                         "hanorec.item_features)")
    return encoder


def choice_columns(choices: Sequence[Sequence[int] | None], num_items: int,
                   device: torch.device) -> tuple[Tensor | None, Tensor]:
    """The items to score and a ``[B, M]`` mask of which each row may choose.

    Rows with a list (their candidates) choose among it; ``None`` rows choose among the whole
    catalogue. When every row has a list only their union is scored (``columns`` = its
    catalogue indices); otherwise every item is (``columns`` None, column ``i`` = item ``i``).

    Returns:
        ``(columns or None, allowed [B, M])``.
    """
    if all(c is not None for c in choices):
        columns = torch.tensor(sorted({int(i) for c in choices for i in c}), dtype=torch.long)
        where = {int(item): n for n, item in enumerate(columns.tolist())}
        allowed = torch.zeros(len(choices), len(columns), dtype=torch.bool)
        for row, items in enumerate(choices):
            allowed[row, [where[int(i)] for i in items]] = True
        return columns.to(device), allowed.to(device)
    allowed = torch.ones(len(choices), num_items, dtype=torch.bool)
    for row, items in enumerate(choices):
        if items is not None:
            allowed[row] = False
            allowed[row, list(items)] = True
    return None, allowed.to(device)


def head_logps(model: nn.Module, batch: Mapping[str, Any], choices: Sequence[Sequence[int] | None],
               picks: Tensor, *, noise_std: float = 0.0, noise_scale: str = "absolute",
               generator: torch.Generator | None = None,
               noise_log: dict[str, Any] | None = None) -> Tensor:
    """``[B, P]`` head log-probabilities ``log π(v | x)`` of the items ``picks`` (catalogue ids).

    Args:
        model: The policy with an attached :class:`ItemEncoder`.
        batch: Prompt-only batch (any padding side).
        choices: Per row, the candidate indices it chooses among (None: the catalogue).
        picks: ``[B, P]`` catalogue indices to return (each among its row's choices).
        noise_std: σ of NoDO Gaussian noise added to the scores (training policy only).
        noise_scale: ``absolute`` (ε ~ N(0, σ²)) or ``relative`` (σ times each row's spread of
            scores over its allowed items): :func:`hanorec.losses.score_noise`.
        generator: Generator of the noise.
        noise_log: When given and noise is drawn, receives ``clean_logps`` (``[B, P]``, the
            log-probs without noise, detached) and ``score_spread`` (the mean over rows of the
            scores' spread over the allowed items), for logging how visible the noise is.
    """
    scores, columns, allowed = head_scores(model, batch, choices)
    positions = picks.to(scores.device) if columns is None else _positions(columns,
                                                                           picks.to(scores.device))
    picked = _picked_logps(score_noise(scores, noise_std, scale=noise_scale, allowed=allowed,
                                       generator=generator), allowed, positions)
    if noise_log is not None and noise_std > 0:
        with torch.no_grad():
            noise_log["clean_logps"] = _picked_logps(scores.detach(), allowed, positions)
            noise_log["score_spread"] = float(score_spread(scores, allowed).mean())
    return picked


def _picked_logps(scores: Tensor, allowed: Tensor, positions: Tensor) -> Tensor:
    """Log-softmax of ``scores`` over each row's allowed columns, at ``positions``."""
    logps = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    picked = logps.gather(1, positions)
    if not bool(torch.isfinite(picked).all()):
        raise ValueError("head_logps: a pick is not among its row's choices")
    return picked


def head_scores(model: nn.Module, batch: Mapping[str, Any],
                choices: Sequence[Sequence[int] | None]) -> tuple[Tensor, Tensor | None, Tensor]:
    """Raw head scores ``[B, M]`` of the scored columns, the columns and the allowed mask."""
    encoder = require_encoder(model)
    views = row_views(batch["input_ids"], encoder.spec.num_items)
    return score_states(encoder, answer_states(model, batch), choices, views)


def score_states(encoder: ItemEncoder, states: Tensor, choices: Sequence[Sequence[int] | None],
                 views: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Head scores of answer states (:func:`answer_states`) (see :func:`choice_columns`).

    ``views`` ``[B]`` name the recommender each row's item vectors come from (None: view 0,
    the full model; :mod:`hanorec.item_tokens`). With a head prior the row's recommender score
    ``w·⟨u, c_v⟩`` (its state ``u``, the last ``d`` columns of ``states``; ``c_v`` the item's
    embedding in its view) is added: ``s_v = sim(h, e_v) + w·⟨u, c_v⟩``.
    """
    columns, allowed = choice_columns(choices, encoder.spec.num_items, states.device)
    spec = encoder.spec
    prior = states[:, spec.hidden:] if spec.prior else None
    states = states[:, :spec.hidden]
    if views is None:
        views = torch.zeros(states.shape[0], dtype=torch.long, device=states.device)
    scores = states.new_empty(states.shape[0], spec.num_items if columns is None else len(columns))
    for view in views.unique().tolist():
        rows = (views == view).nonzero().squeeze(-1).to(states.device)
        vectors = encoder.item_vectors(columns, view).float()
        part = similarity(states[rows], vectors, spec.similarity, spec.tau)
        if prior is not None:
            table = encoder.collab[view] if columns is None else encoder.collab[view][columns]
            part = part + encoder.prior_scale * (prior[rows] @ table.float().T)
        scores[rows] = part.to(scores)
    return scores, columns, allowed


def _positions(columns: Tensor, picks: Tensor) -> Tensor:
    """Column position of each picked catalogue index (``columns`` sorted)."""
    positions = torch.searchsorted(columns, picks)
    if bool((positions >= len(columns)).any()) or not bool(
        (columns[positions.clamp(max=len(columns) - 1)] == picks).all()
    ):
        raise ValueError("head_logps: a pick is not among its row's choices")
    return positions


def row_choices(rows: Sequence[Mapping[str, Any]],
                index: Mapping[str, int]) -> list[list[int] | None]:
    """Each row's candidate indices (``candidates`` rows) or None (choose from the catalogue)."""
    return [[index[i] for i in row["candidates"]] if row.get("candidates") else None
            for row in rows]


def answer_logps(model: nn.Module, batch: ChoiceBatch, *, mode: str = "auto", average: bool = False,
                 noise_std: float = 0.0, noise_scale: str = "absolute",
                 generator: torch.Generator | None = None,
                 noise_log: dict[str, Any] | None = None) -> Tensor:
    """``[B, K+1]`` log-probabilities of each row's chosen and rejected answers, any read-out.

    ``title``/``index``: :func:`hanorec.forward.response_logps` (shared prompt; ``average``
    length-normalises for IPO/SimPO; NoDO noise on the logits at response positions).
    ``head``: :func:`head_logps` over the row's candidates (``average`` has nothing to
    normalise: an answer is one choice). ``noise_scale`` and ``noise_log`` as in
    :func:`head_logps`; both read-outs draw the noise with :func:`hanorec.losses.score_noise`.
    """
    if batch.responses is not None:
        return response_logps(model, batch.prompts, batch.responses, mode=mode, average=average,
                              noise_std=noise_std, noise_scale=noise_scale, generator=generator,
                              noise_log=noise_log)
    if batch.picks is None or batch.choices is None:
        raise ValueError("answer_logps: the batch has neither responses nor head picks")
    return head_logps(model, batch.prompts, batch.choices, batch.picks, noise_std=noise_std,
                      noise_scale=noise_scale, generator=generator, noise_log=noise_log)
