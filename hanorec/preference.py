"""Preference pairs on the model side: the ``dpo:`` section, the pair data and the reference.

Shared by the preference stage (``hanorec.dpo``) and BPO's blind answers (``hanorec.bpo``,
which reads the same pairs with the same section):

* :class:`DPOConfig` — the ``dpo:`` recipe section (the loss choices and their help come from
  the loss registry, :data:`hanorec.losses.LOSSES`; the HaRS modes from
  :data:`hanorec.losses.HARDNESS_MODES`);
* :func:`load_preference_data` — the folder holding ``pairs/<protocol>`` and its catalogue;
  :func:`hard_negative_data` — the pairs prepared again with HaRS's nearest items as negatives;
  :func:`training_pairs` — the train and validation pairs, blind negatives mixed in;
* :func:`encode_pairs`, :func:`responses_per_row` — rows to a :class:`~hanorec.collate.ChoiceBatch`;
* :func:`reference_context`, :func:`precompute_reference` — the reference: the policy with its
  adapter disabled (HaNoRec, arXiv 2511.18740, Sec. 5), live or computed once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from hanorec.collate import ChoiceBatch, PromptCollator
from hanorec.data.blind import mix_blind_negatives
from hanorec.data.catalog import Catalog
from hanorec.data.config import MODEL_NEGATIVES
from hanorec.data.prepare import prepare
from hanorec.forward import MODES
from hanorec.hardness import HARDNESS_EMBEDDINGS
from hanorec.item_tokens import attached_encoder
from hanorec.losses import HARDNESS_MODES, LOSS_TYPES, NOISE_SCALES, loss_help
from hanorec.readout import answer_logps
from hanorec.runtime import load_catalog, load_rows, prepare_data, subsample
from hanorec.training import TrainConfig


@dataclass
class DPOConfig(TrainConfig):
    """The ``dpo:`` section: optimisation (see TrainConfig) plus the preference method."""

    dpo_protocols: list[str] = field(default_factory=lambda: ["candidates"], metadata={
        "help": "Protocols whose preference pairs train the policy (pairs/<protocol> of the "
                "data stage)."})
    sft_checkpoint: str | None = field(default=None, metadata={
        "help": "SFT adapter folder to start from (default <run_dir>/sft/final). It is merged "
                "into the base and a fresh adapter is trained on top (HaNoRec Sec. 5)."})
    loss: Literal[LOSS_TYPES] = field(default="sigmoid", metadata={  # type: ignore[valid-type]
        "help": loss_help() + "."})
    beta: float = field(default=0.1, metadata={
        "help": "β0, the DPO temperature; HaRS scales it per sample (HaNoRec eq. 11)."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "ε of cDPO / robust DPO: the assumed probability that a preference label is "
                "flipped."})
    simpo_gamma: float = field(default=0.5, metadata={
        "help": "SimPO target reward margin γ (Meng et al. 2024, eq. 6)."})
    hardness: Literal[HARDNESS_MODES] = field(default="none", metadata={  # type: ignore[valid-type]
        "help": "HaRS (HaNoRec Sec. 4.1): none → β0; static → β0·λ_i (eq. 6); dynamic → "
                "β0·η·λ_i with the live responsiveness η (eq. 8, 11)."})
    top_k: int = field(default=10, metadata={
        "help": "K of the top-K cosine neighbourhood s(v) in HaRS's pair distance Δ (HaNoRec "
                "eq. 5)."})
    hardness_embedding: Literal[HARDNESS_EMBEDDINGS] = field(  # type: ignore[valid-type]
        default="backbone", metadata={
            "help": "Item embeddings whose top-K cosine neighbourhoods s(v) give HaRS's pair "
                    "distance Δ (HaNoRec eq. 5) and static hardness λ (eq. 6). backbone: the "
                    "SFT model's mean title-token input embedding fused with its mean vision "
                    "features (HaNoRec Sec. 4.1, the authors' code); head: the SFT model's "
                    "ranking-head item vectors, the space the policy ranks in (prompt.answer: "
                    "head only); collab: the collaborative recommender's item embeddings (view "
                    "0, the full model; needs item tokens). HaRS λ only: negative_sampling: "
                    "hard keeps the backbone embeddings."})
    hardness_temperature: float = field(default=1.0, metadata={
        "help": "τ dividing the top-K neighbour cosines before the softmax of HaRS's Δ "
                "(HaNoRec eq. 5: Δ = ‖softmax(s(pos)/τ) − softmax(s(neg)/τ)‖₂). 1 is the "
                "paper; cosines in [−1, 1] then give near-uniform profiles and λ ≈ 1 for every "
                "pair; a smaller τ (0.1, 0.02) sharpens them so λ can spread, until as τ → 0 "
                "every profile turns one-hot and λ returns to 1 (docs/methods.md has the "
                "bound and the spread measured on ML-100K)."})
    noise: Literal["none", "logits", "lora"] = field(default="none", metadata={
        "help": "NoDO (HaNoRec Sec. 4.2): Gaussian noise on the policy's logits at response "
                "positions (the paper's wording) or on every active LoRA A/B matrix (the "
                "authors' code); training policy forward only."})
    noise_std: float = field(default=0.1, metadata={
        "help": "σ of the NoDO noise (HaNoRec: 0.1; 0.05 on sparse catalogues)."})
    noise_scale: Literal[NOISE_SCALES] = field(  # type: ignore[valid-type]
        default="absolute", metadata={
            "help": "Scale of the NoDO logit noise (HaNoRec eq. 9, noise: logits). absolute: "
                    "ε ~ N(0, σ²) (the paper); relative: ε ~ N(0, (σ·s)²) with s the spread "
                    "(standard deviation, detached, per batch) of each row's scores over its "
                    "choices — the head scores over the row's allowed items, or the logits "
                    "over the vocabulary at each response position — so σ is a fraction of "
                    "the score scale. noise: lora has no scores to scale (absolute only)."})
    reference: Literal["frozen", "precomputed", "none"] = field(default="frozen", metadata={
        "help": "frozen: a live reference forward with the DPO adapter disabled; precomputed: "
                "one pass before training stores reference log-probs; none: reference-free."})
    sft_weight: float = field(default=0.0, metadata={
        "help": "Weight of an NLL term on the chosen response added to the loss (RPO, Pang et "
                "al. 2024)."})
    negative_pool: int = field(default=20, metadata={
        "help": "Model-drawn negatives (data negative_sampling policy, collab, or hard with the "
                "head): each row's K rejected items are drawn uniformly from the model's top "
                "this-many wrong items (RoDPO's dynamic top-k pool; = K: the top K "
                "themselves)."})
    negative_scope: Literal["candidates", "catalogue"] = field(default="candidates", metadata={
        "help": "Where model-drawn negatives come from: the row's own candidate list, or the "
                "whole catalogue outside the user's sequence (the row then chooses among the "
                "catalogue: items SFT never contrasted)."})
    negative_refresh: int = field(default=0, metadata={
        "help": "Redraw the policy's negatives from the current policy every N steps (on-policy "
                "self-play, SPRec; 0: once, from the starting model). Not with --reference "
                "precomputed."})
    rank_examples: int = field(default=0, metadata={
        "help": "Validation `candidates` rows (users) of the periodic HR@1 check (0: those "
                "among the eval_examples validation pairs; -1: all)."})
    forward_mode: Literal[MODES] = field(default="auto", metadata={  # type: ignore[valid-type]
        "help": "Shared-prompt forward: kv (KV-cache expansion), packed (block mask, for "
                "gradient checkpointing), duplicate (the prompt once per response, as TRL "
                "does), auto."})
    max_train_pairs: int = field(default=0, metadata={
        "help": "Use a seeded subset of this many training pairs (0: all)."})
    blind_negatives: str | None = field(default=None, metadata={
        "help": "BPO (MMSafe-PO, arXiv 2503.14189): blind answers written by `python -m "
                "hanorec.bpo generate`; a row's blind item replaces its last sampled negative."})
    blind_ratio: float = field(default=1.0, metadata={
        "help": "Fraction of the training rows with a usable blind negative that get it "
                "(seeded)."})
    preference_data: str | None = field(default=None, metadata={
        "help": "Folder with pairs/<protocol> (+ items/, manifest.json) to train on instead of "
                "the prepared data, e.g. MMSafe-PO converted by `python -m hanorec.data.mmsafe "
                "convert` (protocol general)."})

    def _train_checks(self) -> list[tuple[str, bool, str]]:
        """The optimisation checks plus the HaRS/NoDO fields'."""
        tau = self.hardness_temperature
        return super()._train_checks() + [
            ("hardness_temperature", math.isfinite(tau) and tau > 0,
             f"must be a finite number > 0, got {tau}"),
            ("noise_std", math.isfinite(self.noise_std) and self.noise_std >= 0,
             f"must be finite and >= 0, got {self.noise_std}"),
            ("noise_scale", not (self.noise == "lora" and self.noise_scale == "relative"),
             "relative scales the logit noise (noise: logits); noise: lora perturbs the LoRA "
             "matrices, which have no scores to scale"),
            ("negative_pool", self.negative_pool >= 1, f"must be >= 1, got {self.negative_pool}"),
            ("negative_refresh", self.negative_refresh >= 0,
             f"must be >= 0, got {self.negative_refresh}"),
            ("negative_refresh", not (self.negative_refresh and self.reference == "precomputed"),
             "redrawn negatives need a live reference (reference frozen or none): a precomputed "
             "one scored the old negatives"),
            ("rank_examples", self.rank_examples >= -1,
             f"must be -1 (all), 0 or a count, got {self.rank_examples}"),
            ("reference", self.loss != "sft" or self.reference == "none",
             "loss sft (continued SFT, the control) uses no reference: set reference none"),
        ]


# --------------------------------------------------------------------------- the pairs


def load_preference_data(run: Any, accelerator: Accelerator) -> tuple[Path, Catalog]:
    """The folder holding ``pairs/<protocol>`` and its catalogue.

    ``run.dpo.preference_data`` when set (e.g. converted MMSafe-PO data), else the prepared
    recommendation data of ``run.data`` (prepared on the main process first).

    Raises:
        ValueError: A ``preference_data`` folder without ``items/``.
    """
    if run.dpo.preference_data:
        folder = Path(run.dpo.preference_data)
        if not (folder / "items").is_dir():
            raise ValueError(f"--preference-data {folder}: no items/ folder (convert the data "
                             "with `python -m hanorec.data.mmsafe convert`)")
        return folder, Catalog.from_prepared(folder)
    prepared = prepare_data(run.data, accelerator)
    return prepared, load_catalog(run.data, prepared)


def hard_negative_data(run: Any, accelerator: Accelerator, out_dir: Path,
                       embeddings: torch.Tensor) -> Path:
    """The pairs prepared again (``<out_dir>/prepared-hard``) with the nearest items by the
    HaRS item embeddings as the rejected ones (``negative_sampling: hard``)."""
    hard_cfg = replace(run.data, output_dir=str(out_dir / "prepared-hard"))
    if accelerator.is_main_process:
        prepare(hard_cfg, item_embeddings=embeddings.numpy())
    accelerator.wait_for_everyone()
    return hard_cfg.path(hard_cfg.output_dir)


def model_negatives(run: Any) -> str | None:
    """The ``negative_sampling`` strategy a model draws in this stage (:mod:`hanorec.negatives`):
    ``policy``, ``collab``, or ``hard`` with the ranking head (nearest in its item-vector
    space); None when the prepared pairs' negatives are used as they are."""
    strategy = run.data.negative_sampling
    if run.dpo.preference_data:
        return None
    if strategy in MODEL_NEGATIVES or (strategy == "hard" and run.prompt.answer == "head"):
        return strategy
    return None


def training_pairs(run: Any, prepared: Path,
                   keep: Callable[[list[dict]], list[dict]] | None = None
                   ) -> tuple[list[dict], list[dict], dict | None]:
    """Train and validation pairs of ``dpo.dpo_protocols`` (seeded subsets), and the counts of
    the blind negatives mixed into the train pairs (None without ``dpo.blind_negatives``).

    ``keep`` selects the usable train pairs (:func:`training_views`: those with out-of-sample
    collaborative features) *before* the seeded subset of ``max_train_pairs`` is drawn, as SFT
    selects its rows: drawn the other way round, ``collab_fit: tail`` kept ~5 % of the subset
    (93 of 1,920 pairs) and the stage cycled over them. Validation pairs stay as prepared.
    """
    cfg = run.dpo
    train = load_rows(prepared, cfg.dpo_protocols, "train", pairs=True)
    train = subsample(keep(train) if keep is not None else train, cfg.max_train_pairs, run.seed)
    val = load_rows(prepared, cfg.dpo_protocols, "validation", pairs=True,
                    limit=cfg.eval_examples, seed=run.seed)
    if not cfg.blind_negatives:
        return train, val, None
    train, counts = mix_blind_negatives(train, cfg.blind_negatives, ratio=cfg.blind_ratio,
                                        seed=run.seed)
    return train, val, counts


def training_views(model: nn.Module, rows: list[dict], prepared: Path,
                   catalog: Catalog) -> list[dict]:
    """The training pairs whose collaborative features are out of sample, tagged with the
    recommender view each reads, as SFT chose its rows (:class:`hanorec.collab.RowViews`, rebuilt
    from the policy's item encoder spec); every row unchanged without item tokens. Validation
    rows keep view 0, as in SFT."""
    encoder = attached_encoder(model)
    if encoder is None or not encoder.spec.collab_dim or encoder.spec.fit == "insample":
        return rows
    from hanorec.collab import row_views_for

    spec = encoder.spec
    views = row_views_for(prepared, spec.fit, spec.folds, spec.fold_seed, spec.holdout)
    kept = views.training_rows(rows, catalog.index)
    if not kept:
        raise ValueError(f"collab_fit {spec.fit}: no training pair has out-of-sample features")
    return kept


def responses_per_row(rows: list[dict]) -> int:
    """``K + 1``: the chosen and the K rejected responses every row must have.

    Raises:
        ValueError: Rows with different K.
    """
    counts = {len(r["rejected"]) for r in rows}
    if len(counts) != 1:
        raise ValueError(f"pairs must all have the same number of rejected responses, got "
                         f"{sorted(counts)}")
    return counts.pop() + 1


def encode_pairs(collators: dict[str, PromptCollator], rows: list[dict]) -> ChoiceBatch:
    """The rows' prompts and chosen/rejected answers; rows carry their protocol."""
    return collators[rows[0]["protocol"]].encode_choices(rows)


# --------------------------------------------------------------------------- the reference


def reference_context(model: nn.Module) -> Callable[[], AbstractContextManager[nn.Module]]:
    """A context manager factory yielding the reference: the policy with its adapter disabled."""

    @contextmanager
    def ctx() -> Iterator[nn.Module]:
        with model.disable_adapter():
            yield model

    return ctx


@torch.no_grad()
def precompute_reference(model: nn.Module, collators: dict[str, PromptCollator], rows: list[dict],
                         batch_size: int, accelerator: Accelerator, mode: str) -> torch.Tensor:
    """Reference log-probs ``[N, K+1]`` of every pair (adapter disabled), computed once.

    Each process scores every ``num_processes``-th row; the sum over processes is the table.
    """
    unwrapped = accelerator.unwrap_model(model)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    local = torch.zeros(len(rows), responses_per_row(rows))
    starts = range(0, len(mine), batch_size)
    for start in tqdm(starts, desc="reference log-probs", disable=not accelerator.is_main_process):
        ids = mine[start : start + batch_size]
        batch = encode_pairs(collators, [rows[i] for i in ids]).to(accelerator.device)
        with unwrapped.disable_adapter():
            local[ids] = answer_logps(unwrapped, batch, mode=mode).float().cpu()
    return accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
