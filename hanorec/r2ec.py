"""R²ec's dual-head model (arXiv 2505.16994): one decoder that reasons, then scores every item.

The backbone (any :mod:`hanorec.models` family, multimodal included) keeps its LM head for
the reasoning text and gains an *item head* that needs no new parameters:

* **Item table** ``H_V[v]``: the model's own final-layer hidden state at the last token of an
  item-description prompt (the item's title, and its image when it has one, rendered by
  :func:`hanorec.scoring.item_prompt`) followed by the ``<answer>`` marker.
* **User state** ``h_T``: the final-layer hidden state at the last token of the ``<answer>``
  marker that closes the reasoning trace (or directly after the prompt, with no trace).
* **Scores** (R²ec item head): ``s(v) = cos(h_T, H_V[v]) / τ`` with τ = 0.02.

The marker is plain text (tokenised normally, no new special token), so the backbone's
vocabulary and embeddings are untouched and any tokenizer works; generation stops when the
marker's token ids appear (:class:`MarkerStop`) and a trace that never wrote it gets it
appended (:func:`close_trace`).

Every sequence here is **left-padded** with the marker as its last token, so "the state at the
marker" is simply the last position of the batch; positions follow the real tokens
(``cumsum(attention_mask) − 1``) as in generation. :class:`ItemTable` caches ``H_V`` for the
whole catalogue without gradient (recomputed every N steps by the RecPO loop);
:func:`item_batch` encodes any subset of items so the in-batch rows can be recomputed *with*
gradient, and :func:`joint_batch` stacks traces and item prompts into one batch (one forward).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import BatchFeature, StoppingCriteria

from hanorec.collate import PromptCollator, append_response
from hanorec.losses import IGNORE_INDEX
from hanorec.readout import final_states, forward_states, similarity
from hanorec.scoring import item_prompt, model_device

ANSWER_MARKER = "<answer>"

__all__ = [
    "ANSWER_MARKER",
    "ItemTable",
    "MarkerStop",
    "close_trace",
    "item_batch",
    "item_scores",
    "joint_batch",
    "marker_ids",
    "sample_traces",
    "sequence_batch",
    "state_and_token_logps",
]


def marker_ids(tokenizer: Any, marker: str = ANSWER_MARKER) -> list[int]:
    """Token ids of the marker as plain text (no special tokens added)."""
    ids = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"the tokenizer encodes the marker {marker!r} as no tokens")
    return ids


class MarkerStop(StoppingCriteria):
    """Stop a sequence once its newest tokens equal the marker's token ids."""

    def __init__(self, marker: Sequence[int], prompt_length: int) -> None:
        self.marker = torch.tensor(list(marker))
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        n = self.marker.numel()
        if input_ids.shape[1] - self.prompt_length < n:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tail = input_ids[:, -n:]
        return (tail == self.marker.to(tail.device)).all(dim=1)


def close_trace(generated: Sequence[int], marker: Sequence[int], stop_ids: set[int]) -> list[int]:
    """Reasoning trace ids ending with exactly one marker.

    The trace is cut at the first marker occurrence (kept) or at the first stop token (eos /
    pad, dropped); a trace that never wrote the marker gets it appended.
    """
    ids, marker = list(generated), list(marker)
    n = len(marker)
    for i in range(len(ids)):
        if ids[i] in stop_ids:
            return ids[:i] + marker
        if ids[i : i + n] == marker:
            return ids[: i + n]
    return ids + marker


def suppressed_ids(collator: PromptCollator) -> list[int]:
    """Special and added tokens a trace must never contain (image placeholders, chat markers),
    eos excepted: a sampled image token would desynchronise image features and tokens."""
    tokenizer = collator.tokenizer
    ids = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    image = getattr(collator.processor, "image_token_id", None)
    if image is not None:
        ids.add(int(image))
    return sorted(ids - {tokenizer.eos_token_id})


@torch.no_grad()
def sample_traces(model: nn.Module, collator: PromptCollator, rows: Sequence[Mapping[str, Any]], *,
                  num_traces: int, max_new_tokens: int, marker: Sequence[int],
                  do_sample: bool = True,
                  temperature: float = 1.0, top_k: int = 0) -> list[list[int]]:
    """``len(rows) × num_traces`` traces (row-major), each closed by the marker.

    Each row is repeated ``num_traces`` times before encoding (so every family's image inputs
    stay aligned with their tokens) and ``model.generate`` samples one trace per copy, stopping
    a copy at the marker (:class:`MarkerStop`); special tokens are suppressed
    (:func:`suppressed_ids`).
    """
    repeated = [row for row in rows for _ in range(num_traces)]
    batch = collator.encode_prompts(repeated, reserve=max_new_tokens + len(marker),
                                    padding_side="left")
    batch = {k: (v.to(model_device(model)) if isinstance(v, Tensor) else v) for k,
             v in batch.items()}
    width = batch["input_ids"].shape[1]
    options: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        options.update(temperature=temperature, top_k=top_k if top_k > 0 else None)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=collator.pad_token_id,
                         stopping_criteria=[MarkerStop(marker, width)],
                         suppress_tokens=suppressed_ids(collator), **options)
    stop = {collator.tokenizer.eos_token_id, collator.pad_token_id}
    return [close_trace(seq.tolist(), marker, stop) for seq in out[:, width:]]


def _sequence_features(collator: PromptCollator, rows: Sequence[Mapping[str, Any]],
                       traces: Sequence[Sequence[int]],
                       reserve: int) -> list[dict[str, Tensor]]:
    if len(traces) % len(rows):
        raise ValueError(f"{len(traces)} traces for {len(rows)} rows: expected a multiple")
    per_row = len(traces) // len(rows)
    encoded = [collator.encode_prompt_row(row, reserve=reserve).features for row in rows]
    return [append_response(encoded[i // per_row], list(t)) for i, t in enumerate(traces)]


def _item_features(collator: PromptCollator, item_ids: Sequence[str],
                   marker: Sequence[int]) -> list[dict[str, Tensor]]:
    return [append_response(collator.prompt_features(item_prompt(collator, item), {}), list(marker))
            for item in item_ids]


def sequence_batch(collator: PromptCollator, rows: Sequence[Mapping[str, Any]],
                   traces: Sequence[Sequence[int]],
                   *, reserve: int) -> BatchFeature:
    """Prompt ⊕ trace (marker last) per trace; ``rows`` is repeated to match ``traces`` row-major.

    ``labels`` hold the trace ids (−100 elsewhere) so the same batch gives the token log-probs.
    ``reserve`` must equal the one used when sampling so the prompts are truncated identically.
    """
    return collator.collate_features(_sequence_features(collator, rows, traces, reserve), "left")


def item_batch(collator: PromptCollator, item_ids: Sequence[str],
               marker: Sequence[int]) -> BatchFeature:
    """Item-description prompts (title, image when present) each followed by the marker."""
    return collator.collate_features(_item_features(collator, item_ids, marker), "left")


def joint_batch(collator: PromptCollator, rows: Sequence[Mapping[str, Any]],
                traces: Sequence[Sequence[int]],
                item_ids: Sequence[str], marker: Sequence[int], *, reserve: int) -> BatchFeature:
    """:func:`sequence_batch` rows followed by :func:`item_batch` rows in one batch.

    User states and the in-batch item rows then come from a single forward, which is what
    DistributedDataParallel needs (one forward per backward).
    """
    features = _sequence_features(collator, rows, traces,
                                  reserve) + _item_features(collator, item_ids, marker)
    return collator.collate_features(features, "left")


#: ``[B, H]`` final-layer hidden state at the last (marker) token, float32: every sequence here
#: is left-padded with the marker last, so it is :func:`hanorec.readout.final_states`.
last_states = final_states


def state_and_token_logps(model: nn.Module,
                          batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """One forward: user states ``h_T`` ``[N, H]`` and per-token trace log-probs ``[N, W]``.

    ``W`` is the longest trace; ``logp[n, w]`` scores the trace token at position ``w`` of the
    right-aligned window and ``mask[n, w]`` is True on real trace tokens (labels ≠ −100).

    Returns:
        ``(states, token_logps, mask)``.
    """
    out = forward_states(model, batch, logits_to_keep=0)
    labels = batch["labels"]
    width = int((labels != IGNORE_INDEX).sum(1).max())
    targets = labels[:, -width:]
    mask = targets != IGNORE_INDEX
    logits = out.logits[:, -width - 1 : -1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return out.hidden_states[-1][:, -1].float(), logps * mask, mask


def item_scores(user_states: Tensor, item_states: Tensor, tau: float) -> Tensor:
    """R²ec item scores ``s[u, v] = cos(h_u, H_V[v]) / τ`` for ``[U, H]`` users and ``[N, H]`` items
    (:func:`hanorec.readout.similarity`, shared with the ranking head)."""
    if tau <= 0:
        raise ValueError(f"item_scores: tau must be positive, got {tau}")
    return similarity(user_states, item_states, "cos", tau)


class ItemTable:
    """The cached item table ``H_V`` ``[N, H]`` (no gradient), refreshed on demand.

    Args:
        item_ids: Catalogue item ids, row ``i`` = item index ``i``.
        marker: Marker token ids closing each item prompt.
        batch_size: Item prompts per forward during a refresh.
    """

    def __init__(self, item_ids: Sequence[str], marker: Sequence[int],
                 batch_size: int = 16) -> None:
        self.item_ids, self.marker, self.batch_size = list(item_ids), list(marker), batch_size
        self.states: Tensor | None = None
        self.seconds = 0.0

    @torch.no_grad()
    def refresh(self, model: nn.Module, collator: PromptCollator, *,
                progress: bool = True) -> float:
        """Recompute every row (model in eval mode, restored after); returns the seconds taken."""
        start, was_training = time.perf_counter(), model.training
        model.eval()
        device, parts = model_device(model), []
        bar = tqdm(total=len(self.item_ids), desc="item table H_V", disable=not progress,
                   leave=False)
        for lo in range(0, len(self.item_ids), self.batch_size):
            chunk = self.item_ids[lo : lo + self.batch_size]
            batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k,
                     v in item_batch(collator, chunk, self.marker).items()}
            parts.append(last_states(model, batch))
            bar.update(len(chunk))
        bar.close()
        model.train(was_training)
        self.states = torch.cat(parts)
        self.seconds = time.perf_counter() - start
        return self.seconds

    def scores(self, user_states: Tensor, tau: float) -> Tensor:
        """``[U, N]`` scores of every catalogue item (R²ec item head)."""
        if self.states is None:
            raise ValueError("ItemTable.scores: call refresh() first")
        return item_scores(user_states, self.states.to(user_states.device), tau)
