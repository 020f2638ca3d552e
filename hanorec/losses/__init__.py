"""Pure-tensor preference-optimisation losses for LLM-based recommendation (torch only).

Importing this package pulls in ``torch`` and nothing else (no transformers, peft, accelerate),
so it can be dropped into any DPO loop (TRL, LLaMA-Factory, hand-written). Public API, one
concept per submodule, all re-exported here (``from hanorec.losses import preference_loss``):

* :mod:`~hanorec.losses.logps` — :func:`sequence_logps`: per-sequence log-probabilities without
  a dense log-softmax, with the NoDO logit noise (HaNoRec, arXiv 2511.18740).
* :mod:`~hanorec.losses.preference` — :func:`preference_loss` → :class:`PreferenceLossOutput`:
  DPO / cDPO (``sigmoid``), IPO, SLiC (``hinge``), SimPO and S-DPO (softmax DPO over K
  negatives), with scalar or per-sample β; ``LOSS_TYPES`` and ``PAIRWISE_LOSS_TYPES`` list the
  accepted ``loss_type`` values.
* :mod:`~hanorec.losses.hars` — HaRS (hardness-aware reward scaling, HaNoRec eqs. 5, 6, 8, 11):
  :func:`fuse_item_embeddings`, :func:`neighbour_profiles`, :func:`pair_deltas`,
  :func:`hardness_lambdas`, :func:`responsiveness`, :func:`hanorec_betas`.
* :mod:`~hanorec.losses.nodo` — NoDO in LoRA mode: :func:`lora_noise` (duck-typed PEFT LoRA
  layers, forward hooks).
* :mod:`~hanorec.losses.recpo` — RecPO (R²ec, arXiv 2505.16994): :func:`recpo_rewards`,
  :func:`group_advantages`, :func:`clipped_surrogate`.

Bad input raises :class:`ValueError` naming the function and the offending argument.
"""

from __future__ import annotations

from hanorec.losses.hars import (
    fuse_item_embeddings,
    hanorec_betas,
    hardness_lambdas,
    neighbour_profiles,
    pair_deltas,
    responsiveness,
)
from hanorec.losses.logps import sequence_logps
from hanorec.losses.nodo import lora_noise
from hanorec.losses.preference import (
    LOSS_TYPES,
    PAIRWISE_LOSS_TYPES,
    PreferenceLossOutput,
    preference_loss,
)
from hanorec.losses.recpo import clipped_surrogate, group_advantages, recpo_rewards

__all__ = [
    "LOSS_TYPES",
    "PAIRWISE_LOSS_TYPES",
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
