"""HaNoRec inside TRL: a ``DPOTrainer`` whose loss comes from :mod:`hanorec.losses`.

    from hanorec.integrations.trl import HaNoRecDPOConfig, HaNoRecDPOTrainer

    args = HaNoRecDPOConfig(output_dir="out", beta=0.1, hardness="dynamic", noise_std=0.1)
    trainer = HaNoRecDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=proc)
    trainer.train()

The dataset is any TRL preference dataset (``prompt`` / ``chosen`` / ``rejected``, with
``image``/``images`` for a vision-language model) plus an optional ``hardness`` column: the
static hardness ``λ_i = σ(Δ_i) / σ(mean_j Δ_j)`` of each pair (HaNoRec, arXiv 2511.18740,
eq. 6), precomputed with :func:`hanorec.losses.pair_deltas` and
:func:`hanorec.losses.hardness_lambdas` (or ``hanorec.hardness``); without it λ = 1.

What the subclass changes, and nothing else:

* **Loss** — :meth:`HaNoRecDPOTrainer.compute_loss` (TRL 1.16 computes the whole DPO loss in
  one private ``_compute_loss``; the public ``compute_loss`` of ``transformers.Trainer`` is the
  smallest stable surface, so it is replaced as a whole). Policy log-probs
  ``log π(y) = Σ_t log π(y_t | x, y_<t)`` over completion tokens come from
  :func:`hanorec.losses.sequence_logps` on the policy's logits, with NoDO noise
  ``z̃ = z + ε, ε ~ N(0, σ²)`` at completion positions in training only (eq. 9); the reference
  log-probs come from TRL's own, never perturbed, ``compute_ref_log_probs`` (a ``ref_model``,
  the PEFT adapter disabled, or ``precompute_ref_log_probs``). With
  ``h_i = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]``, the live
  responsiveness ``η`` (eq. 8, over the global batch) and ``β_i = max(1e-6, β0·η·λ_i)``
  (eq. 11) feed :func:`hanorec.losses.preference_loss`: ``−mean_i log σ(β_i·h_i)`` (eq. 12).
* **Forward** — for the families :mod:`hanorec.forward` shares the prompt for (LLaVA,
  Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM), each prompt and its images run **once** and the
  chosen and rejected responses branch from it (:func:`hanorec.forward.response_logps`: KV
  cache, or packed sequences under gradient checkpointing), for the policy and for the
  reference. TRL's collated batch ``[prompt+chosen rows; prompt+rejected rows]`` is read back
  into one prompt batch and ``[B, 2, R]`` responses (:func:`shared_prompt_batch`); a response's
  ``log π(y | x) = Σ_t log π(y_t | x, y_<t)`` is the same number as on TRL's duplicated batch
  (tested to 1e-5 against TRL's own forward). Other backbones, batches whose two halves do not
  share their prompts (a custom collator) and ``return_outputs=True`` keep TRL's duplicated
  forward (a one-line warning says which backbone); ``share_prompt=False`` turns sharing off.
* **Data** — the ``hardness`` column survives TRL's column removal (it is added to the
  signature columns) and its collator (a wrapper collates it into ``inputs["hardness"]``).
* **Logs** — ``rewards/*`` and ``logps/*`` as TRL names them, plus ``hars/beta_mean``,
  ``hars/beta_min``, ``hars/beta_max``, ``hars/eta``, ``hars/lambda_mean`` and ``nodo/std``
  (averaged over the logging interval, like TRL's own metrics).

Supported TRL options: ``loss_type`` one of ``sigmoid`` (DPO; with ``label_smoothing`` ε it is
cDPO, ``−(1−ε)·log σ(βh) − ε·log σ(−βh)``), ``ipo`` (on length-averaged log-probs, as TRL
does) or ``hinge``; ``f_divergence_type="reverse_kl"``; no ``ld_alpha``, ``use_weighting`` or
MoE auxiliary loss. Anything else raises ``ValueError`` at construction. The policy forward
materialises its logits (responses only on the shared path, ``[2B, T, V]`` on TRL's), unlike
TRL's fused LM head: NoDO perturbs logits.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SUPPORTED_TRL = ">=1.16.0,<1.17"
_INSTALL = 'pip install "hanorec[trl]"'


def _require_trl() -> None:
    """Raise ``ImportError`` unless a supported TRL version is importable."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    try:
        import trl
    except ImportError as err:
        raise ImportError(
            f"hanorec.integrations.trl needs TRL {SUPPORTED_TRL}, which is not installed: "
            f"{_INSTALL}"
        ) from err
    if Version(trl.__version__) not in SpecifierSet(SUPPORTED_TRL):
        raise ImportError(
            f"hanorec.integrations.trl supports TRL {SUPPORTED_TRL} (its DPOTrainer internals "
            f"change between releases); found trl {trl.__version__}. Install a supported one: "
            f"{_INSTALL}"
        )


_require_trl()

from accelerate.utils import is_peft_model  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from hanorec.forward import PER_TOKEN_KEYS, response_logps, shares_prompt  # noqa: E402
from hanorec.losses import (  # noqa: E402
    HARDNESS_MODES,
    IGNORE_INDEX,
    LOSSES,
    hars_betas,
    preference_loss,
    preference_metrics,
    sequence_logps,
)

#: The registry's pairwise losses that take a reference (TRL's batch has one rejected response
#: per prompt, and its own reference forward): sigmoid, ipo, hinge.
LOSS_TYPES = tuple(n for n, s in LOSSES.items() if s.pairwise and not s.reference_free)
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


@dataclass
class HaNoRecDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus HaNoRec's three options (``beta`` is β0)."""

    hardness: str = field(
        default="dynamic",
        metadata={"help": "HaRS (HaNoRec Sec. 4.1): none → β0; static → β0·λ_i (eq. 6); dynamic "
                          "→ β0·η·λ_i with the live responsiveness η (eqs. 8, 11)."},
    )
    hardness_column: str = field(
        default="hardness",
        metadata={"help": "Dataset column holding each pair's precomputed static hardness λ_i "
                          "(HaNoRec eq. 6); 1.0 where absent."},
    )
    noise_std: float = field(
        default=0.1,
        metadata={"help": "σ of the NoDO Gaussian noise on the policy's completion logits in "
                          "training (HaNoRec eq. 9; 0.1 in the paper, 0.05 on sparse "
                          "catalogues); 0 disables it."},
    )
    share_prompt: bool = field(
        default=True,
        metadata={"help": "Run each prompt and its images once and branch the chosen and "
                          "rejected responses from it (hanorec.forward), for the backbones "
                          "it supports; false keeps TRL's duplicated batch."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hardness not in HARDNESS_MODES:
            raise ValueError(f"HaNoRecDPOConfig.hardness must be one of {HARDNESS_MODES}, got "
                             f"{self.hardness!r}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError("HaNoRecDPOConfig.noise_std must be finite and >= 0, got "
                             f"{self.noise_std}")


class HardnessCollator:
    """Wraps a TRL preference collator so that a per-pair ``hardness`` value reaches the loss.

    The column is taken out of every example before the wrapped collator runs (TRL's
    collators ignore or mutate unknown keys) and returned as ``batch[column]``, a ``[B]``
    float32 tensor; examples without it get λ = 1.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
                 column: str = "hardness") -> None:
        self.collator = collator
        self.column = column

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Any]:
        values = [1.0 if ex.get(self.column) is None else float(ex[self.column]) for ex in examples]
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"dataset column {self.column!r}: hardness λ must be finite and > "
                             f"0, got {bad[:5]}")
        batch = self.collator([{k: v for k, v in ex.items() if k != self.column}
                               for ex in examples])
        batch[self.column] = torch.tensor(values, dtype=torch.float32)
        return batch


class HaNoRecDPOTrainer(DPOTrainer):
    """TRL ``DPOTrainer`` with the HaNoRec loss (HaRS β per sample, NoDO logit noise).

    Takes the arguments of ``trl.DPOTrainer``; ``args`` should be a :class:`HaNoRecDPOConfig`
    (a plain ``DPOConfig`` means ``hardness="dynamic"``, ``noise_std=0.1``,
    ``share_prompt=True``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hardness = getattr(self.args, "hardness", "dynamic")
        self.noise_std = float(getattr(self.args, "noise_std", 0.1))
        self.share_prompt = self._sharing(bool(getattr(self.args, "share_prompt", True)))
        self._check_supported()
        self.data_collator = HardnessCollator(self.data_collator, self.hardness_column)

    def _sharing(self, wanted: bool) -> bool:
        """Whether the shared-prompt forward runs; a one-line warning when it cannot."""
        if wanted and not shares_prompt(self.model):
            family = getattr(self.model.config, "model_type", type(self.model).__name__)
            warnings.warn(f"HaNoRecDPOTrainer: hanorec.forward does not share the prompt for "
                          f"{family!r}; using TRL's duplicated forward (slower, same loss)",
                          RuntimeWarning, stacklevel=3)
            return False
        return wanted

    def _check_supported(self) -> None:
        """Refuse TRL options this loss does not implement (rather than ignore them)."""
        problems = []
        if len(self.loss_types) != 1 or self.loss_types[0] not in LOSS_TYPES:
            problems.append(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_types}")
        if self.label_smoothing and self.loss_types != ["sigmoid"]:
            problems.append("label_smoothing (cDPO) applies to loss_type='sigmoid' only")
        if self.f_divergence_type != "reverse_kl":
            problems.append("f_divergence_type must be 'reverse_kl', got "
                            f"{self.f_divergence_type!r}")
        if self.ld_alpha is not None or self.use_weighting or self.aux_loss_enabled:
            problems.append("ld_alpha, use_weighting and the MoE auxiliary loss are not supported")
        if self.hardness not in HARDNESS_MODES:
            problems.append(f"hardness must be one of {HARDNESS_MODES}, got {self.hardness!r}")
        if problems:
            raise ValueError("HaNoRecDPOTrainer: " + "; ".join(problems))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.hardness_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.hardness_column]

    @property
    def hardness_column(self) -> str:
        """The hardness column (readable before ``__init__`` finishes, for column removal)."""
        return getattr(self.args, "hardness_column", "hardness")

    def _shared(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], Tensor] | None:
        """The batch as one prompt batch and ``[B, 2, R]`` responses, or None (TRL's path)."""
        if not getattr(self, "share_prompt", False):
            return None
        return shared_prompt_batch(inputs, skip=(*_NON_MODEL_KEYS, self.hardness_column))

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``[B]`` chosen and rejected reference log-probs (sums), never perturbed: the shared
        forward when it applies, else TRL's own; the hardness entry is kept from the model."""
        shared = self._shared(inputs)
        if shared is None:
            return super().compute_ref_log_probs(model, _without(inputs, self.hardness_column))
        adapter: Any = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            adapter = use_adapter(unwrapped, adapter_name=name)
        with (torch.no_grad(), adapter, self.accelerator.autocast(),
              disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)):
            logps = response_logps(model, *shared)
        return logps[:, 0], logps[:, 1]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, Any]:
        """HaNoRec loss of one batch (TRL's ``[chosen rows; rejected rows]``); see the module."""
        mode = "train" if self.model.training else "eval"
        average = LOSSES[self.loss_types[0]].length_averaged
        noise_std = self.noise_std if mode == "train" else 0.0
        shared = None if return_outputs else self._shared(inputs)
        if shared is None:
            policy, outputs = self._policy_logps(model, inputs, noise_std=noise_std,
                                                 average=average)
        else:
            policy, outputs = response_logps(model, *shared, average=average,
                                             noise_std=noise_std).t().reshape(-1), None
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(inputs, average=average)
        lam = inputs.get(self.hardness_column)
        lam = torch.ones_like(chosen) if lam is None else lam.to(chosen.device, chosen.dtype)
        beta, eta = self._betas(chosen - ref_chosen - (rejected - ref_rejected), lam)
        out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                              loss_type=self.loss_types[0], label_smoothing=self.label_smoothing)
        self._log_metrics(mode, out, chosen, rejected, beta, eta, lam)
        return (out.loss, outputs) if return_outputs else out.loss

    def _policy_logps(self, model: Any, inputs: dict[str, Any], *, noise_std: float,
                      average: bool) -> tuple[Tensor, Any]:
        """TRL's path: ``[2B]`` completion log-probs from the policy's logits over the
        duplicated batch, NoDO noise on completions."""
        model_kwargs = {k: v for k,
                        v in inputs.items() if k not in _NON_MODEL_KEYS
                        and k != self.hardness_column}
        outputs = model(**model_kwargs, use_cache=False)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
        # prompt-learning PEFT prepends tokens
        logits = outputs.logits[:, -labels.shape[1] - 1 : -1]
        return sequence_logps(logits, labels, average=average, noise_std=noise_std), outputs

    def _reference_logps(self, inputs: dict[str, Any], *, average: bool) -> tuple[Tensor, Tensor]:
        """``[B]`` chosen and rejected reference log-probs (precomputed, or a reference forward)."""
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model,
                                                                  inputs)
        if average:
            lengths = inputs["completion_mask"][:, 1:].sum(1).clamp(min=1).to(ref_chosen.dtype)
            ref_chosen, ref_rejected = (
                ref_chosen / lengths.chunk(2)[0],
                ref_rejected / lengths.chunk(2)[1],
            )
        return ref_chosen.detach(), ref_rejected.detach()

    def _betas(self, h: Tensor, lam: Tensor) -> tuple[Tensor, float]:
        """Per-sample β (HaNoRec eq. 11) and η (eq. 8 over the global batch; 1 unless dynamic)."""
        beta, eta = hars_betas(self.hardness, self.beta, lam, h, gather=self.accelerator.gather)
        return beta, float(eta)

    def _log_metrics(self, mode: str, out: Any, chosen: Tensor, rejected: Tensor, beta: Tensor,
                     eta: float, lam: Tensor) -> None:
        """Append TRL's reward metrics, HaNoRec's ``hars/*`` and ``nodo/std`` to ``_metrics``."""
        noise_std = self.noise_std if mode == "train" else 0.0
        values = preference_metrics(out, chosen, rejected, beta, eta, lam, noise_std,
                                    gather=self.accelerator.gather)
        for key, value in values.items():
            self._metrics[mode][key].append(value)


def shared_prompt_batch(inputs: Mapping[str, Any], *,
                        skip: tuple[str, ...] = ()) -> tuple[dict[str, Any], Tensor] | None:
    """TRL's preference batch as :func:`hanorec.forward.response_logps` takes it.

    TRL collates ``2B`` rows, ``[prompt_b, chosen_b]`` for ``b < B`` then ``[prompt_b,
    rejected_b]``, with ``completion_mask`` marking the responses and every image input repeated
    for the second half. The prompt tokens (``attention_mask ∧ ¬completion_mask``) of the first
    ``B`` rows become a right-padded prompt batch, the first half of every other tensor its image
    inputs, and the completion tokens of all rows ``[B, 2, R]`` responses (``-100`` padding).

    Args:
        inputs: TRL's collated batch (``input_ids``, ``attention_mask``, ``completion_mask``,
            image inputs, ...).
        skip: Keys that are not model inputs (``completion_mask``, precomputed references, λ).

    Returns:
        ``(prompt_batch, responses)``, or None when the two halves do not repeat the same
        prompts and images (then only the duplicated forward is right).
    """
    completion = inputs["completion_mask"].bool()
    rows = completion.shape[0] // 2
    if rows == 0 or completion.shape[0] != 2 * rows:
        return None
    prompt_mask = inputs["attention_mask"].bool() & ~completion
    front = torch.argsort((~prompt_mask).to(torch.int8), dim=1, stable=True)
    width = int(prompt_mask.sum(1).max())
    keep = prompt_mask.gather(1, front)[:, :width]
    prompt: dict[str, Any] = {}
    for key, value in inputs.items():
        if key in skip or key == "completion_mask":
            continue
        if key in PER_TOKEN_KEYS:
            value = value.gather(1, front)[:, :width] * keep.to(value.dtype)
        half = _first_half(value)
        if half is None:
            return None
        prompt[key] = half
    return prompt, _responses(inputs["input_ids"], completion, rows)


def _first_half(value: Any) -> Any:
    """The first half of a tensor whose second half (along dim 0) repeats it, else None;
    anything that is not a batched tensor as it is."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return value
    if value.shape[0] % 2:
        return None
    first, second = value.chunk(2)
    return first if torch.equal(first, second) else None


def _responses(ids: Tensor, completion: Tensor, rows: int) -> Tensor:
    """``[B, 2, R]`` completion tokens (chosen, rejected), right-padded with ``-100``."""
    front = torch.argsort((~completion).to(torch.int8), dim=1, stable=True)
    width = max(int(completion.sum(1).max()), 1)
    tokens = ids.gather(1, front)[:, :width]
    tokens = tokens.masked_fill(~completion.gather(1, front)[:, :width], IGNORE_INDEX)
    return torch.stack([tokens[:rows], tokens[rows:]], dim=1)


def _without(inputs: dict[str, Any], key: str) -> dict[str, Any]:
    """``inputs`` minus ``key`` (a shallow copy only when needed)."""
    return {k: v for k, v in inputs.items() if k != key} if key in inputs else inputs
