"""Pure-tensor preference-optimisation losses for LLM-based recommendation (torch only).

Importing this package pulls in ``torch`` and nothing else (no transformers, peft, accelerate),
so it can be dropped into any DPO loop (TRL, LLaMA-Factory, hand-written). Public API, one
concept per submodule, all re-exported here (``from hanorec.losses import preference_loss``):

* :mod:`~hanorec.losses.logps` — :func:`sequence_logps`: per-sequence log-probabilities without
  a dense log-softmax, with the NoDO logit noise (HaNoRec, arXiv 2511.18740).
* :mod:`~hanorec.losses.preference` — :func:`preference_loss` → :class:`PreferenceLossOutput`:
  DPO / cDPO (``sigmoid``), IPO, SLiC (``hinge``), SimPO and S-DPO (softmax DPO over K
  negatives), with scalar or per-sample β; the loss registry ``LOSSES`` (one
  :class:`LossSpec` per ``loss_type``; ``LOSS_TYPES`` and ``PAIRWISE_LOSS_TYPES`` list them) and
  :func:`preference_metrics`, the logged values of a step.
* :mod:`~hanorec.losses.hars` — HaRS (hardness-aware reward scaling, HaNoRec eqs. 5, 6, 8, 11):
  :func:`fuse_item_embeddings`, :func:`neighbour_profiles`, :func:`pair_deltas`,
  :func:`hardness_lambdas`, :func:`responsiveness`, :func:`hanorec_betas`, and per batch
  :func:`reward_margins` and :func:`hars_betas` (β for a mode in ``HARDNESS_MODES``);
  :func:`spread` (p10/median/p90/max of λ or β, for the logs).
* :mod:`~hanorec.losses.nodo` — NoDO: :func:`score_noise` (noise on head scores or logits,
  absolute or relative to :func:`score_spread`, a scale in ``NOISE_SCALES``) and the LoRA mode
  :func:`lora_noise` (duck-typed PEFT LoRA layers, forward hooks).
* :mod:`~hanorec.losses.recpo` — RecPO (R²ec, arXiv 2505.16994): :func:`recpo_rewards`,
  :func:`group_advantages`, :func:`clipped_surrogate`.

Bad input raises :class:`ValueError` naming the function and the offending argument.
"""

from __future__ import annotations

from hanorec.losses.hars import (
    HARDNESS_MODES,
    fuse_item_embeddings,
    hanorec_betas,
    hardness_lambdas,
    hars_betas,
    neighbour_profiles,
    pair_deltas,
    responsiveness,
    reward_margins,
    spread,
)
from hanorec.losses.logps import IGNORE_INDEX, sequence_logps
from hanorec.losses.nodo import NOISE_SCALES, lora_noise, score_noise, score_spread
from hanorec.losses.preference import (
    LOSS_TYPES,
    LOSSES,
    PAIRWISE_LOSS_TYPES,
    LossSpec,
    PreferenceLossOutput,
    loss_help,
    preference_loss,
    preference_metrics,
)
from hanorec.losses.recpo import ADVANTAGES, clipped_surrogate, group_advantages, recpo_rewards

__all__ = [
    "ADVANTAGES",
    "HARDNESS_MODES",
    "IGNORE_INDEX",
    "LOSSES",
    "LOSS_TYPES",
    "NOISE_SCALES",
    "PAIRWISE_LOSS_TYPES",
    "LossSpec",
    "PreferenceLossOutput",
    "clipped_surrogate",
    "fuse_item_embeddings",
    "group_advantages",
    "hanorec_betas",
    "hardness_lambdas",
    "hars_betas",
    "lora_noise",
    "loss_help",
    "neighbour_profiles",
    "pair_deltas",
    "preference_loss",
    "preference_metrics",
    "recpo_rewards",
    "responsiveness",
    "reward_margins",
    "score_noise",
    "score_spread",
    "sequence_logps",
    "spread",
]
