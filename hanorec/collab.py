"""The collaborative modality: item embeddings and user states from a sequential recommender.

A 135M language model reading titles does not learn which movies go together from the few
thousand examples a CPU affords; a classic sequential recommender learns exactly that from the
interaction log in a minute. LLaRA's "hybrid item representation" (Liao et al., SIGIR 2024)
and A-LLMRec (Kim et al., KDD 2024) hand its item embeddings to the LLM as extra tokens; this
module trains that recommender — the project's SASRec (:mod:`hanorec.baselines.sasrec`) — and
caches it beside the prepared data. :mod:`hanorec.item_tokens` projects its item embeddings
(and its sequence state, for the user token) into the language model's embedding space.

**Out-of-sample features for every training row** (``collab_fit``). The language model is
*stacked* on the recommender, so the features of a training row must be what the recommender
would give a user it is tested on, not a memory of that row: a SASRec state over a history it
was trained to continue predicts that history's next item far better than it will a test
user's, and rows with such in-sample states teach the LLM to trust the user token more than it
should. Three ways (each recommender is one *view*, the virtual token ids of a row name its
view, :mod:`hanorec.item_tokens`):

* ``crossfit`` (stacking's standard answer, group K-fold by user). Users are
  split into ``collab_folds`` = K folds by a seeded hash of their id
  (:mod:`hanorec.data.folds`). Fold model ``k`` (view ``k + 1``) trains on the training
  sequences of every user *outside* fold ``k``; the training rows of a user in fold ``k`` take
  their item and user vectors from it, so no row's features come from a model that saw any
  interaction of that user — its target included, and no later item of that user either (a
  model trained on a user's future items would know where the history leads). The full model
  (view 0) trains on every training sequence and serves validation and test rows, as the
  SASRec baseline would. Every row of the train split can then be an SFT example (~97,000 on
  ML-100K instead of ~4,700), at the cost of K + 1 recommender trainings (run
  ``collab_workers`` at a time in worker processes).
* ``rolling`` (forward-chaining cross-validation, stacked tails). Model ``j`` = 1..K (view
  ``j``) trains on each training sequence minus its last ``j·T`` items (``T`` =
  ``collab_holdout``); a training row whose target lies in the block
  ``[len − j·T, len − (j−1)·T)`` of its user's sequence reads model ``j``, which trained on
  the history before the block, never on the target or anything after it — the situation of a
  test row (history trained, target and future not), for the last ``K·T`` rows of each user.
  The full model (view 0) serves validation and test rows.
* ``tail`` (the default): one model on each training sequence minus its last
  ``collab_holdout`` = T items; :meth:`CollabFeatures.training_rows` keeps the training rows
  whose target is one of them (out of sample on the target, in sample on the history, exactly
  like a test row — but only T rows per user). Measured on ML-100K's learning curve it beats
  ``crossfit`` (validation HR@1 0.536 against 0.486 after 8,000–9,600 examples): a fold model
  has never seen its held-out users at all, so their user states are much weaker than those a
  test user gets from the full model, and an hour of CPU sees fewer examples than ``tail``
  offers anyway.
* ``insample``: one model on everything, every row, in-sample features (the leaky ablation).

**Model selection.** A model trained on users' whole training sequences (the full model,
``insample``) is selected like the SASRec baseline, by full-catalogue NDCG@10 of the
validation targets every ``sasrec_eval_every`` epochs (early stopping after
``sasrec_patience`` checks); a fold model by the same score over the validation targets of
its held-out users (the users whose features it gives); the ``tail`` model by the first held-out
item of each sequence. No model trains on a validation or test target.

The result is cached under ``<prepared>/collab/<key>/`` (one ``sasrec-<view>.safetensors`` per
view + ``meta.json``, written to a temporary folder and renamed), where ``key`` hashes the
prepared data's fingerprint and this section's settings; a second stage with the same data and
settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hanorec.baselines.sasrec import SASRec, SASRecConfig, SASRecModel
from hanorec.data.folds import fold_view, tag_views, user_fold
from hanorec.data.known import known_sequences
from hanorec.data.prepared import read_manifest
from hanorec.data.prompts import VIEW_FIELD
from hanorec.metrics import history_mask, ndcg, target_ranks

FORMAT_VERSION = 2
CACHE_FOLDER = "collab"
FIT_MODES = ("crossfit", "rolling", "tail", "insample")


@dataclass
class CollabConfig(SASRecConfig):
    """The ``collab:`` section: the recommender behind the collaborative item tokens and the
    ranking head (the ``sasrec_*`` fields are SASRec's, Kang & McAuley 2018)."""

    collab_fit: str = field(default="tail", metadata={
        "help": "How training rows get out-of-sample recommender features: `crossfit` = K "
                "models, each trained without one fold of users, give those users' rows their "
                "features (stacking's group K-fold; every training row usable), `rolling` = K "
                "models without each user's last T, 2T, ..., KT items give the rows of each "
                "block theirs (forward chaining; the last K*T rows per user), `tail` = one "
                "model without each user's last collab_holdout training items, SFT on those "
                "rows only (the default: it measured best on the learning curve), `insample` = "
                "one model on everything (leaky ablation)."})
    collab_folds: int = field(default=5, metadata={
        "help": "K: the user folds of `crossfit`, the blocks of `rolling` (K + 1 recommender "
                "trainings)."})
    collab_fold_seed: int = field(default=0, metadata={
        "help": "Seed of the hash that assigns users to folds."})
    collab_holdout: int = field(default=5, metadata={
        "help": "T: `tail`: the most recent T items of each user's training sequence that the "
                "recommender does not train on (SFT trains on exactly those targets); "
                "`rolling`: the block length."})
    collab_workers: int = field(default=2, metadata={
        "help": "Worker processes training the recommenders of `crossfit` side by side (one "
                "torch thread each; 1: in this process, one after the other)."})
    projector_hidden: int = field(default=0, metadata={
        "help": "Hidden width of the 2-layer MLP projectors that map recommender vectors to the "
                "LM width (LLaRA's hybrid item representation); 0: the LM width."})
    head_prior: bool = field(default=False, metadata={
        "help": "The ranking head adds the recommender's own score of each item, w*<u, c_v> (u "
                "its state at the user token, c_v the item's embedding, w learned from 1): the "
                "language model learns a correction of SASRec rather than reproducing it "
                "(residual stacking). Needs the user token."})
    head_similarity: str = field(default="dot", metadata={
        "help": "Ranking head score between the answer-position state h and an item vector v: "
                "`dot` = <h, v>/sqrt(d), `cos` = cos(h, v)/head_tau (R2ec, arXiv 2505.16994)."})
    head_tau: float = field(default=0.05, metadata={
        "help": "Temperature of the `cos` head similarity (R2ec uses 0.02)."})

    def __post_init__(self) -> None:
        if self.collab_fit not in FIT_MODES:
            raise ValueError(f"collab.collab_fit must be one of {FIT_MODES}, got "
                             f"{self.collab_fit!r}")
        if self.collab_folds < 2:
            raise ValueError(f"collab.collab_folds must be >= 2, got {self.collab_folds}")
        if self.collab_holdout < 0 or (self.collab_fit in ("tail", "rolling")
                                       and self.collab_holdout == 0):
            raise ValueError("collab.collab_holdout must be >= 0 (and >= 1 with collab_fit: "
                             f"tail or rolling), got {self.collab_holdout}")
        if self.collab_workers < 1:
            raise ValueError(f"collab.collab_workers must be >= 1, got {self.collab_workers}")
        if self.head_similarity not in ("dot", "cos"):
            raise ValueError("collab.head_similarity must be 'dot' or 'cos', got "
                             f"{self.head_similarity!r}")
        if self.head_tau <= 0:
            raise ValueError(f"collab.head_tau must be positive, got {self.head_tau}")

    def sasrec(self) -> SASRecConfig:
        """The SASRec part of the section."""
        names = SASRecConfig.__dataclass_fields__
        return SASRecConfig(**{name: getattr(self, name) for name in names})

    @property
    def views(self) -> int:
        """Recommenders (views) the features hold: K + 1 for ``crossfit`` and ``rolling``."""
        return self.collab_folds + 1 if self.collab_fit in ("crossfit", "rolling") else 1


@dataclass
class RowViews:
    """Which training rows have out-of-sample features, and the view (recommender) each reads.

    Everything a stage needs to tag its training rows, without the recommenders themselves: an
    SFT stage gets it from :class:`CollabFeatures`, a later stage from the item encoder's spec
    and the prepared data (:func:`row_views_for`).

    Attributes:
        fit: ``crossfit``, ``rolling``, ``tail`` or ``insample``.
        folds: K (``crossfit`` folds, ``rolling`` blocks).
        fold_seed: Seed of :func:`hanorec.data.folds.user_fold`.
        holdout: T (``tail``, ``rolling``).
        sequences: ``{user_id: training sequence}`` (item indices, oldest first).
    """

    fit: str
    folds: int
    fold_seed: int
    holdout: int
    sequences: dict[str, list[int]]

    def view_of(self, user_id: str) -> int:
        """``crossfit``: the view a training row of ``user_id`` reads (0 otherwise)."""
        return fold_view(str(user_id), self.folds, self.fold_seed) if self.fit == "crossfit" else 0

    def block_of(self, user_id: str, position: int) -> int:
        """``rolling``: the block ``j`` (1 = the newest T items) of a target at ``position`` of
        the user's training sequence (0 when it lies before the K blocks)."""
        distance = len(self.sequences.get(str(user_id), [])) - position  # 1 = the last item
        block = -(-distance // self.holdout) if distance > 0 else 0
        return block if 1 <= block <= self.folds else 0

    def is_heldout(self, row: Mapping[str, Any], index: Mapping[str, int]) -> bool:
        """``tail``: True when ``row``'s target is one of its user's last ``T`` training items
        (located by target and history, :func:`target_positions`)."""
        position = target_positions([row], self.sequences, index)[0]
        sequence = self.sequences.get(str(row["user_id"]), [])
        return (position is not None and self.holdout > 0
                and position >= len(sequence) - self.holdout)

    def training_rows(self, rows: Sequence[dict[str, Any]],
                      index: Mapping[str, int]) -> list[dict[str, Any]]:
        """The training rows whose features are out of sample, each tagged with its view.

        ``crossfit``: every row, ``collab_view`` = its user's fold model; ``rolling``: the rows
        of the last K blocks of T items, ``collab_view`` = their block's model; ``tail``: the
        rows whose target the model held out (view 0); ``insample``: every row (view 0).
        """
        if self.fit == "tail":
            return [r for r in rows if self.is_heldout(r, index)]
        if self.fit == "crossfit":
            return tag_views(rows, self.folds, self.fold_seed)
        if self.fit == "rolling":
            positions = target_positions(rows, self.sequences, index)
            blocks = [self.block_of(r["user_id"], p) if p is not None else 0
                      for r, p in zip(rows, positions)]
            return [{**r, VIEW_FIELD: b} for r, b in zip(rows, blocks) if b]
        return list(rows)


@dataclass
class CollabFeatures:
    """Trained recommenders (one per view) and how training rows map onto them.

    Attributes:
        item_embeddings: ``[V, N, d]`` SASRec item embeddings per view; row ``i`` of a view is
            catalogue item ``i``. View 0 is the full model (validation and test rows).
        models: The frozen SASRec networks (eval mode), one per view, for user states.
        rows: Which training rows read which view (:class:`RowViews`).
        meta: What was trained: settings, epochs, selection scores, seconds, cache key.
    """

    item_embeddings: torch.Tensor
    models: list[SASRecModel]
    rows: RowViews
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def views(self) -> int:
        return len(self.models)

    @property
    def sequences(self) -> dict[str, list[int]]:
        return self.rows.sequences

    def training_rows(self, rows: Sequence[dict[str, Any]],
                      index: Mapping[str, int]) -> list[dict[str, Any]]:
        """:meth:`RowViews.training_rows`."""
        return self.rows.training_rows(rows, index)


def row_views_for(prepared: str | Path, fit: str, folds: int, fold_seed: int,
                  holdout: int) -> RowViews:
    """The :class:`RowViews` of a recommender set made on ``prepared`` with these settings (an
    item encoder's spec carries them)."""
    sequences, _ = known_sequences(Path(prepared), "validation")
    return RowViews(fit, folds, fold_seed, holdout, sequences)


def target_positions(rows: Sequence[Mapping[str, Any]], sequences: Mapping[str, list[int]],
                     index: Mapping[str, int]) -> list[int | None]:
    """Where each row's target sits in its user's training sequence ``S``: the first ``p`` with
    ``S[p] = target`` and ``S[p − len(history):p] = history`` (None when nowhere)."""
    where: dict[str, dict[int, list[int]]] = {}
    out: list[int | None] = []
    for row in rows:
        user = str(row["user_id"])
        sequence = sequences.get(user, [])
        if user not in where:
            where[user] = {}
            for p, item in enumerate(sequence):
                where[user].setdefault(item, []).append(p)
        target = index[row["target"]]
        history = [index[item] for item in row["history"]]
        out.append(next((p for p in where[user].get(target, [])
                         if sequence[max(0, p - len(history)):p] == history), None))
    return out


def cache_key(prepared: Path, cfg: CollabConfig) -> str:
    """Hash of the prepared data's fingerprint and the recommender's settings."""
    manifest = read_manifest(prepared)
    settings = {**asdict(cfg.sasrec()), "fit": cfg.collab_fit, "version": FORMAT_VERSION}
    settings.pop("sasrec_num_threads")  # how fast, not what
    if cfg.collab_fit == "crossfit":
        settings.update(folds=cfg.collab_folds, fold_seed=cfg.collab_fold_seed)
    if cfg.collab_fit == "rolling":
        settings.update(folds=cfg.collab_folds, holdout=cfg.collab_holdout)
    if cfg.collab_fit == "tail":
        settings.update(holdout=cfg.collab_holdout)
    blob = json.dumps({"data": manifest.get("fingerprint"), "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- training


@dataclass
class ViewPlan:
    """What one view's recommender trains on and how it is selected (picklable).

    Attributes:
        name: ``full``, ``fold-<k>``, ``tail`` or ``insample``.
        train: Training sequences (0-based item indices).
        select_inputs: Input sequences of the selection targets (empty: no selection).
        select_targets: Their targets (full-catalogue NDCG@10 picks the epoch).
        users: The users whose sequences it trained on (the fold-leak check reads them).
    """

    name: str
    train: list[list[int]]
    select_inputs: list[list[int]]
    select_targets: list[int]
    users: list[str]


def _selection(model: SASRec, inputs: list[list[int]], targets: list[int]) -> float:
    """Full-catalogue NDCG@10 of each target given its input sequence (known items masked)."""
    scores = model.score(inputs)
    ranks = target_ranks(scores, targets, mask=history_mask(inputs, scores.shape[1], keep=targets))
    return float(ndcg(ranks, 10).mean())


def view_plans(sequences: Mapping[str, list[int]], validation: Mapping[str, int],
               cfg: CollabConfig) -> list[ViewPlan]:
    """The recommenders ``cfg.collab_fit`` trains, view 0 first (module docstring).

    Args:
        sequences: ``{user_id: training sequence}``.
        validation: ``{user_id: validation target}`` (selection of full and fold models).
        cfg: The ``collab:`` section.
    """
    users = list(sequences)

    def validated(name: str, chosen: list[str]) -> ViewPlan:
        keep = [u for u in chosen if u in validation and sequences[u]]
        return ViewPlan(name, [sequences[u] for u in chosen],
                        [sequences[u] for u in keep], [validation[u] for u in keep], chosen)

    if cfg.collab_fit == "insample":
        return [validated("insample", users)]
    def without_tail(name: str, holdout: int) -> ViewPlan:
        """Each sequence minus its last ``holdout`` items, selected on the first held out."""
        heads = {u: s[: max(0, len(s) - holdout)] for u, s in sequences.items()}
        chosen = [u for u in users if heads[u] and len(sequences[u]) > len(heads[u])]
        return ViewPlan(name, [heads[u] for u in users], [heads[u] for u in chosen],
                        [sequences[u][len(heads[u])] for u in chosen], users)

    if cfg.collab_fit == "tail":
        return [without_tail("tail", cfg.collab_holdout)]
    if cfg.collab_fit == "rolling":
        return [validated("full", users)] + [
            without_tail(f"block-{j}", j * cfg.collab_holdout)
            for j in range(1, cfg.collab_folds + 1)]
    folds = {u: user_fold(u, cfg.collab_folds, cfg.collab_fold_seed) for u in users}
    plans = [validated("full", users)]
    for k in range(cfg.collab_folds):
        inside = [u for u in users if folds[u] != k]
        held = [u for u in users if folds[u] == k and u in validation and sequences[u]]
        plans.append(ViewPlan(f"fold-{k}", [sequences[u] for u in inside],
                              [sequences[u] for u in held], [validation[u] for u in held], inside))
    return plans


def train_view(plan: ViewPlan, num_items: int, cfg: SASRecConfig,
               log: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor],
                                                              dict[str, Any]]:
    """Train one view's SASRec; returns its state dict and what happened (epochs, score, s)."""
    start = time.perf_counter()
    validate = None
    if plan.select_targets:
        validate = lambda m: _selection(m, plan.select_inputs, plan.select_targets)  # noqa: E731
    recommender = SASRec(cfg).fit(plan.train, num_items, validate=validate, log=log)
    assert recommender.model is not None
    scores = [r["eval/score"] for r in recommender.history if "eval/score" in r]
    meta = {"view": plan.name, "epochs": len(recommender.history),
            "selection_ndcg10": max(scores) if scores else None,
            "seconds": round(time.perf_counter() - start, 1), "users": len(plan.users),
            "train_items": int(sum(len(s) for s in plan.train))}
    state = {k: v.detach().contiguous() for k, v in recommender.model.state_dict().items()}
    return state, meta


def _train_in_worker(plan: ViewPlan, num_items: int,
                     cfg: SASRecConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    torch.set_num_threads(1)
    return train_view(plan, num_items, cfg)


def train_views(plans: Sequence[ViewPlan], num_items: int, cfg: CollabConfig, *,
                log: Callable[[str], None] | None = None
                ) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Train every view, ``collab_workers`` at a time in spawned processes (one thread each).

    Each training is seeded the same way wherever it runs, so the result does not depend on the
    number of workers.
    """
    workers = min(cfg.collab_workers, len(plans), os.cpu_count() or 1)
    if workers <= 1:
        return [train_view(plan, num_items, cfg.sasrec(), log) for plan in plans]
    single = SASRecConfig(**{**asdict(cfg.sasrec()), "sasrec_num_threads": 1})
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(_train_in_worker, plan, num_items, single) for plan in plans]
        results = []
        for plan, job in zip(plans, jobs):
            results.append(job.result())
            if log:
                meta = results[-1][1]
                log(f"collab view {plan.name}: {meta['epochs']} epochs, selection NDCG@10 "
                    f"{meta['selection_ndcg10']}, {meta['seconds']} s")
        return results


# --------------------------------------------------------------------------- cache


def _save(folder: Path, states: list[dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for view, state in enumerate(states):
        save_file(state, str(tmp / f"sasrec-{view}.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


def _load_models(folder: Path, meta: dict[str, Any]) -> list[SASRecModel]:
    config = SASRecConfig(**meta["sasrec"])
    models = []
    for view in range(int(meta["views"])):
        model = SASRecModel(int(meta["num_items"]), config)
        model.load_state_dict(load_file(str(folder / f"sasrec-{view}.safetensors")))
        models.append(model.eval().requires_grad_(False))
    return models


def _validation_targets(prepared: Path) -> dict[str, int]:
    """``{user_id: validation target}``: the validation sequences end where the target follows."""
    from hanorec.data.known import load_prepared, prepared_protocol

    protocol = prepared_protocol(prepared)
    item_ids, _, rows = load_prepared(prepared, protocol)
    index = {item: i for i, item in enumerate(item_ids)}
    return {str(r["user_id"]): index[str(r["target"])] for r in rows["validation"]}


def collab_features(prepared: str | Path, num_items: int, cfg: CollabConfig, *,
                    log: Callable[[str], None] | None = print) -> CollabFeatures:
    """Load the cached recommenders for ``prepared`` and ``cfg``, training them first if needed.

    Args:
        prepared: The prepared data folder (``manifest.json``, protocol folders).
        num_items: Catalogue size (rows of ``items/``).
        cfg: The ``collab:`` section.
        log: Line logger (None: quiet).

    Returns:
        The features, with the training sequences and the fold assignment of the rows.
    """
    prepared = Path(prepared)
    sequences, _ = known_sequences(prepared, "validation")
    folder = prepared / CACHE_FOLDER / cache_key(prepared, cfg)
    if not (folder / "meta.json").is_file():
        plans = view_plans(sequences, _validation_targets(prepared), cfg)
        if log:
            log(f"training the collaborative recommender (SASRec, {cfg.collab_fit}: "
                f"{len(plans)} model{'s' * (len(plans) > 1)}) into {folder}")
        started = time.perf_counter()
        trained = train_views(plans, num_items, cfg, log=log)
        meta = {"num_items": num_items, "sasrec": asdict(cfg.sasrec()), "fit": cfg.collab_fit,
                "folds": cfg.collab_folds, "fold_seed": cfg.collab_fold_seed,
                "holdout": cfg.collab_holdout if cfg.collab_fit in ("tail", "rolling") else 0,
                "views": len(plans), "view_meta": [m for _, m in trained],
                "seconds": round(time.perf_counter() - started, 1), "key": folder.name}
        _save(folder, [state for state, _ in trained], meta)
    meta = json.loads((folder / "meta.json").read_text())
    if int(meta["num_items"]) != num_items:
        raise ValueError(f"{folder}: recommender has {meta['num_items']} items, the catalogue "
                         f"{num_items}")
    models = _load_models(folder, meta)
    table = torch.stack([m.item_emb.weight[1:].detach().clone() for m in models])
    rows = RowViews(meta["fit"], int(meta["folds"]), int(meta["fold_seed"]), int(meta["holdout"]),
                    sequences)
    return CollabFeatures(table, models, rows, meta)


def user_states(model: SASRecModel, sequences: Sequence[Sequence[int]],
                max_len: int) -> torch.Tensor:
    """``[B, d]`` SASRec states (last position) of 0-based item sequences (no gradient)."""
    from hanorec.baselines.sasrec import _left_pad

    device = model.item_emb.weight.device
    with torch.no_grad():
        return model(_left_pad(sequences, max_len).to(device))[:, -1, :]


__all__ = ["CollabConfig", "CollabFeatures", "RowViews", "ViewPlan", "cache_key",
           "collab_features", "row_views_for", "target_positions", "train_views", "user_states",
           "view_plans"]
