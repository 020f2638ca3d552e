"""Pure-tensor preference-optimisation losses for LLM-based recommendation (torch only).

Importing this module pulls in ``torch`` and nothing else (no transformers, peft, accelerate),
so it can be dropped into any DPO loop (TRL, LLaMA-Factory, hand-written). Contents:

* :func:`sequence_logps` — per-sequence log-probabilities without a dense log-softmax, with the
  NoDO logit noise (HaNoRec, arXiv 2511.18740).
* :func:`preference_loss` — DPO / cDPO (``sigmoid``), IPO, SLiC (``hinge``), SimPO and S-DPO
  (softmax DPO over K negatives), with scalar or per-sample β.
* HaRS (hardness-aware reward scaling, HaNoRec eqs. 5, 6, 8, 11): :func:`fuse_item_embeddings`,
  :func:`neighbour_profiles`, :func:`pair_deltas`, :func:`hardness_lambdas`,
  :func:`responsiveness`, :func:`hanorec_betas`.
* NoDO in LoRA mode: :func:`lora_noise` (duck-typed PEFT LoRA layers, forward hooks).
* RecPO (R²ec, arXiv 2505.16994): :func:`recpo_rewards`, :func:`group_advantages`,
  :func:`clipped_surrogate`.

Bad input raises :class:`ValueError` naming the function and the offending argument.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PreferenceLossOutput",
    "clipped_surrogate",
    "fuse_item_embeddings",
    "group_advantages",
    "hanorec_betas",
    "hardness_lambdas",
    "lora_noise",
    "neighbour_profiles",
    "pair_deltas",
    "preference_loss",
    "recpo_rewards",
    "responsiveness",
    "sequence_logps",
]

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "sdpo")
PAIRWISE_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
# Elements per chunk in the vocabulary reductions (~64 MB of float32 temporaries).
_CHUNK_ELEMENTS = 1 << 24


def _check(ok: bool, where: str, message: str) -> None:
    """Raise ``ValueError("<where>: <message>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{where}: {message}")


def _shape(value: object) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Sequence log-probabilities (with NoDO logit noise)
# ---------------------------------------------------------------------------------------------


class _SelectedLogProb(torch.autograd.Function):
    """``out[b, t] = z[b, t, y[b, t]] − logsumexp_v z[b, t, v]`` for ``z`` ``[B, T, V]``, chunked.

    Forward runs the fused ``log_softmax`` kernel on chunks (views of ``z``, so a sliced
    ``logits[:, :-1]`` is not copied) and keeps only the label entries; backward recomputes
    ``softmax`` per chunk and writes ``g·(onehot − softmax)`` into the one gradient buffer.
    Only ``z`` itself (no copy) is saved. Half-precision logits are reduced in float32.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        step = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
        out = torch.empty(labels.shape, dtype=out_dtype, device=logits.device)
        for b, t in _chunks(labels.shape, step):
            logp = torch.log_softmax(logits[b, t].to(out_dtype), dim=-1)
            out[b, t] = logp.gather(-1, labels[b, t, None]).squeeze(-1)
        ctx.save_for_backward(logits, labels)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, labels = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, t in _chunks(labels.shape, ctx.step):
            g = grad_out[b, t, None].to(torch.promote_types(logits.dtype, torch.float32))
            chunk = torch.softmax(logits[b, t].to(g.dtype), dim=-1).mul_(-g)
            grad[b, t] = chunk.scatter_add_(-1, labels[b, t, None], g)
        return grad, None


def _chunks(shape: torch.Size, step: int) -> Iterator[tuple[int, slice]]:
    """``(b, slice of t)`` covering a ``[B, T]`` grid, ``step`` positions at a time."""
    for b in range(shape[0]):
        for start in range(0, shape[1], step):
            yield b, slice(start, start + step)


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    average: bool = False,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sum (or mean) of the label tokens' log-probabilities per sequence.

    ``logits[:, t]`` scores ``labels[:, t]`` (no internal shift: the caller aligns them).
    ``log π(y) = Σ_{t: y_t ≠ ignore} (z_{t, y_t} − logsumexp_v z_{t, v})``; with ``average``
    it is divided by the number of scored tokens (0 tokens give 0). No full log-softmax copy is
    materialised: with a 150k vocabulary a dense ``log_softmax`` is B·T·150k floats (2.4 GB for
    B=4, T=1024 in float32) on top of the logits and their gradient. Instead the fused
    log-softmax runs on chunks of ~16M logits, keeping only ``z_y − logsumexp(z)`` per
    position, and backward recomputes the softmax chunk by chunk into the gradient buffer.
    Measured on CPU (B=4, T=64, V=150k, float32): forward +73 MB instead of +147 MB, forward
    and backward +183 MB instead of +440 MB, and faster than the dense version.

    NoDO, logit mode (HaNoRec, arXiv 2511.18740): with ``noise_std = σ > 0`` the logits of the
    scored positions are perturbed, ``z̃ = z + ε``, ``ε ~ N(0, σ²)``, before the log-softmax.
    Exactly: ``n`` = number of scored positions (row-major over ``(b, t)``) and
    ``ε = σ·torch.randn((n, V), generator=generator, device=logits.device, dtype=logits.dtype)``.
    This path keeps one noisy copy of the scored rows (``n × V``) for backward.

    Args:
        logits: ``[B, T, V]`` logits.
        labels: ``[B, T]`` token ids; positions equal to ``ignore_index`` are not scored.
        ignore_index: label value of unscored positions.
        average: return the mean instead of the sum (SimPO / IPO use length-averaged log-probs).
        noise_std: σ of the NoDO logit noise; 0 disables it.
        generator: optional ``torch.Generator`` (on the logits' device) for the noise.

    Returns:
        ``[B]`` log-probabilities, in ``float32`` for half-precision logits, else their dtype.
    """
    where = "sequence_logps"
    _check(logits.dim() == 3, where, f"logits must be [B, T, V], got {_shape(logits)}")
    _check(
        labels.shape == logits.shape[:2],
        where,
        f"labels must be {_shape(logits)[:2]} like logits[:, :, 0], got {_shape(labels)}",
    )
    _check(
        math.isfinite(noise_std) and noise_std >= 0,
        where,
        f"noise_std must be finite and >= 0, got {noise_std}",
    )
    batch, length, vocab = logits.shape
    mask = labels != ignore_index
    bad = labels[mask & ((labels < 0) | (labels >= vocab))]
    _check(
        bad.numel() == 0,
        where,
        f"labels must be in [0, {vocab}) or ignore_index, got {bad[:5].tolist()}",
    )
    if noise_std > 0:
        rows = logits[mask]  # [n, V]: a copy of the scored rows only
        noise = torch.randn(rows.shape, generator=generator, device=rows.device, dtype=rows.dtype)
        rows = rows.add_(noise.mul_(noise_std))
        del noise
        scored = _SelectedLogProb.apply(rows[None], labels[mask][None])[0]
        token_logps = scored.new_zeros(batch, length).masked_scatter(mask, scored)
    else:
        token_logps = _SelectedLogProb.apply(logits, labels.masked_fill(~mask, 0)) * mask
    total = token_logps.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1).to(total.dtype)
    return total


# ---------------------------------------------------------------------------------------------
# Preference losses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Result of :func:`preference_loss`.

    Attributes:
        loss: scalar mean of ``losses`` (differentiable).
        losses: ``[B]`` per-sample losses.
        chosen_rewards: ``[B]`` detached ``β·(log π(y_w) − log π_ref(y_w))``.
        rejected_rewards: ``[B]`` or ``[B, K]`` (like ``rejected_logps``), detached.
        margins: ``[B]`` chosen reward minus the mean rejected reward.
        accuracies: ``[B]`` 1.0 where the chosen reward beats every rejected reward.
    """

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    accuracies: Tensor


def _check_logps(name: str, value: object, shape: tuple[int, ...]) -> None:
    ok = isinstance(value, Tensor) and tuple(value.shape) == shape
    _check(ok, "preference_loss", f"{name} must have shape {list(shape)}, got {_shape(value)}")
    _check(not bool(torch.isnan(value).any()), "preference_loss", f"{name} contains NaN")


def _check_options(loss_type: str, label_smoothing: float, simpo_gamma: float) -> None:
    where = "preference_loss"
    _check(loss_type in LOSS_TYPES, where, f"loss_type must be in {LOSS_TYPES}, got {loss_type!r}")
    _check(0 <= label_smoothing < 0.5, where, f"label_smoothing={label_smoothing} not in [0, 0.5)")
    only = "label_smoothing applies to loss_type='sigmoid' only"
    _check(not label_smoothing or loss_type == "sigmoid", where, only)
    only = "simpo_gamma applies to loss_type='simpo' only"
    _check(not simpo_gamma or loss_type == "simpo", where, only)


def _check_inputs(
    loss_type: str, chosen: object, rejected: object, ref_chosen: object, ref_rejected: object
) -> tuple[int, ...]:
    """Validate the log-prob tensors; return the shape of ``rejected_logps``."""
    where = "preference_loss"
    ok = isinstance(chosen, Tensor) and chosen.dim() == 1
    _check(ok, where, f"chosen_logps must be a [B] tensor, got {_shape(chosen)}")
    batch = chosen.shape[0]
    shape = _shape(rejected)
    ok = isinstance(shape, tuple) and len(shape) in (1, 2) and shape[0] == batch and 0 not in shape
    _check(ok, where, f"rejected_logps must be [{batch}] or [{batch}, K], got {shape}")
    _check_logps("chosen_logps", chosen, (batch,))
    _check_logps("rejected_logps", rejected, shape)
    num_rejected = shape[1] if len(shape) == 2 else 1
    pairwise = f"loss_type={loss_type!r} is pairwise: use 'sdpo' for K={num_rejected} negatives"
    _check(num_rejected == 1 or loss_type not in PAIRWISE_LOSS_TYPES, where, pairwise)
    both = "ref_chosen_logps and ref_rejected_logps must both be given or both be None"
    _check((ref_chosen is None) == (ref_rejected is None), where, both)
    if ref_chosen is not None:
        _check(loss_type != "simpo", where, "loss_type='simpo' is reference-free: no ref_*_logps")
        _check_logps("ref_chosen_logps", ref_chosen, (batch,))
        _check_logps("ref_rejected_logps", ref_rejected, shape)
    return shape


def _beta_column(beta: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """Validate β (positive float or ``[B]`` tensor) and return it as a constant ``[B, 1]``."""
    if isinstance(beta, Tensor):
        beta = beta.reshape(1).expand(batch) if beta.dim() == 0 else beta
        ok = tuple(beta.shape) == (batch,)
        _check(
            ok, "preference_loss", f"beta must be a float or a [{batch}] tensor, got {_shape(beta)}"
        )
        values = beta.detach().to(device=like.device, dtype=like.dtype)
    else:
        values = torch.full((batch,), float(beta), device=like.device, dtype=like.dtype)
    ok = bool(torch.isfinite(values).all()) and bool((values > 0).all())
    _check(ok, "preference_loss", f"beta must be finite and > 0 in every entry, got {beta}")
    return values[:, None]


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float | Tensor = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> PreferenceLossOutput:
    """DPO-family loss on policy (and reference) sequence log-probabilities.

    With ``r = log π(y) − log π_ref(y)`` (``log π_ref ≡ 0`` when both references are None:
    reference-free) and ``h = r_w − r_l``:

    * ``sigmoid`` — DPO (Rafailov et al. 2023, eq. 7): ``−log σ(βh)``; with label smoothing ε
      (cDPO / robust DPO): ``−(1−ε)·log σ(βh) − ε·log σ(−βh)``. With per-sample β this is
      HaNoRec's eq. 12, ``−log σ(β_i·h_i)``.
    * ``ipo`` — IPO (Azar et al. 2023): ``(h − 1/(2β))²``; pass length-averaged
      log-probs (``sequence_logps(..., average=True)``), as the IPO paper does.
    * ``hinge`` — SLiC (Zhao et al. 2023): ``relu(1 − βh)``.
    * ``simpo`` — SimPO (Meng et al. 2024): ``−log σ(β·(avg_w − avg_l) − γ)``,
      reference-free (references must be None), on length-averaged log-probs, γ = simpo_gamma.
    * ``sdpo`` — S-DPO (Chen et al., NeurIPS 2024): with K negatives
      ``−log σ(−log Σ_k exp(β·(r_k − r_w)))``; at K = 1 it equals ``sigmoid``.

    Args:
        chosen_logps: ``[B]`` policy log-probs of the chosen responses.
        rejected_logps: ``[B]`` or ``[B, K]`` policy log-probs of the rejected responses
            (K > 1 only with ``sdpo``).
        ref_chosen_logps: reference log-probs shaped like ``chosen_logps``, or None.
        ref_rejected_logps: reference log-probs shaped like ``rejected_logps``, or None.
        beta: β > 0, a float or a ``[B]`` tensor (per-sample β of HaRS; used as a constant).
        loss_type: one of ``sigmoid``, ``ipo``, ``hinge``, ``simpo``, ``sdpo``.
        label_smoothing: ε in [0, 0.5), ``sigmoid`` only.
        simpo_gamma: SimPO target margin γ, ``simpo`` only.

    Returns:
        :class:`PreferenceLossOutput` (rewards are ``β·r``, detached).
    """
    _check_options(loss_type, label_smoothing, simpo_gamma)
    shape = _check_inputs(
        loss_type, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    batch = shape[0]
    chosen_r, rejected_r = chosen_logps, rejected_logps.reshape(batch, -1)
    if ref_chosen_logps is not None:
        chosen_r = chosen_r - ref_chosen_logps
        rejected_r = rejected_r - ref_rejected_logps.reshape(batch, -1)
    beta_col = _beta_column(beta, batch, chosen_logps)
    losses = _loss_values(
        chosen_r[:, None], rejected_r, beta_col, loss_type, label_smoothing, simpo_gamma
    )
    chosen_rewards = (beta_col[:, 0] * chosen_r).detach()
    rejected_rewards = (beta_col * rejected_r).detach()
    return PreferenceLossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards.reshape(shape),
        margins=chosen_rewards - rejected_rewards.mean(-1),
        accuracies=(chosen_rewards[:, None] > rejected_rewards).all(-1).to(chosen_rewards.dtype),
    )


def _loss_values(
    chosen_r: Tensor, rejected_r: Tensor, beta: Tensor, loss_type: str, eps: float, gamma: float
) -> Tensor:
    """Per-sample losses from ``[B, 1]`` chosen and ``[B, K]`` rejected implicit rewards."""
    if loss_type == "sdpo":
        return -F.logsigmoid(-torch.logsumexp(beta * (rejected_r - chosen_r), dim=-1))
    h, beta = (chosen_r - rejected_r)[:, 0], beta[:, 0]
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    return -F.logsigmoid(beta * h - gamma)  # simpo


# ---------------------------------------------------------------------------------------------
# HaRS — hardness-aware reward scaling (HaNoRec, arXiv 2511.18740)
# ---------------------------------------------------------------------------------------------


def fuse_item_embeddings(
    text: Tensor, image: Tensor | None = None, image_mask: Tensor | None = None
) -> Tensor:
    """Fused unit-norm item embeddings (HaNoRec §HaRS, step 1).

    ``e = normalize(normalize(e_txt) + normalize(e_img))``; items without an image (``image``
    None, or rows where ``image_mask`` is False) get ``normalize(e_txt)``.

    Args:
        text: ``[N, D]`` text embeddings (mean input-token embedding of the title).
        image: ``[N, D]`` image embeddings (mean vision feature), or None.
        image_mask: ``[N]`` bool, True where the item has an image; None means all do.

    Returns:
        ``[N, D]`` unit-norm embeddings.
    """
    where = "fuse_item_embeddings"
    _check(text.dim() == 2, where, f"text must be [N, D], got {_shape(text)}")
    text_unit = F.normalize(text, dim=-1)
    if image is None:
        _check(image_mask is None, where, "image_mask given without image")
        return text_unit
    _check(
        image.shape == text.shape,
        where,
        f"image must have shape {_shape(text)}, got {_shape(image)}",
    )
    fused = F.normalize(text_unit + F.normalize(image.to(text.dtype), dim=-1), dim=-1)
    if image_mask is None:
        return fused
    ok = tuple(image_mask.shape) == (text.shape[0],)
    _check(ok, where, f"image_mask must be [{text.shape[0]}], got {_shape(image_mask)}")
    return torch.where(image_mask.to(torch.bool)[:, None], fused, text_unit)


def _check_items(where: str, name: str, items: Tensor, num_items: int) -> None:
    integral = not (items.dtype.is_floating_point or items.dtype == torch.bool)
    _check(integral, where, f"{name} must hold integer item indices, got dtype {items.dtype}")
    bad = items[(items < 0) | (items >= num_items)]
    _check(bad.numel() == 0, where, f"{name} must lie in [0, {num_items}), got {bad.tolist()}")


def neighbour_profiles(
    item_embeddings: Tensor, items: Tensor, *, top_k: int = 10, chunk_size: int = 4096
) -> Tensor:
    """Neighbourhood profile ``s(v)``: top-K cosine similarities of ``v`` to the other items.

    Sorted descending, the item itself excluded by index (a duplicate item still counts).
    Memory is ``chunk_size²`` similarities at a time: queries and catalogue are both chunked
    with a running top-K, so no ``N × N`` (nor ``len(items) × N``) matrix is ever built.

    Args:
        item_embeddings: ``[N, D]`` item embeddings (normalised here).
        items: ``[M]`` item indices to profile.
        top_k: K, must satisfy ``1 <= K < N``.
        chunk_size: rows per query / catalogue block.

    Returns:
        ``[M, K]`` similarities.
    """
    where = "neighbour_profiles"
    _check(
        item_embeddings.dim() == 2,
        where,
        f"item_embeddings must be [N, D], got {_shape(item_embeddings)}",
    )
    num_items = item_embeddings.shape[0]
    _check(1 <= top_k < num_items, where, f"top_k={top_k} must be >= 1 and < the {num_items} items")
    _check(chunk_size >= 1, where, f"chunk_size must be >= 1, got {chunk_size}")
    items = items.reshape(-1).to(item_embeddings.device)
    _check_items(where, "items", items, num_items)
    unit = F.normalize(item_embeddings.detach(), dim=-1)
    out = unit.new_empty(items.shape[0], top_k)
    for q0 in range(0, items.shape[0], chunk_size):
        query_ids = items[q0 : q0 + chunk_size]
        query = unit[query_ids]
        best = unit.new_full((query_ids.shape[0], top_k), -math.inf)
        for c0 in range(0, num_items, chunk_size):
            sims = query @ unit[c0 : c0 + chunk_size].T
            own = query_ids - c0
            inside = (own >= 0) & (own < sims.shape[1])
            sims[inside, own[inside]] = -math.inf  # exclude the item itself
            block_best = sims.topk(min(top_k, sims.shape[1]), dim=1).values
            best = torch.cat([best, block_best], dim=1).topk(top_k, dim=1).values
        out[q0 : q0 + chunk_size] = best
    return out


def pair_deltas(
    item_embeddings: Tensor,
    positives: Tensor,
    negatives: Tensor,
    *,
    top_k: int = 10,
    chunk_size: int = 4096,
) -> Tensor:
    """Pair distance Δ (HaNoRec eq. 5): ``Δ_i = ‖softmax(s(pos_i)) − softmax(s(neg_i))‖₂``.

    ``s(v)`` is :func:`neighbour_profiles` (top-K similarities, descending); with K negatives
    per pair (``negatives`` ``[B, K]``) Δ is the mean over them. Profiles are computed once for
    the distinct items involved only.

    Args:
        item_embeddings: ``[N, D]`` item embeddings (e.g. :func:`fuse_item_embeddings`).
        positives: ``[B]`` chosen item indices.
        negatives: ``[B]`` or ``[B, K]`` rejected item indices.
        top_k: neighbourhood size K (< N).
        chunk_size: see :func:`neighbour_profiles`.

    Returns:
        ``[B]`` distances Δ ≥ 0.
    """
    where = "pair_deltas"
    _check(positives.dim() == 1, where, f"positives must be [B], got {_shape(positives)}")
    batch = positives.shape[0]
    ok = negatives.dim() in (1, 2) and negatives.shape[0] == batch and negatives.numel() > 0
    _check(ok, where, f"negatives must be [{batch}] or [{batch}, K], got {_shape(negatives)}")
    _check_items(where, "positives", positives, item_embeddings.shape[0])
    _check_items(where, "negatives", negatives, item_embeddings.shape[0])
    device = item_embeddings.device
    pairs = torch.cat([positives.to(device)[:, None], negatives.reshape(batch, -1).to(device)], 1)
    unique, inverse = torch.unique(pairs, return_inverse=True)
    profiles = neighbour_profiles(item_embeddings, unique, top_k=top_k, chunk_size=chunk_size)
    probs = profiles.softmax(-1)[inverse]  # [B, 1 + K, top_k]
    return (probs[:, :1] - probs[:, 1:]).norm(dim=-1).mean(-1)


def hardness_lambdas(deltas: Tensor) -> Tensor:
    """Static hardness (HaNoRec eq. 6): ``λ_i = σ(Δ_i) / σ(mean_j Δ_j)``.

    The mean runs over all given deltas (the whole training set in HaNoRec).
    """
    ok = deltas.dim() == 1 and deltas.numel() > 0 and not bool(torch.isnan(deltas).any())
    _check(
        ok,
        "hardness_lambdas",
        f"deltas must be a non-empty [N] tensor without NaN, got shape {_shape(deltas)}",
    )
    return torch.sigmoid(deltas) / torch.sigmoid(deltas.mean())


@torch.no_grad()
def responsiveness(h: Tensor, beta0: float) -> Tensor:
    """Dynamic responsiveness η of one (global) batch (HaNoRec eq. 8), without gradient.

    ``g_i = β0·h_i``; ``ĝ = g / mean(g)``, or ``g / max(mean|g|, 1e-8)`` when
    ``|mean(g)| ≤ 1e-8``; with more than 2 elements the single largest and single smallest
    ``ĝ`` are dropped (trimmed); ``η = σ(mean(trimmed ĝ)) / σ(mean(ĝ))``, the denominator over
    all elements.

    Args:
        h: ``[B]`` margins ``[log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]``.
        beta0: base β0 > 0.

    Returns:
        0-d tensor η.
    """
    ok = h.dim() == 1 and h.numel() > 0 and not bool(torch.isnan(h).any())
    _check(
        ok, "responsiveness", f"h must be a non-empty [B] tensor without NaN, got shape {_shape(h)}"
    )
    _check(beta0 > 0, "responsiveness", f"beta0 must be > 0, got {beta0}")
    g = beta0 * h.detach()
    mean_g = g.mean()
    scale = mean_g if float(mean_g.abs()) > 1e-8 else g.abs().mean().clamp(min=1e-8)
    g_hat = g / scale
    trimmed = g_hat.sort().values[1:-1] if g_hat.numel() > 2 else g_hat
    return torch.sigmoid(trimmed.mean()) / torch.sigmoid(g_hat.mean())


def hanorec_betas(
    lambdas: Tensor, eta: Tensor | float, beta0: float, floor: float = 1e-6
) -> Tensor:
    """Per-sample β (HaNoRec eq. 11): ``β_i = max(floor, β0·η·λ_i)`` (no gradient)."""
    ok = beta0 > 0 and floor > 0
    _check(ok, "hanorec_betas", f"beta0 and floor must be > 0, got beta0={beta0}, floor={floor}")
    eta_t = torch.as_tensor(eta, dtype=lambdas.dtype, device=lambdas.device).detach()
    return (beta0 * eta_t * lambdas.detach()).clamp(min=floor)


# ---------------------------------------------------------------------------------------------
# NoDO, LoRA mode
# ---------------------------------------------------------------------------------------------


def _lora_targets(model: nn.Module) -> list[nn.Module]:
    """Active A/B modules of every duck-typed PEFT LoRA layer that is enabled and unmerged."""
    layers = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(m, "lora_B", None), nn.ModuleDict)
        and hasattr(m, "active_adapters")
    ]
    name = type(model).__name__
    _check(bool(layers), "lora_noise", f"{name} has no PEFT LoRA layer (lora_A/lora_B ModuleDicts)")
    targets: list[nn.Module] = []
    for layer in (m for m in layers if not getattr(m, "disable_adapters", False)):
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_embedding_A", {}):
                warnings.warn("lora_noise: embedding LoRA is not perturbed", stacklevel=4)
            if adapter not in layer.lora_A:
                continue
            merged = adapter in getattr(layer, "merged_adapters", ())
            _check(not merged, "lora_noise", f"adapter {adapter!r} is merged: noise would be lost")
            targets += [layer.lora_A[adapter], layer.lora_B[adapter]]
    _check(bool(targets), "lora_noise", "no enabled LoRA adapter to perturb (all disabled?)")
    for module in targets:
        ok = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        _check(ok, "lora_noise", f"unsupported LoRA module type {type(module).__name__}")
    return targets


def _noise_hook(std: float, generator: torch.Generator | None):
    """Forward hook adding ``f(x; ε)``, ``ε ~ N(0, std²)`` of the weight's shape, to the output."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        x = args[0] if args else kwargs["input"]
        weight = module.weight
        eps = torch.randn(
            weight.shape, generator=generator, device=weight.device, dtype=weight.dtype
        )
        eps = eps.mul_(std).to(x.dtype)
        if isinstance(module, nn.Linear):
            return output + F.linear(x, eps)
        return output + module._conv_forward(x, eps, None)  # type: ignore[operator]

    return hook


@contextlib.contextmanager
def lora_noise(
    model: nn.Module, std: float, generator: torch.Generator | None = None
) -> Iterator[None]:
    """NoDO, LoRA mode (HaNoRec's released code): perturb every active LoRA A and B matrix.

    Inside the context each call of an active ``lora_A[name]`` / ``lora_B[name]`` returns
    ``(W + ε)·x = W·x + ε·x`` with fresh ``ε ~ N(0, std²)`` shaped like ``W`` (forward hooks:
    the stored weights never change, and the hooks are removed on exit, also on error).
    Because PEFT calls ``lora_B(lora_A(dropout(x)))``, this equals the forward with
    ``(B + ε_B)(A + ε_A)``. LoRA layers are found by duck typing (``lora_A``/``lora_B``
    ModuleDicts and ``active_adapters``), so peft is not imported.

    Choices: layers with ``disable_adapters`` set at entry are skipped, and a forward under
    ``model.disable_adapter()`` inside the context stays clean (PEFT does not call the LoRA
    modules then), so reference forwards are never perturbed; a merged active adapter raises
    (its delta lives in the base weight, the noise would silently vanish); embedding LoRA is
    not perturbed (warning); DoRA's magnitude normalisation uses the clean weights. With
    gradient checkpointing, run backward inside the context and keep ``generator=None``
    (checkpointing restores the global RNG, so the recomputation draws the same noise).

    Args:
        model: a module containing PEFT LoRA layers.
        std: noise standard deviation σ (0 is a no-op, after the checks below).
        generator: optional ``torch.Generator`` on the weights' device.

    Raises:
        ValueError: negative/non-finite std, no LoRA layer, no enabled adapter, merged adapter.
    """
    _check(math.isfinite(std) and std >= 0, "lora_noise", f"std must be finite and >= 0, got {std}")
    targets = _lora_targets(model)
    if std == 0:
        yield
        return
    hook = _noise_hook(std, generator)
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in targets]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# RecPO (R²ec, arXiv 2505.16994)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def recpo_rewards(
    scores: Tensor, targets: Tensor, *, ndcg_k: int = 1000, softmax_weight: float = 0.05
) -> Tensor:
    """Fused RecPO reward (R²ec §RecPO): ``R = (1−w)·NDCG@k(rank) + w·softmax(s)[target]``.

    ``rank = 1 + #{v ≠ target : s(v) ≥ s(target)}`` (ties pessimistic); with one relevant item
    ``NDCG@k = 1/log2(rank + 1)`` if ``rank ≤ k`` else 0.

    Args:
        scores: ``[B, G, N]`` item scores of G traces per user.
        targets: ``[B]`` target item indices.
        ndcg_k: NDCG cut-off k.
        softmax_weight: w in [0, 1].

    Returns:
        ``[B, G]`` rewards (no gradient).
    """
    where = "recpo_rewards"
    _check(scores.dim() == 3, where, f"scores must be [B, G, N], got {_shape(scores)}")
    ok = tuple(targets.shape) == (scores.shape[0],)
    _check(ok, where, f"targets must be [{scores.shape[0]}], got {_shape(targets)}")
    _check_items(where, "targets", targets, scores.shape[2])
    _check(ndcg_k >= 1, where, f"ndcg_k must be >= 1, got {ndcg_k}")
    _check(
        0 <= softmax_weight <= 1, where, f"softmax_weight must be in [0, 1], got {softmax_weight}"
    )
    index = targets.to(scores.device)[:, None, None].expand(-1, scores.shape[1], 1)
    target_score = scores.gather(-1, index)  # [B, G, 1]
    rank = (scores >= target_score).sum(-1)  # counts the target itself: the "+1"
    ndcg = torch.where(rank <= ndcg_k, 1.0 / torch.log2(rank.to(scores.dtype) + 1), 0.0)
    prob = (target_score.squeeze(-1) - torch.logsumexp(scores, dim=-1)).exp()
    return (1 - softmax_weight) * ndcg + softmax_weight * prob


def group_advantages(rewards: Tensor, kind: str = "gaussian") -> Tensor:
    """Group-relative advantages over the G traces of each user (GRPO / RecPO).

    * ``gaussian``: ``A = (R − mean_g R) / (std_g R + 1e-8)`` with the unbiased (G−1) std, as
      GRPO and TRL do.
    * ``leave_one_out``: ``A_g = R_g − mean_{g'≠g} R_{g'}`` (RLOO).

    G = 1 gives zeros.

    Args:
        rewards: ``[B, G]``.
        kind: ``gaussian`` or ``leave_one_out``.

    Returns:
        ``[B, G]`` advantages.
    """
    where = "group_advantages"
    _check(rewards.dim() == 2, where, f"rewards must be [B, G], got {_shape(rewards)}")
    ok = kind in ("gaussian", "leave_one_out")
    _check(ok, where, f"kind must be 'gaussian' or 'leave_one_out', got {kind!r}")
    group = rewards.shape[1]
    if group == 1:
        return torch.zeros_like(rewards)
    if kind == "gaussian":
        return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-8)
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (group - 1)


def clipped_surrogate(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> Tensor:
    """Token-level clipped policy surrogate (PPO clip with DAPO's asymmetric range).

    ``ρ = exp(log π − log π_old)``; per token ``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)``,
    averaged over all unmasked tokens of the batch (token-level mean; 0 when none).

    Args:
        logps: ``[N, T]`` token log-probs under the current policy.
        old_logps: ``[N, T]`` token log-probs under the sampling policy (treated as constant).
        advantages: ``[N]`` (broadcast over tokens) or ``[N, T]``.
        mask: ``[N, T]`` bool or 0/1, 1 on response tokens.
        eps_low: lower clip ε_low (0.2).
        eps_high: upper clip ε_high (0.28).

    Returns:
        Scalar loss.
    """
    where = "clipped_surrogate"
    shapes = f"{_shape(logps)}, {_shape(old_logps)}, {_shape(mask)}"
    ok = logps.dim() == 2 and old_logps.shape == logps.shape == mask.shape
    _check(ok, where, f"logps, old_logps and mask must share one [N, T] shape, got {shapes}")
    if advantages.dim() == 1 and advantages.shape[0] == logps.shape[0]:
        advantages = advantages[:, None]
    ok = advantages.dim() == 2 and advantages.shape[0] == logps.shape[0]
    ok = ok and advantages.shape[1] in (1, logps.shape[1])
    _check(
        ok,
        where,
        f"advantages must be [{logps.shape[0]}] or {_shape(logps)}, got {_shape(advantages)}",
    )
    _check(0 <= eps_low < 1 and eps_high >= 0, where, f"bad clip range {eps_low}, {eps_high}")
    advantages = advantages.detach()
    ratio = torch.exp(logps - old_logps.detach())
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)
