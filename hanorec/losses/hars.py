"""HaRS — hardness-aware reward scaling (HaNoRec, arXiv 2511.18740, eqs. 5, 6, 8, 11).

Pipeline: :func:`fuse_item_embeddings` (unit-norm text+image item embeddings) →
:func:`neighbour_profiles` (top-K cosine similarities) → :func:`pair_deltas` (eq. 5) →
:func:`hardness_lambdas` (eq. 6, static); per batch :func:`responsiveness` (eq. 8, dynamic) and
:func:`hanorec_betas` (eq. 11) give the per-sample β passed to
:func:`hanorec.losses.preference_loss`. :func:`hars_betas` is the one place that turns a
hardness mode (``none``, ``static``, ``dynamic``) into β: ``hanorec.dpo``, the TRL trainer and
``examples/custom_loop.py`` all call it. :func:`spread` summarises λ and β for the logs. The
formulas are in ``docs/methods.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hanorec.losses._checks import _check, _check_items, _shape


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
    temperature: float = 1.0,
) -> Tensor:
    """Pair distance Δ (HaNoRec eq. 5, with a temperature τ on the profiles).

    ``Δ_i = ‖softmax(s(pos_i) / τ) − softmax(s(neg_i) / τ)‖₂``

    ``s(v)`` is :func:`neighbour_profiles` (top-K cosine similarities, descending); with K
    negatives per pair (``negatives`` ``[B, K]``) Δ is the mean over them. τ = 1 is the paper's
    eq. 5 (and the authors' code). Cosines lie in [−1, 1], so at τ = 1 every profile's softmax is
    close to uniform and Δ close to 0; a smaller τ sharpens the profiles so that Δ (and the
    static hardness λ of eq. 6) can spread. Δ ∈ [0, √2] whatever τ (two probability vectors).
    Profiles are computed once for the distinct items involved only.

    Worked example (``tests/test_losses.py``): K = 2, ``s(pos) = (1, 0)``, ``s(neg) = (0, 0)``,
    τ = 1/ln 3: ``softmax((ln 3, 0)) = (3/4, 1/4)``, ``softmax((0, 0)) = (1/2, 1/2)``, so
    ``Δ = ‖(1/4, −1/4)‖₂ = √2/4 ≈ 0.3536``; at τ = 1, ``Δ = √2·(σ(1) − 1/2) ≈ 0.3267``.

    Args:
        item_embeddings: ``[N, D]`` item embeddings (e.g. :func:`fuse_item_embeddings`).
        positives: ``[B]`` chosen item indices.
        negatives: ``[B]`` or ``[B, K]`` rejected item indices.
        top_k: neighbourhood size K (< N).
        chunk_size: see :func:`neighbour_profiles`.
        temperature: τ > 0 dividing the profiles before the softmax (1: the paper).

    Returns:
        ``[B]`` distances Δ ∈ [0, √2].
    """
    where = "pair_deltas"
    ok = math.isfinite(temperature) and temperature > 0
    _check(ok, where, f"temperature must be a finite number > 0, got {temperature}")
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
    probs = (profiles / temperature).softmax(-1)[inverse]  # [B, 1 + K, top_k]
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


#: The quantiles :func:`spread` reports, as (name, q); the maximum is added.
SPREAD_QUANTILES: tuple[tuple[str, float], ...] = (("p10", 0.1), ("median", 0.5), ("p90", 0.9))


@torch.no_grad()
def spread(values: Tensor) -> dict[str, float]:
    """p10, median, p90 and max of ``values`` (any shape, flattened), for logging λ, β or η.

    Quantile ``q`` of the sorted values ``x_0 ≤ … ≤ x_{n−1}`` interpolates linearly at position
    ``q·(n − 1)`` (``torch.quantile``'s default, without its 2**24-element limit), in float64.
    E.g. ``spread(tensor([1., 2., 3., 4., 5.]))`` is ``{"p10": 1.4, "median": 3.0, "p90": 4.6,
    "max": 5.0}``.
    """
    flat = values.detach().reshape(-1).to(torch.float64)
    _check(flat.numel() > 0, "spread", "values must not be empty")
    _check(not bool(torch.isnan(flat).any()), "spread", "values must not contain NaN")
    ordered = flat.sort().values.cpu()
    last = ordered.numel() - 1
    out = {}
    for name, q in SPREAD_QUANTILES:
        position = q * last
        low = math.floor(position)
        high = min(low + 1, last)
        out[name] = float(ordered[low] + (position - low) * (ordered[high] - ordered[low]))
    out["max"] = float(ordered[last])
    return out


#: The HaRS modes: β_i = β0 (``none``), β0·λ_i (``static``), β0·η·λ_i (``dynamic``).
HARDNESS_MODES: tuple[str, ...] = ("none", "static", "dynamic")


def reward_margins(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
) -> Tensor:
    """Implicit reward margins ``h_i = r(y_w) − r(y_l)``, ``r(y) = log π(y) − log π_ref(y)``.

    With K negatives (``rejected`` ``[B, K]``) the rejected term is the mean over them; without
    a reference (``None``) ``log π_ref ≡ 0``. Detached: η takes no gradient.

    Args:
        chosen: ``[B]`` policy log-probs of the chosen responses.
        rejected: ``[B]`` or ``[B, K]`` policy log-probs of the rejected responses.
        ref_chosen: Reference log-probs like ``chosen``, or None.
        ref_rejected: Reference log-probs like ``rejected``, or None.

    Returns:
        ``[B]`` margins.
    """
    ref_c = 0.0 if ref_chosen is None else ref_chosen
    ref_r = 0.0 if ref_rejected is None else ref_rejected
    rejected_margin = (rejected - ref_r).mean(-1) if rejected.dim() == 2 else rejected - ref_r
    return ((chosen - ref_c) - rejected_margin).detach()


def hars_betas(
    mode: str,
    beta0: float,
    lambdas: Tensor,
    margins: Tensor | None = None,
    *,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample β of one batch for a HaRS mode, and the η used (HaNoRec eqs. 8, 11).

    * ``none``: ``β_i = β0``;
    * ``static``: ``β_i = max(1e-6, β0·λ_i)``;
    * ``dynamic``: ``β_i = max(1e-6, β0·η·λ_i)``, ``η`` = :func:`responsiveness` of the
      margins of the *global* batch (``gather`` collects them across processes).

    Args:
        mode: One of :data:`HARDNESS_MODES`.
        beta0: β0 > 0.
        lambdas: ``[B]`` static hardness λ (ones when unknown), dtype and device of the loss.
        margins: ``[B]`` margins ``h`` (:func:`reward_margins`); needed by ``dynamic`` only.
        gather: ``accelerator.gather`` in a distributed run; None: this process's batch.

    Returns:
        ``(β [B], η)``; η is 1 unless ``dynamic``.
    """
    _check(mode in HARDNESS_MODES, "hars_betas", f"mode must be in {HARDNESS_MODES}, got {mode!r}")
    one = torch.tensor(1.0)
    if mode == "none":
        return torch.full_like(lambdas, beta0), one
    if mode == "static":
        return hanorec_betas(lambdas, one, beta0), one
    _check(margins is not None, "hars_betas", "mode 'dynamic' needs the margins h")
    global_margins = margins.detach().contiguous()
    eta = responsiveness(gather(global_margins) if gather else global_margins, beta0)
    return hanorec_betas(lambdas, eta, beta0), eta
