"""``hanorec.losses`` inside other training codebases.

Each integration is its own submodule and imports its host library lazily, so importing
``hanorec.integrations`` costs nothing and needs nothing beyond hanorec itself:

* :mod:`hanorec.integrations.trl` — :class:`~hanorec.integrations.trl.HaNoRecDPOTrainer`, a thin
  TRL ``DPOTrainer`` subclass whose loss is HaNoRec's (HaRS per-sample β from a ``hardness``
  column and the live responsiveness η, NoDO logit noise on the policy forward). Needs TRL 1.16
  (``pip install "hanorec[trl]"``).

Hand-written loops need no integration: ``from hanorec.losses import ...`` (torch only); see
``examples/custom_loop.py``.
"""
