"""NoDO (HaNoRec, arXiv 2511.18740): noise on the policy's training forward only.

* Score (logit) mode, eq. 9: :func:`score_noise` returns ``z + ε`` for a policy's scores —
  the ranking head's item scores (``hanorec.readout.head_logps``) or the LM logits at response
  positions (``hanorec.forward.response_logps``) — with ``ε`` of an ``absolute`` std σ (the
  paper) or one ``relative`` to each row's spread of scores (:func:`score_spread`). Both callers
  draw through it, so the noise of both read-outs is the same function of tensors.
* LoRA mode (the authors' code), eq. 10: :func:`lora_noise` perturbs LoRA A/B matrices.

LoRA layers are found by duck typing, so this module imports torch only (no peft).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hanorec.losses._checks import _check

#: How NoDO's score noise is scaled: ``absolute`` (ε ~ N(0, σ²), HaNoRec eq. 9) or ``relative``
#: (ε ~ N(0, (σ·s)²), ``s`` the row's spread of scores, :func:`score_spread`).
NOISE_SCALES: tuple[str, ...] = ("absolute", "relative")


@torch.no_grad()
def score_spread(scores: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Per-row spread ``s`` of the scores over the row's choices (detached).

    ``s_r = sqrt(mean_{j ∈ C_r} (z_rj − mean_{j' ∈ C_r} z_rj')²)``, the population standard
    deviation over the last dimension restricted to the allowed entries ``C_r`` (all entries
    when ``allowed`` is None); a row with a single choice has ``s = 0``.

    Args:
        scores: ``[..., M]`` scores (head scores over items, or logits over the vocabulary).
        allowed: bool mask broadcastable to ``scores``, True where a row may choose the entry.

    Returns:
        ``[...]`` spreads, float32 or wider, no gradient.
    """
    z = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    if allowed is None:
        return z.std(dim=-1, correction=0)
    keep = allowed.to(torch.bool).expand_as(z)
    count = keep.sum(-1).clamp(min=1).to(z.dtype)
    mean = z.masked_fill(~keep, 0).sum(-1) / count
    var = ((z - mean[..., None]).masked_fill(~keep, 0) ** 2).sum(-1) / count
    return var.sqrt()


def score_noise(
    scores: Tensor,
    std: float,
    *,
    scale: str = "absolute",
    allowed: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """NoDO score noise (HaNoRec eq. 9): ``z̃ = z + ε``, a new tensor (``scores`` untouched).

    * ``absolute``: ``ε = σ·n``;
    * ``relative``: ``ε_r = σ·s_r·n_r``, ``s_r`` = :func:`score_spread` of row ``r`` over its
      allowed entries (detached, recomputed for every call, i.e. every batch): the noise is a
      fixed fraction σ of how far apart the row's scores are, whatever their scale.

    Exactly, ``n = torch.randn(scores.shape, generator=generator, device=scores.device,
    dtype=scores.dtype)`` (row-major order, every entry drawn, allowed or not), so the
    ``absolute`` draw is ``σ·torch.randn(...)`` as before this option existed. Gradients flow to
    ``scores`` unchanged (``∂z̃/∂z = 1``); ``s`` takes none.

    Args:
        scores: ``[..., M]`` scores, e.g. ``[B, M]`` head scores or ``[n, V]`` logits.
        std: σ ≥ 0 (0 returns ``scores`` itself, drawing nothing).
        scale: one of :data:`NOISE_SCALES`.
        allowed: for ``relative``, the mask of each row's choices (None: every entry).
        generator: optional ``torch.Generator`` on the scores' device.

    Returns:
        Noisy scores, shaped and typed like ``scores``.
    """
    where = "score_noise"
    _check(math.isfinite(std) and std >= 0, where, f"std must be finite and >= 0, got {std}")
    _check(scale in NOISE_SCALES, where, f"scale must be in {NOISE_SCALES}, got {scale!r}")
    if std == 0:
        return scores
    noise = torch.randn(scores.shape, generator=generator, device=scores.device,
                        dtype=scores.dtype)
    noise = noise.mul_(std)
    if scale == "relative":
        noise = noise.mul_(score_spread(scores, allowed)[..., None].to(noise.dtype))
    return scores + noise


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
