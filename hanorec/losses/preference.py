"""DPO-family preference losses: DPO / cDPO, IPO, SLiC, SimPO and S-DPO, scalar or per-sample β.

:func:`preference_loss` returns a :class:`PreferenceLossOutput` (loss, per-sample losses, detached
rewards, margins, accuracies); :func:`preference_metrics` turns one into the logged
``rewards/*``, ``logps/*``, ``hars/*`` and ``nodo/std`` values (the same keys in ``hanorec.dpo``
and the TRL trainer).

**The loss registry.** :data:`LOSSES` maps each ``loss_type`` to a :class:`LossSpec`: its
per-sample formula and what it expects (pairwise or K negatives at once, length-averaged
log-probabilities, reference-free, which options apply). A new loss is one entry there: the
argument checks, the DPO stage (``--loss`` choices and help, length averaging, pairwise
expansion) and the TRL trainer read the registry. ``LOSS_TYPES`` lists the names and
``PAIRWISE_LOSS_TYPES`` those that take one rejected response per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hanorec.losses._checks import _check, _shape

#: ``(chosen_r [B, 1], rejected_r [B, K], β [B, 1], ε, γ) -> [B]`` per-sample losses.
LossFormula = Callable[[Tensor, Tensor, Tensor, float, float], Tensor]


def _pair(chosen_r: Tensor, rejected_r: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``h = r_w − r_l`` and β as ``[B]`` (pairwise losses have K = 1)."""
    return (chosen_r - rejected_r)[:, 0], beta[:, 0]


def _sigmoid(chosen_r: Tensor, rejected_r: Tensor, beta: Tensor, eps: float,
             gamma: float) -> Tensor:
    """DPO ``−log σ(βh)``; cDPO with ε: ``−(1−ε)·log σ(βh) − ε·log σ(−βh)``."""
    h, beta = _pair(chosen_r, rejected_r, beta)
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _ipo(chosen_r: Tensor, rejected_r: Tensor, beta: Tensor, eps: float, gamma: float) -> Tensor:
    """IPO ``(h − 1/(2β))²``."""
    h, beta = _pair(chosen_r, rejected_r, beta)
    return (h - 1 / (2 * beta)) ** 2


def _hinge(chosen_r: Tensor, rejected_r: Tensor, beta: Tensor, eps: float, gamma: float) -> Tensor:
    """SLiC ``relu(1 − βh)``."""
    h, beta = _pair(chosen_r, rejected_r, beta)
    return torch.relu(1 - beta * h)


def _simpo(chosen_r: Tensor, rejected_r: Tensor, beta: Tensor, eps: float, gamma: float) -> Tensor:
    """SimPO ``−log σ(β·(avg_w − avg_l) − γ)`` (reference-free: ``r`` is the log-prob)."""
    h, beta = _pair(chosen_r, rejected_r, beta)
    return -F.logsigmoid(beta * h - gamma)


def _sdpo(chosen_r: Tensor, rejected_r: Tensor, beta: Tensor, eps: float, gamma: float) -> Tensor:
    """S-DPO ``−log σ(−log Σ_k exp(β·(r_k − r_w)))`` over the K negatives."""
    return -F.logsigmoid(-torch.logsumexp(beta * (rejected_r - chosen_r), dim=-1))


def _sft(chosen_r: Tensor, rejected_r: Tensor, beta: Tensor, eps: float, gamma: float) -> Tensor:
    """Continued SFT ``−log π(y_w | x)`` (reference-free: ``r`` is the log-prob): the control a
    preference loss must beat on the same rows and steps. With a ranking head ``log π`` is a
    log-softmax over the row's choices, so this is SFT's own loss; the rejected items and β play
    no part."""
    return -chosen_r[:, 0]


@dataclass(frozen=True)
class LossSpec:
    """One preference loss of the registry.

    Attributes:
        name: The ``loss_type`` value.
        formula: Per-sample losses from implicit rewards (:data:`LossFormula`).
        help: One line for ``--help``: what it is and where it comes from.
        pairwise: One rejected response per sample; with K negatives a caller makes every
            ``(chosen, rejected_k)`` its own pair. False: the formula takes all K at once.
        length_averaged: Defined on length-averaged log-probabilities (callers average).
        reference_free: Takes no reference log-probabilities.
        options: The keyword options it reads (``label_smoothing``, ``simpo_gamma``).
    """

    name: str
    formula: LossFormula
    help: str
    pairwise: bool = True
    length_averaged: bool = False
    reference_free: bool = False
    options: tuple[str, ...] = ()


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("sigmoid", _sigmoid, "DPO (Rafailov et al. 2023; with label_smoothing: cDPO)",
             options=("label_smoothing",)),
    LossSpec("ipo", _ipo, "IPO (Azar et al. 2023)", length_averaged=True),
    LossSpec("hinge", _hinge, "SLiC (Zhao et al. 2023)"),
    LossSpec("simpo", _simpo, "SimPO (Meng et al. 2024; reference-free)", length_averaged=True,
             reference_free=True, options=("simpo_gamma",)),
    LossSpec("sdpo", _sdpo, "softmax DPO over K negatives (S-DPO, Chen et al. 2024)",
             pairwise=False),
    LossSpec("sft", _sft, "continued SFT, -log pi(chosen): the equal-compute control of every "
             "preference loss (reference-free)", pairwise=False, reference_free=True),
)}
LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)
PAIRWISE_LOSS_TYPES: tuple[str, ...] = tuple(n for n, spec in LOSSES.items() if spec.pairwise)


def loss_help() -> str:
    """``name = what it is`` for every registered loss, for a ``--loss`` help text."""
    return ", ".join(f"{name} = {spec.help}" for name, spec in LOSSES.items())


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
    _check(loss_type in LOSSES, where, f"loss_type must be in {LOSS_TYPES}, got {loss_type!r}")
    _check(0 <= label_smoothing < 0.5, where, f"label_smoothing={label_smoothing} not in [0, 0.5)")
    for option, value in (("label_smoothing", label_smoothing), ("simpo_gamma", simpo_gamma)):
        takers = " or ".join(repr(n) for n, spec in LOSSES.items() if option in spec.options)
        only = f"{option} applies to loss_type={takers} only"
        _check(not value or option in LOSSES[loss_type].options, where, only)


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
    _check(num_rejected == 1 or not LOSSES[loss_type].pairwise, where, pairwise)
    both = "ref_chosen_logps and ref_rejected_logps must both be given or both be None"
    _check((ref_chosen is None) == (ref_rejected is None), where, both)
    if ref_chosen is not None:
        free = f"loss_type={loss_type!r} is reference-free: no ref_*_logps"
        _check(not LOSSES[loss_type].reference_free, where, free)
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
    formula = LOSSES[loss_type].formula
    losses = formula(chosen_r[:, None], rejected_r, beta_col, label_smoothing, simpo_gamma)
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


def preference_metrics(
    out: PreferenceLossOutput,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    beta: Tensor,
    eta: Tensor | float,
    lambdas: Tensor,
    noise_std: float,
    *,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """The logged values of one preference step (keys as TRL names the reward ones).

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (means
    of :class:`PreferenceLossOutput`), ``logps/chosen``, ``logps/rejected`` (mean policy
    log-probabilities), ``hars/beta_mean``/``_min``/``_max`` (the per-sample β),
    ``hars/eta`` (η, 1 unless dynamic), ``hars/lambda_mean`` (mean static hardness λ) and
    ``nodo/std`` (σ of the noise, 0 when off).

    Args:
        out: The loss output.
        chosen_logps: Policy log-probs of the chosen responses.
        rejected_logps: Policy log-probs of the rejected responses (any shape).
        beta: Per-sample β.
        eta: The responsiveness η used.
        lambdas: Static hardness λ of the batch.
        noise_std: σ of the NoDO noise of this forward (0 when off).
        gather: Collects a tensor across processes before the mean (``accelerator.gather``);
            None: this process's values.
    """
    collect = gather or (lambda tensor: tensor)

    def values(tensor: Tensor) -> Tensor:
        return collect(tensor.detach().contiguous())

    betas = values(beta)
    return {
        "rewards/chosen": float(values(out.chosen_rewards).mean()),
        "rewards/rejected": float(values(out.rejected_rewards).mean()),
        "rewards/margins": float(values(out.margins).mean()),
        "rewards/accuracies": float(values(out.accuracies).mean()),
        "logps/chosen": float(values(chosen_logps).mean()),
        "logps/rejected": float(values(rejected_logps).mean()),
        "hars/beta_mean": float(betas.mean()),
        "hars/beta_min": float(betas.min()),
        "hars/beta_max": float(betas.max()),
        "hars/eta": float(eta),
        "hars/lambda_mean": float(values(lambdas).float().mean()),
        "nodo/std": float(noise_std),
    }
