"""Model-side scoring for evaluation: candidate likelihoods, Yes/No odds, greedy answers, states.

Every function here runs the model without gradients on prepared rows (schema in
``docs/architecture.md``) rendered by a :class:`hanorec.collate.PromptCollator`, in batches,
with an optional progress bar, and returns numpy arrays in row order. The evaluator
(:mod:`hanorec.evaluate`) turns them into metrics; training stages call
:func:`quick_candidate_hr1` for a validation number.

Every function follows the collator's read-out (``prompt.answer``, :mod:`hanorec.readout`):
``title`` as described below; ``index`` scores each candidate by its label token's
log-probability at the answer position (one prompt pass, the labels branch from it);
``head`` scores items with the ranking head from the answer-position state, which is the
same for every protocol of one user (the ``head`` prompt has no candidates and no query), so
a ``state_cache`` dict shared across calls computes it once per user and history.

* **Candidate likelihood** (``candidates``, ``hit3``): ``s_c = log π(title_c ⊕ eos | x)``, the
  summed log-probability of candidate ``c``'s response as the SFT stage trained it (the bare
  title followed by eos, :func:`hanorec.data.prompts.response_text`), or its per-token mean
  with ``length_normalize``. The prompt and its images are encoded **once** and every
  candidate branches from it (:func:`hanorec.forward.score_candidates`);
  :func:`naive_candidate_scores` is the one-forward-per-candidate reference it must equal.
* **Yes/No odds** (``hit1``): ``s = log π(Yes ⊕ eos | x) − log π(No ⊕ eos | x)``, the log-odds
  of the two responses the SFT stage trained; monotone in P(Yes) given {Yes, No}, so the AUC
  is that of P(Yes).
* **Greedy answers**: ``model.generate`` (``do_sample=False``) on the left-padded prompt batch.
* **Hidden states** (``full``): the final-layer hidden state at a prompt's last token, for a
  user prompt (the user state) and for an item prompt (title, with the item's image when it
  has one and images are on: R²ec's ``H_V`` / BIGRec-style grounding), each ending with the
  chat template's generation prompt so both states sit at "about to answer" positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hanorec.collate import PromptCollator
from hanorec.data.prompts import ANSWERS, PLACEHOLDERS, VIEW_FIELD, Prompt
from hanorec.forward import score_candidates
from hanorec.hardware import warn_if_emulated_bf16
from hanorec.losses import IGNORE_INDEX, sequence_logps
from hanorec.metrics import target_ranks
from hanorec.readout import answer_states, final_states, require_encoder, score_states

Row = Mapping[str, Any]
YES_NO = ANSWERS  # the two hit1 responses, in the order the log-odds subtract them

__all__ = [
    "candidate_scores",
    "generate_answers",
    "item_states",
    "naive_candidate_scores",
    "quick_candidate_hr1",
    "scoring_precision",
    "user_states",
    "yes_no_scores",
]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    return next(model.parameters(), torch.empty(0)).device


def scoring_precision(model: nn.Module, precision: str = "fp32") -> torch.autocast:
    """Autocast context for the scoring forwards: ``bf16`` runs matmuls in bfloat16.

    Autocast keeps log-softmax and reductions in float32 and every function here casts its
    output to float before numpy, so only the matmul rounding changes (candidate scores move by
    ~1e-2 nats on the tiny models; rankings of well-separated candidates are kept). Worth it where
    bf16 matmuls are fast: GPUs, and CPUs with avx512_bf16 or AMX (about 3x the fp32 matmul rate on
    one such 2-core machine); where bf16 is emulated (AVX2-only CPUs) it is ~5x slower than fp32 and
    warns (:mod:`hanorec.hardware`).

    Args:
        model: The model that will run (its device picks the autocast device type).
        precision: ``"fp32"`` (autocast disabled) or ``"bf16"``.

    Raises:
        ValueError: another precision.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"eval_precision must be fp32 or bf16, got {precision!r}")
    device_type = model_device(model).type
    if precision == "bf16":
        warn_if_emulated_bf16("--eval-precision bf16", device_type)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _batches(items: Sequence[Any], batch_size: int, desc: str,
             progress: bool) -> Iterator[Sequence[Any]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield items[start : start + batch_size]


def _response_ids(collator: PromptCollator,
                  texts_per_row: Sequence[Sequence[str]]) -> tuple[Tensor, int]:
    """``[B, C, R]`` response ids and the longest response (tokens to reserve in the prompt)."""
    responses = collator.response_tensor(texts_per_row)
    return responses, int((responses != IGNORE_INDEX).sum(-1).max())


def _shared_scores(model: nn.Module, collator: PromptCollator, rows: Sequence[Row],
                   texts: Callable[[Row], list[str]], *, batch_size: int, average: bool, mode: str,
                   candidates_per_pass: int | None, desc: str, progress: bool) -> np.ndarray:
    """``[N, C]`` log-probabilities of each row's C response texts, one prompt pass per batch."""
    device, out = model_device(model), []
    for chunk in _batches(rows, batch_size, desc, progress):
        responses, longest = _response_ids(collator, [texts(row) for row in chunk])
        prompts = collator.encode_prompts(chunk, reserve=longest, padding_side="left")
        scores = score_candidates(model, _to(prompts, device), responses.to(device), mode=mode,
                                  average=average, candidates_per_pass=candidates_per_pass)
        out.append(scores.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def candidate_titles(collator: PromptCollator, row: Row) -> list[str]:
    """Response texts of a row's candidates, in candidate order (titles, or index labels)."""
    return collator.candidate_texts(row)


def _state_key(row: Row) -> tuple[str, tuple[str, ...], int]:
    return str(row.get("user_id")), tuple(row["history"]), _view(row)


def _view(row: Row) -> int:
    """The recommender view a row reads (:mod:`hanorec.collab`; 0 unless a training row)."""
    return int(row.get(VIEW_FIELD) or 0)


@torch.no_grad()
def head_states(model: nn.Module, collator: PromptCollator, rows: Sequence[Row], *,
                batch_size: int = 16,
                progress: bool = True, state_cache: dict | None = None) -> Tensor:
    """``[N, H]`` answer-position states of the ``head`` prompts, once per user and history.

    The prompts are batched in order of length (padding falls from ~8% of the tokens to
    ~0.3% on ML-100K) and the tokens every prompt of a batch starts with are encoded once
    (:func:`hanorec.readout.final_states` with ``share_prefix``); neither changes a state
    beyond float rounding.
    """
    cache = {} if state_cache is None else state_cache
    todo = list(dict.fromkeys(key for key in map(_state_key, rows) if key not in cache))
    pending = set(todo)
    first = {key: row for row in rows if (key := _state_key(row)) in pending}
    features = {key: collator.encode_prompt_row(first[key]).features for key in todo}
    todo.sort(key=lambda key: int(features[key]["input_ids"].shape[0]))
    if any(set(f) - {"input_ids", "attention_mask"} for f in features.values()):
        features = {}  # image tensors: re-encoded per batch rather than all held at once
    device = model_device(model)
    for chunk in _batches(todo, batch_size, "head states", progress):
        rows_features = [features.get(key) or collator.encode_prompt_row(first[key]).features
                         for key in chunk]
        batch = _to(collator.collate_features(rows_features, "right"), device)
        for key, state in zip(chunk, answer_states(model, batch, share_prefix=True).cpu()):
            cache[key] = state
    return torch.stack([cache[_state_key(row)] for row in rows])


@torch.no_grad()
def head_candidate_scores(model: nn.Module, collator: PromptCollator, rows: Sequence[Row], *,
                          batch_size: int = 16, progress: bool = True,
                          state_cache: dict | None = None,
                          catalogue: bool = False) -> np.ndarray:
    """``[N, C]`` head scores of each row's candidates in candidate order, or ``[N, I]`` of the
    whole catalogue with ``catalogue``."""
    encoder = require_encoder(model)
    states = head_states(model, collator, rows, batch_size=batch_size, progress=progress,
                         state_cache=state_cache)
    device = model_device(model)
    out = []
    for start in range(0, len(rows), 256):
        chunk, part = rows[start : start + 256], states[start : start + 256].to(device)
        views = torch.tensor([_view(row) for row in chunk], device=device)
        if catalogue:
            scores, _, _ = score_states(encoder, part, [None] * len(chunk), views)
        else:
            index = collator.catalog.index
            choices = [[index[item] for item in row["candidates"]] for row in chunk]
            scores, columns, _ = score_states(encoder, part, choices, views)
            where = torch.searchsorted(columns, torch.tensor(choices, device=columns.device))
            scores = scores.gather(1, where)
        out.append(scores.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def candidate_scores(model: nn.Module, collator: PromptCollator, rows: Sequence[Row], *,
                     batch_size: int = 4, length_normalize: bool = False, mode: str = "auto",
                     candidates_per_pass: int | None = None, progress: bool = True,
                     state_cache: dict | None = None) -> np.ndarray:
    """``[N, C]`` scores of every row's candidates: ``log π(title_c ⊕ eos | x)``, the label
    log-probability (``index``) or the head score (``head``).

    Args:
        model: the evaluated (vision-)language model, eval mode.
        collator: renders the rows (its protocol or each row's ``protocol``).
        rows: prepared ``candidates`` / ``hit3`` rows (same candidate count in each).
        batch_size: prompts per forward.
        length_normalize: mean over the response's tokens instead of the sum.
        mode: shared-prompt path of :func:`hanorec.forward.score_candidates`.
        candidates_per_pass: candidates per prompt pass (None: all).
        progress: show a progress bar.
        state_cache: ``head`` states shared across calls (:func:`head_states`).
    """
    if collator.style.answer == "head":
        return head_candidate_scores(model, collator, rows, batch_size=batch_size,
                                     progress=progress,
                                     state_cache=state_cache)
    return _shared_scores(model, collator, rows, lambda row: candidate_titles(collator, row),
                          batch_size=batch_size, average=length_normalize, mode=mode,
                          candidates_per_pass=candidates_per_pass, desc="candidates",
                          progress=progress)


def yes_no_scores(model: nn.Module, collator: PromptCollator, rows: Sequence[Row], *,
                  batch_size: int = 4, mode: str = "auto", progress: bool = True,
                  state_cache: dict | None = None) -> np.ndarray:
    """``[N]`` log-odds ``log π(Yes ⊕ eos | x) − log π(No ⊕ eos | x)`` (hit1 rows); with the
    ``head`` read-out, the head's log-probability of the query item over the catalogue."""
    if collator.style.answer == "head":
        scores = head_candidate_scores(model, collator, rows, batch_size=batch_size,
                                       progress=progress,
                                       state_cache=state_cache, catalogue=True)
        logps = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
        queries = [collator.catalog.position(row["query"]) for row in rows]
        return logps[np.arange(len(rows)), queries]
    logps = _shared_scores(model, collator, rows, lambda row: list(YES_NO), batch_size=batch_size,
                           average=False, mode=mode, candidates_per_pass=None, desc="hit1",
                           progress=progress)
    return logps[:, 0] - logps[:, 1]


@torch.no_grad()
def naive_candidate_scores(model: nn.Module, collator: PromptCollator, rows: Sequence[Row], *,
                           progress: bool = False) -> np.ndarray:
    """Reference ``[N, C]`` scores: one forward per (row, candidate), prompt ⊕ title ⊕ eos.

    How TRL-style code scores candidates (the prompt and its images re-encoded for each one);
    :func:`candidate_scores` must match it and is what the benchmark compares against.
    """
    device, out = model_device(model), np.zeros((len(rows), len(rows[0]["candidates"])))
    for n, row in enumerate(tqdm(rows, desc="naive", disable=not progress, leave=False)):
        for c, title in enumerate(candidate_titles(collator, row)):
            batch = _to(collator.encode_pairs([row], [title]), device)
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits
            out[n, c] = float(sequence_logps(logits[:, :-1], labels[:, 1:])[0])
    return out


@torch.no_grad()
def generate_answers(model: nn.Module, collator: PromptCollator, rows: Sequence[Row], *,
                     batch_size: int = 4, max_new_tokens: int = 32,
                     progress: bool = True) -> list[str]:
    """Greedy answers (``do_sample=False``), decoded without special tokens, one per row."""
    device, answers = model_device(model), []
    tokenizer = collator.tokenizer
    for chunk in _batches(rows, batch_size, "generate", progress):
        prompts = _to(collator.encode_prompts(chunk, reserve=max_new_tokens, padding_side="left"),
                      device)
        output = model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=collator.pad_token_id)
        new_tokens = output[:, prompts["input_ids"].shape[1]:]
        answers.extend(t.strip()
                       for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


@torch.no_grad()
def user_states(model: nn.Module, collator: PromptCollator, rows: Sequence[Row], *,
                batch_size: int = 4, progress: bool = True) -> np.ndarray:
    """``[N, H]`` hidden state at the last prompt token of each row (the user state)."""
    device, out = model_device(model), []
    for chunk in _batches(rows, batch_size, "user states", progress):
        batch = _to(collator.encode_prompts(chunk, padding_side="left"), device)
        out.append(final_states(model, batch).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def item_prompt(collator: PromptCollator, item_id: str) -> Prompt:
    """One-turn item description prompt: ``[image] "<title>"[<|item|>]`` then a description request
    (the image as a poster token with ``image_tokens: pooled``, the item token when the style has
    them)."""
    catalog, style = collator.catalog, collator.style
    path: Path | None = catalog.image_path(item_id) if collator.with_images else None
    content: list[dict[str, Any]] = []
    slots: list[tuple[str, str | None]] = []
    text = ""
    if path is not None and style.image_tokens == "pooled":
        text, slots = PLACEHOLDERS["poster"], [("poster", item_id)]
    elif path is not None:
        content.append({"type": "image"})
    text += f'A {catalog.item_noun}: "{style.display_title(catalog.title(item_id))}"'
    if style.item_tokens:
        text += PLACEHOLDERS["mention"]
        slots.append(("mention", item_id))
    content.append({"type": "text", "text": f"{text}\nDescribe this {catalog.item_noun}."})
    images = [path] if path is not None and style.image_tokens != "pooled" else []
    return Prompt([{"role": "user", "content": content}], images, 1, slots)


@torch.no_grad()
def item_states(model: nn.Module, collator: PromptCollator, item_ids: Sequence[str], *,
                batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """``[I, H]`` hidden state at the end of each item's prompt (encoded once per catalogue).

    Item prompts go through the same collator as user prompts, so they carry the same image
    inputs for every backbone family.
    """
    device, out = model_device(model), []
    for chunk in _batches(list(item_ids), batch_size, "catalogue", progress):
        prompts = [item_prompt(collator, item) for item in chunk]
        batch = _to(collator.encode_built_prompts(prompts, padding_side="left"), device)
        out.append(final_states(model, batch).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def quick_candidate_hr1(model: nn.Module, collator: PromptCollator, rows: Sequence[Row],
                        batch_size: int) -> float:
    """Likelihood HR@1 (pessimistic ties) on ``candidates``/``hit3`` rows: a validation metric.

    ``HR@1 = mean_u 1[s_{u,target} > s_{u,c} for every other c]`` with the scores of
    :func:`candidate_scores`. The model is put in eval mode and its mode restored afterwards.
    """
    if not rows:
        raise ValueError("quick_candidate_hr1: no rows")
    was_training = model.training
    model.eval()
    try:
        scores = candidate_scores(model, collator, rows, batch_size=batch_size, progress=False)
    finally:
        model.train(was_training)
    ranks = target_ranks(scores, [int(row["target_index"]) for row in rows])
    return float(np.mean(ranks == 1))
