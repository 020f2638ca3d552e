"""The collaborative modality: item embeddings and user states from a sequential recommender.

A 135M language model reading titles does not learn which movies go together from the few
thousand examples a CPU affords; a classic sequential recommender learns exactly that from the
interaction log in a minute. LLaRA's "hybrid item representation" (Liao et al., SIGIR 2024)
and A-LLMRec (Kim et al., KDD 2024) hand its item embeddings to the LLM as extra tokens; this
module trains that recommender — the project's SASRec (:mod:`hanorec.baselines.sasrec`) — and
caches it beside the prepared data. :mod:`hanorec.item_tokens` projects its item embeddings
(and its sequence state, for the user token) into the language model's embedding space.

**No leakage.** The recommender trains on each user's *training sequence* only (every item
before the validation target, rebuilt by :mod:`hanorec.data.known`); validation and test
targets are never its inputs' targets, and model selection uses no validation row.

**Held-out tail** (``collab_holdout = T``). A SASRec state over a history it was trained on is
in-sample: it predicts that history's next item far better than it will a test user's. SFT
rows whose SASRec states are in-sample teach the language model to trust the user token more
than it should. With ``T > 0`` the recommender trains on each training sequence minus its last
``T`` items; the first of them is its selection target (full-catalogue NDCG@10 every
``sasrec_eval_every`` epochs, early stopping after ``sasrec_patience`` checks), and
:meth:`CollabFeatures.is_heldout` marks the training rows whose target is one of them (the
SFT stage can train on those only: their states are out-of-sample, like a test user's). With
``T = 0`` it trains on the whole training sequences for ``sasrec_epochs`` epochs.

The result is cached under ``<prepared>/collab/<key>/`` (``sasrec.safetensors`` +
``meta.json``, written to a temporary folder and renamed), where ``key`` hashes the prepared
data's fingerprint and this section's settings; a second stage with the same data and
settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hanorec.baselines.sasrec import SASRec, SASRecConfig, SASRecModel
from hanorec.data.known import known_sequences
from hanorec.data.prepared import read_manifest
from hanorec.metrics import history_mask, ndcg, target_ranks

FORMAT_VERSION = 1
CACHE_FOLDER = "collab"


@dataclass
class CollabConfig(SASRecConfig):
    """The ``collab:`` section: the recommender behind the collaborative item tokens and the
    ranking head (the ``sasrec_*`` fields are SASRec's, Kang & McAuley 2018)."""

    collab_holdout: int = field(default=5, metadata={
        "help": "Most recent N items of each user's training sequence that the recommender does "
                "not train on; SFT can train on exactly those targets, whose recommender states "
                "are then out-of-sample like a test user's (0: train on everything for "
                "sasrec_epochs epochs)."})
    collab_rows: str = field(default="heldout", metadata={
        "help": "SFT rows with collaborative tokens on: `heldout` = only the rows whose target "
                "is one of the held-out items (out-of-sample user states), `all` = every "
                "training row."})
    projector_hidden: int = field(default=0, metadata={
        "help": "Hidden width of the 2-layer MLP projectors that map recommender vectors to the "
                "LM width (LLaRA's hybrid item representation); 0: the LM width."})
    head_similarity: str = field(default="dot", metadata={
        "help": "Ranking head score between the answer-position state h and an item vector v: "
                "`dot` = <h, v>/sqrt(d), `cos` = cos(h, v)/head_tau (R2ec, arXiv 2505.16994)."})
    head_tau: float = field(default=0.05, metadata={
        "help": "Temperature of the `cos` head similarity (R2ec uses 0.02)."})

    def __post_init__(self) -> None:
        if self.collab_holdout < 0:
            raise ValueError(f"collab.collab_holdout must be >= 0, got {self.collab_holdout}")
        if self.collab_rows not in ("heldout", "all"):
            raise ValueError("collab.collab_rows must be 'heldout' or 'all', got "
                             f"{self.collab_rows!r}")
        if self.head_similarity not in ("dot", "cos"):
            raise ValueError("collab.head_similarity must be 'dot' or 'cos', got "
                             f"{self.head_similarity!r}")
        if self.head_tau <= 0:
            raise ValueError(f"collab.head_tau must be positive, got {self.head_tau}")

    def sasrec(self) -> SASRecConfig:
        """The SASRec part of the section."""
        names = SASRecConfig.__dataclass_fields__
        return SASRecConfig(**{name: getattr(self, name) for name in names})


@dataclass
class CollabFeatures:
    """A trained recommender's item table and network, and which training rows it held out.

    Attributes:
        item_embeddings: ``[N, d]`` SASRec item embeddings, row ``i`` = catalogue item ``i``.
        model: The frozen SASRec network (eval mode) for user states.
        sequences: ``{user_id: training sequence}`` (item indices, oldest first).
        holdout: ``T``, the held-out tail length.
        meta: What was trained: settings, epochs, selection score, seconds, cache key.
    """

    item_embeddings: torch.Tensor
    model: SASRecModel
    sequences: dict[str, list[int]]
    holdout: int
    meta: dict[str, Any] = field(default_factory=dict)

    def is_heldout(self, row: Mapping[str, Any], index: Mapping[str, int]) -> bool:
        """True when ``row``'s target is one of its user's last ``T`` training items.

        The row is located in the user's training sequence ``S`` by its target and history:
        position ``p`` with ``S[p] = target`` and ``S[p − len(history):p] = history``.
        """
        sequence = self.sequences.get(str(row["user_id"]))
        if not sequence or self.holdout == 0:
            return False
        target = index[row["target"]]
        history = [index[item] for item in row["history"]]
        for p in range(max(0, len(sequence) - self.holdout), len(sequence)):
            if sequence[p] == target and sequence[max(0, p - len(history)) : p] == history:
                return True
        return False


def cache_key(prepared: Path, cfg: CollabConfig) -> str:
    """Hash of the prepared data's fingerprint and the recommender's settings."""
    manifest = read_manifest(prepared)
    settings = {**asdict(cfg.sasrec()), "collab_holdout": cfg.collab_holdout,
                "version": FORMAT_VERSION}
    blob = json.dumps({"data": manifest.get("fingerprint"), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _selection(model: SASRec, inputs: list[list[int]], targets: list[int]) -> float:
    """Full-catalogue NDCG@10 of each target given its input sequence (known items masked)."""
    scores = model.score(inputs)
    ranks = target_ranks(scores, targets, mask=history_mask(inputs, scores.shape[1], keep=targets))
    return float(ndcg(ranks, 10).mean())


def train_recommender(sequences: Sequence[Sequence[int]], num_items: int, cfg: CollabConfig,
                      *, log: Any = None) -> tuple[SASRec, dict[str, Any]]:
    """SASRec on each sequence minus its last ``collab_holdout`` items (module docstring)."""
    holdout = cfg.collab_holdout
    heads = [list(s[: len(s) - holdout]) for s in sequences]
    start = time.perf_counter()
    recommender = SASRec(cfg.sasrec())
    validate = None
    if holdout > 0:
        chosen = [n for n,
                  s in enumerate(sequences) if len(heads[n]) >= 1 and len(s) > len(heads[n])]
        inputs = [heads[n] for n in chosen]
        targets = [int(sequences[n][len(heads[n])]) for n in chosen]
        validate = lambda model: _selection(model, inputs, targets)  # noqa: E731
    recommender.fit(heads, num_items, validate=validate, log=log)
    scores = [r["eval/score"] for r in recommender.history if "eval/score" in r]
    meta = {"epochs": len(recommender.history), "selection_ndcg10": max(scores) if scores else None,
            "seconds": round(time.perf_counter() - start, 1), "users": len(heads),
            "train_items": int(sum(len(h) for h in heads))}
    return recommender, meta


def _save(folder: Path, recommender: SASRec, meta: dict[str, Any]) -> None:
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in recommender.model.state_dict().items()}
    save_file(state, str(tmp / "sasrec.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


def _load_model(folder: Path, meta: dict[str, Any]) -> SASRecModel:
    config = SASRecConfig(**meta["sasrec"])
    model = SASRecModel(int(meta["num_items"]), config)
    model.load_state_dict(load_file(str(folder / "sasrec.safetensors")))
    return model.eval().requires_grad_(False)


def collab_features(prepared: str | Path, num_items: int, cfg: CollabConfig, *,
                    log: Any = print) -> CollabFeatures:
    """Load the cached recommender for ``prepared`` and ``cfg``, training it first if needed.

    Args:
        prepared: The prepared data folder (``manifest.json``, protocol folders).
        num_items: Catalogue size (rows of ``items/``).
        cfg: The ``collab:`` section.
        log: Line logger (None: quiet).

    Returns:
        The features, with the training sequences used for :meth:`CollabFeatures.is_heldout`.
    """
    prepared = Path(prepared)
    sequences, _ = known_sequences(prepared, "validation")
    folder = prepared / CACHE_FOLDER / cache_key(prepared, cfg)
    if not (folder / "meta.json").is_file():
        if log:
            log(f"training the collaborative recommender (SASRec, holdout {cfg.collab_holdout}) "
                f"into {folder}")
        recommender, meta = train_recommender(list(sequences.values()), num_items, cfg, log=log)
        meta.update(num_items=num_items, sasrec=asdict(cfg.sasrec()),
                    collab_holdout=cfg.collab_holdout,
                    key=folder.name)
        _save(folder, recommender, meta)
    meta = json.loads((folder / "meta.json").read_text())
    if int(meta["num_items"]) != num_items:
        raise ValueError(f"{folder}: recommender has {meta['num_items']} items, the catalogue "
                         f"{num_items}")
    model = _load_model(folder, meta)
    table = model.item_emb.weight[1:].detach().clone()
    return CollabFeatures(table, model, sequences, int(meta["collab_holdout"]), meta)


def user_states(model: SASRecModel, sequences: Sequence[Sequence[int]],
                max_len: int) -> torch.Tensor:
    """``[B, d]`` SASRec states (last position) of 0-based item sequences (no gradient)."""
    from hanorec.baselines.sasrec import _left_pad

    device = model.item_emb.weight.device
    with torch.no_grad():
        return model(_left_pad(sequences, max_len).to(device))[:, -1, :]


__all__ = ["CollabConfig", "CollabFeatures", "cache_key", "collab_features", "train_recommender",
           "user_states"]
