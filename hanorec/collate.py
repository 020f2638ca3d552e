"""Collation shared by every stage: prepared rows → tokenized, padded model inputs.

A row (schema in ``docs/architecture.md``) is rendered by
:func:`hanorec.data.prompts.build_prompt`, formatted with the processor's chat template
(``add_generation_prompt=True``) and encoded by the processor, which expands each image
placeholder to one token per vision feature. Every row is encoded on its own, then the rows are
padded and stacked, so the image tensors of a row always travel with its tokens.

Truncation: when a prompt (plus the room reserved for its response) exceeds ``max_length``,
the oldest history items are dropped **whole** (title and image together) by re-rendering with
a smaller ``max_items``; tokens are never cut, so an image block is never split. If even one
history item does not fit, a ``ValueError`` says by how much.

Three encodings:

* :meth:`PromptCollator.encode_pairs` (and ``__call__``, for a ``DataLoader``): prompt + response
  + eos in one sequence, ``labels`` = -100 on the prompt and padding (SFT, eq. 1 of HaNoRec);
* :meth:`PromptCollator.encode_prompts`: the prompt only (for the shared-prompt forward, for
  generation and for candidate scoring), left- or right-padded;
* :meth:`PromptCollator.encode_responses` / :meth:`PromptCollator.response_tensor`: response token
  ids with eos, as the ``[B, K+1, R]`` tensor (right-padded with -100) that
  :func:`hanorec.forward.response_logps` takes.

Prompt styles (:class:`hanorec.data.prompts.PromptStyle`): with ``answer: index`` an item's
response is its candidate label, one token and **no eos** (the label's log-probability at the
answer position is the whole score, so all candidates are scored from one forward); with
``answer: head`` rows have no response (the ranking head reads the prompt's last state).
Item, poster and user placeholders are rewritten to virtual token ids after tokenisation
(:mod:`hanorec.item_tokens`); the placeholders found must match the rendered slots one for
one, or a ``ValueError`` names the row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from hanorec.data.catalog import Catalog
from hanorec.data.prompts import (
    ANSWERS,
    DEFAULT_STYLE,
    GENERAL,
    LABELS,
    Prompt,
    PromptStyle,
    build_prompt,
)
from hanorec.item_tokens import ensure_placeholders, virtual_id
from hanorec.losses import IGNORE_INDEX

#: Per-token keys (padded along the sequence) and their padding value (None = pad token id).
SEQUENCE_KEYS: dict[str, int | None] = {
    "input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0,
    "labels": IGNORE_INDEX,
}
#: Image keys whose per-row tensors are padded to the batch's image count and stacked (Idefics3).
STACKED_IMAGE_KEYS = ("pixel_values", "pixel_attention_mask")


@dataclass
class ChoiceBatch:
    """A prompt batch and the K+1 answers to score per row, chosen first (preference pairs).

    Attributes:
        prompts: Prompt-only model inputs.
        responses: ``[B, K+1, R]`` response token ids, -100 padded (``title`` / ``index``).
        choices: ``head``: each row's candidate indices (None: the catalogue).
        picks: ``head``: ``[B, K+1]`` catalogue indices of the chosen and rejected items.
    """

    prompts: BatchFeature
    responses: torch.Tensor | None = None
    choices: list[list[int] | None] | None = None
    picks: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> ChoiceBatch:
        """The batch with its tensors on ``device``."""
        prompts = BatchFeature({k: v.to(device) if isinstance(v, torch.Tensor) else v for k,
                                v in self.prompts.items()})
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return ChoiceBatch(prompts, move(self.responses), self.choices, move(self.picks))


@dataclass
class EncodedRow:
    """One encoded row before batching.

    Attributes:
        features: 1-D per-token tensors (``input_ids``, ``attention_mask``, ...) and the row's
            image tensors as the processor returned them (batch dimension removed for tokens).
        prompt_length: Number of prompt tokens (labels are -100 on them).
        num_history_items: History items kept after truncation.
        truncated: Whether history items were dropped to fit ``max_length``.
        image_paths: The images shown, in prompt order (one vision block each).
    """

    features: dict[str, torch.Tensor]
    prompt_length: int
    num_history_items: int
    truncated: bool = False
    image_paths: list[Path] = field(default_factory=list)


def answer_of(row: Mapping[str, Any]) -> str:
    """Return the supervised answer of a row: ``chosen`` for pair rows, ``Yes``/``No`` for
    ``hit1`` rows (from ``label``), else the ``target`` item id (``hit3`` included: the target
    first is the SFT answer)."""
    if "chosen" in row:
        return row["chosen"]
    if "label" in row and "query" in row:
        return "Yes" if int(row["label"]) == 1 else "No"
    return row["target"]


class PromptCollator:
    """Render and encode rows for one processor, catalogue and protocol.

    Args:
        processor: The backbone's processor (tokenizer + image processor + chat template).
        catalog: Item titles and images.
        protocol: ``hit1``, ``hit3``, ``candidates`` or ``full``; a row's own ``protocol`` key,
            when present, takes precedence (one collator serves a mixed-protocol batch).
        image_budget: How many of the most recent history items carry their image.
        max_length: Upper bound on tokens per sequence (prompt + response for pairs).
        with_images: False renders "blind" text-only prompts (BPO).
        padding_side: ``right`` (training) or ``left`` (generation); per-call override allowed.
        style: Answer mode, item/user/poster tokens, title shortening, system prompt.

    Attributes:
        num_truncated: Rows shortened (history items dropped) since construction.
        num_items_dropped: History items dropped in total.
    """

    def __init__(self, processor: ProcessorMixin, catalog: Catalog, protocol: str, *,
                 image_budget: int,
                 max_length: int, with_images: bool = True,
                 padding_side: Literal["left", "right"] = "right",
                 style: PromptStyle = DEFAULT_STYLE) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor, self.catalog, self.protocol = processor, catalog, protocol
        self.image_budget, self.max_length, self.with_images = image_budget, max_length, with_images
        self.padding_side, self.style = padding_side, style
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.placeholder_ids = ensure_placeholders(self.tokenizer) if style.needs_encoder else {}
        self._placeholder_kind = {token: kind for kind, token in self.placeholder_ids.items()}
        if style.answer == "index":
            check_labels(self.tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; responses must end with one")
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = self.tokenizer.eos_token_id if pad is None else pad
        self.num_truncated = 0
        self.num_items_dropped = 0

    # ------------------------------------------------------------------ responses
    def encode_responses(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each response text followed by eos (no other special tokens); an index
        label (``answer: index``) is its single token, without eos."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        labels = self.style.answer == "index"
        return [list(seq) + ([] if labels and text in LABELS else [self.tokenizer.eos_token_id])
                for text, seq in zip(texts, ids)]

    def response_tensor(self, texts_per_row: Sequence[Sequence[str]]) -> torch.Tensor:
        """``[B, K+1, R]`` response ids (eos included), right-padded with -100.

        Every row must have the same number of responses (chosen first, then K rejected).
        """
        counts = {len(texts) for texts in texts_per_row}
        if len(counts) != 1:
            raise ValueError("every row needs the same number of responses, got counts "
                             f"{sorted(counts)}")
        encoded = [self.encode_responses(texts) for texts in texts_per_row]
        width = max(len(ids) for row in encoded for ids in row)
        out = torch.full((len(encoded), counts.pop(), width), IGNORE_INDEX, dtype=torch.long)
        for b, row in enumerate(encoded):
            for k, ids in enumerate(row):
                out[b, k, : len(ids)] = torch.tensor(ids)
        return out

    def response_texts(self, row: Mapping[str, Any]) -> list[str]:
        """Chosen then rejected response texts of a pair row (titles, or Yes/No)."""
        answers = [row["chosen"], *row["rejected"]]
        return [self._response(answer, row) for answer in answers]

    def _response(self, answer: str, row: Mapping[str, Any]) -> str:
        """The response text of ``answer`` in ``row``: ``Yes``/``No`` as is; an item id as its
        displayed title, or its candidate label with ``answer: index``; free text passes
        through on ``general`` rows."""
        if answer in ANSWERS:
            return answer
        if row.get("protocol", self.protocol) == GENERAL:
            return answer if answer not in self.catalog.index else self.catalog.title(answer)
        if self.style.answer == "head":
            raise ValueError("answer: head has no text responses (the ranking head scores items)")
        if self.style.answer == "index":
            candidates = list(row.get("candidates") or [])
            if answer not in candidates:
                raise ValueError(f"answer: index needs {answer!r} among the row's candidates (user "
                                 f"{row.get('user_id')!r}); use candidates/hit3/hit1 rows")
            return LABELS[candidates.index(answer)]
        return self.style.display_title(self.catalog.title(answer))

    def candidate_texts(self, row: Mapping[str, Any]) -> list[str]:
        """Response texts of a row's candidates in candidate order (titles, or labels)."""
        return [self._response(item, row) for item in row["candidates"]]

    # ------------------------------------------------------------------ prompts
    def _render(self, row: Mapping[str, Any], max_items: int | None) -> Prompt:
        protocol = row.get("protocol", self.protocol)  # mixed-protocol batches tag their rows
        return build_prompt(row, self.catalog, protocol, image_budget=self.image_budget,
                            max_items=max_items, with_images=self.with_images, style=self.style)

    def prompt_features(self, prompt: Prompt,
                        images: dict[Path, Image.Image]) -> dict[str, torch.Tensor]:
        """Chat-template and process one rendered prompt: 1-D token tensors + its image inputs.

        ``images`` caches opened files across calls (pass ``{}`` for none).
        """
        text = self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                                  tokenize=False) + prompt.suffix
        pil = [images.setdefault(p, _load_rgb(p)) for p in prompt.image_paths]
        kwargs: dict[str, Any] = {"images": [pil]} if pil else {}
        out = self.processor(text=[text], return_tensors="pt", **kwargs)
        features = {}
        for key, value in out.items():
            features[key] = value[0] if key in SEQUENCE_KEYS else value
        # Idefics3: (1, n, C, H, W)
        if "pixel_values" in features and features["pixel_values"].dim() == 5:
            features["pixel_values"] = features["pixel_values"][0]
            features["pixel_attention_mask"] = features["pixel_attention_mask"][0]
        if self.placeholder_ids:
            features["input_ids"] = self._virtualize(features["input_ids"], prompt)
        return features

    def _virtualize(self, ids: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """Rewrite the placeholder tokens to virtual ids, checking them against the slots."""
        found = [(n, self._placeholder_kind[int(t)]) for n, t in enumerate(ids.tolist())
                 if int(t) in self._placeholder_kind]
        kinds = [kind.replace("mention", "item") for kind, _ in prompt.slots]
        if [kind for _, kind in found] != kinds:
            raise ValueError(f"prompt placeholders {[k for _, k in found]} do not match its "
                             f"slots {kinds} "
                             "(a title containing a placeholder text?)")
        out = ids.clone()
        for (position, _), (kind, item_id) in zip(found, prompt.slots):
            index = 0 if item_id is None else self.catalog.position(item_id)
            out[position] = virtual_id(kind, index, view=prompt.view, num_items=len(self.catalog))
        return out

    def encode_prompt_row(self, row: Mapping[str, Any], *, reserve: int = 0) -> EncodedRow:
        """Encode one row's prompt, dropping the oldest history items until it fits.

        Args:
            row: A prepared row.
            reserve: Tokens to keep free for the response (prompt ≤ ``max_length - reserve``).

        Raises:
            ValueError: If the prompt with a single history item still exceeds the budget.
        """
        budget = self.max_length - reserve
        images: dict[Path, Image.Image] = {}
        # a `general` conversation: one uncuttable unit
        full = len(row["history"]) if "history" in row else 1
        for max_items in range(full, 0, -1):
            prompt = self._render(row, None if max_items == full else max_items)
            features = self.prompt_features(prompt, images)
            length = int(features["input_ids"].shape[0])
            if length <= budget:
                dropped = full - prompt.num_history_items if "history" in row else 0
                if dropped:
                    self.num_truncated += 1
                    self.num_items_dropped += dropped
                return EncodedRow(features, length, prompt.num_history_items, bool(dropped),
                                  prompt.image_paths)
        raise ValueError(
            f"prompt of user {row.get('user_id')!r} needs {length} tokens with a single history "
            "item, "
            f"more than max_length {self.max_length} minus {reserve} reserved for the response; "
            f"raise max_length or lower image_budget")

    def encode_built_prompts(self, prompts: Sequence[Prompt], *,
                             padding_side: Literal["left", "right"] | None = None) -> BatchFeature:
        """Batch already-rendered prompts (e.g. item descriptions) without truncation."""
        images: dict[Path, Image.Image] = {}
        return self.collate_features([self.prompt_features(p, images) for p in prompts],
                                     padding_side or self.padding_side)

    def encode_prompts(self, rows: Sequence[Mapping[str, Any]], *, reserve: int = 0,
                       padding_side: Literal["left", "right"] | None = None) -> BatchFeature:
        """Prompt-only batch (no labels) with the family's image inputs.

        Args:
            rows: Prepared rows.
            reserve: Tokens kept free for responses when truncating.
            padding_side: Overrides the collator's padding side (``left`` for generation).
        """
        encoded = [self.encode_prompt_row(row, reserve=reserve) for row in rows]
        return self.collate_features([e.features for e in encoded],
                                     padding_side or self.padding_side)

    def encode_pairs(self, rows: Sequence[Mapping[str, Any]],
                     responses: Sequence[str] | None = None,
                     *, padding_side: Literal["left", "right"] | None = None) -> BatchFeature:
        """Prompt + response + eos per row, with ``labels`` scoring only response and eos.

        Args:
            rows: Prepared rows.
            responses: Response texts (default: :func:`answer_of` of each row, as text).
            padding_side: Overrides the collator's padding side.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` and the image inputs.
        """
        if responses is None:
            responses = [self._response(answer_of(row), row) for row in rows]
        if len(responses) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
        features = []
        for row, ids in zip(rows, self.encode_responses(responses)):
            encoded = self.encode_prompt_row(row, reserve=len(ids))
            features.append(append_response(encoded.features, ids))
        return self.collate_features(features, padding_side or self.padding_side)

    def encode_preference(self,
                          rows: Sequence[Mapping[str, Any]]) -> tuple[BatchFeature, torch.Tensor]:
        """Prompt batch and ``[B, K+1, R]`` responses (chosen first) for pair rows (DPO)."""
        texts = [self.response_texts(row) for row in rows]
        reserve = max(len(ids) for row_texts in texts for ids in self.encode_responses(row_texts))
        return self.encode_prompts(rows, reserve=reserve), self.response_tensor(texts)

    def encode_choices(self, rows: Sequence[Mapping[str, Any]]) -> ChoiceBatch:
        """Pair rows as a :class:`ChoiceBatch`: responses for ``title``/``index``, or the
        candidate sets and the chosen/rejected item indices for ``head``."""
        if self.style.answer != "head":
            return ChoiceBatch(*self.encode_preference(rows))
        index = self.catalog.index
        picks = torch.tensor([[index[row["chosen"]], *(index[item] for item in row["rejected"])]
                              for row in rows])
        choices = [[index[i] for i in row["candidates"]] if row.get("candidates") else None
                   for row in rows]
        return ChoiceBatch(self.encode_prompts(rows), choices=choices, picks=picks)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> BatchFeature:
        """``DataLoader`` collate function: :meth:`encode_pairs` with each row's answer."""
        return self.encode_pairs(rows)

    # ------------------------------------------------------------------ batching
    def collate_features(self, rows: list[dict[str, torch.Tensor]],
                         padding_side: str) -> BatchFeature:
        """Pad and stack per-row features (from :meth:`prompt_features`, maybe with
        :func:`append_response`) into one batch."""
        width = max(int(r["input_ids"].shape[0]) for r in rows)
        out: dict[str, torch.Tensor] = {}
        for key, pad in SEQUENCE_KEYS.items():
            if key in rows[0]:
                value = self.pad_token_id if pad is None else pad
                out[key] = torch.stack([_pad_1d(r[key], width, value, padding_side) for r in rows])
        image_keys = dict.fromkeys(k for r in rows for k in r if k not in SEQUENCE_KEYS)
        stacked = "pixel_attention_mask" in image_keys  # Idefics3: (B, max images, C, H, W)
        for key in image_keys:
            if stacked and key in STACKED_IMAGE_KEYS:
                out[key] = _stack_images([r.get(key) for r in rows])
            else:
                out[key] = torch.cat([r[key] for r in rows if key in r])
        return BatchFeature(out)


def check_labels(tokenizer: Any) -> None:
    """Every index label must be exactly one token, distinct from the others."""
    ids = tokenizer(list(LABELS), add_special_tokens=False)["input_ids"]
    bad = [label for label, seq in zip(LABELS, ids) if len(seq) != 1]
    if bad or len({seq[0] for seq in ids}) != len(LABELS):
        raise ValueError("answer: index needs one token per label; this tokenizer splits "
                         f"{bad[:5]}")


def _load_rgb(path: Path) -> Image.Image:
    """Open an image file as RGB (file closed after loading)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def append_response(features: dict[str, torch.Tensor], ids: list[int]) -> dict[str, torch.Tensor]:
    """Append response ids to a prompt's tokens; labels are -100 on the prompt (SFT loss eq. 1)."""
    response = torch.tensor(ids, dtype=features["input_ids"].dtype)
    out = dict(features)
    prompt_len = int(features["input_ids"].shape[0])
    out["input_ids"] = torch.cat([features["input_ids"], response])
    out["labels"] = torch.cat([torch.full((prompt_len,), IGNORE_INDEX, dtype=response.dtype),
                               response])
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in features:
            fill = 1 if key == "attention_mask" else 0
            out[key] = torch.cat([features[key],
                                  torch.full((len(ids),), fill, dtype=features[key].dtype)])
    return out


def _pad_1d(values: torch.Tensor, width: int, pad: int, side: str) -> torch.Tensor:
    filler = torch.full((width - values.shape[0],), pad, dtype=values.dtype)
    return torch.cat([filler, values] if side == "left" else [values, filler])


def _stack_images(per_row: list[torch.Tensor | None]) -> torch.Tensor:
    """Zero-pad per-row ``(n_i, ..., H_i, W_i)`` image tensors to ``(B, max n, ..., max H, max W)``.

    All-zero images are how Idefics3 marks padding images (it skips them).
    """
    real = [t for t in per_row if t is not None]
    shape = [max(t.shape[d] for t in real) for d in range(real[0].dim())]
    out = torch.zeros((len(per_row), *shape), dtype=real[0].dtype)
    for b, t in enumerate(per_row):
        if t is not None:
            out[(b, *[slice(0, s) for s in t.shape])] = t
    return out
