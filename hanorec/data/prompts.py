"""Chat prompts for every protocol, in the Hugging Face multimodal message format.

One user turn: an instruction, then the history (oldest first) as, per item, an optional
``{"type": "image"}`` followed by ``{"type": "text", "text": '"Title (Year)"\\n'}``; only the
most recent ``image_budget`` history items carry an image. Then the protocol's question:

- ``candidates``: the candidate titles (quoted, one per line), then
  ``Which <noun> will the user <verb> next? Answer with its title.``
- ``hit3``: the candidate titles, then ``Which 3 of these <noun>s ... one per line.``
- ``hit1``: ``Will the user like "<Title>"? Answer Yes or No.``
- ``full``: ``Which <noun> will the user <verb> next? Answer with its title.``

The ``general`` protocol (free-form multimodal preference data such as MMSafe-PO, converted by
:mod:`hanorec.data.mmsafe`) renders a row's own ``prompt`` instead: a ``USER: … ASSISTANT: …``
conversation (possibly multi-turn; no marker = one user turn) whose ``<image>`` placeholders
become ``{"type": "image"}`` entries, filled in order with the row's ``images`` (paths under the
catalogue's image root). Images without a placeholder go first in the first user turn (LLaVA
convention); the trailing empty ``ASSISTANT:`` is the generation slot.

The messages go through ``processor.apply_chat_template(messages,
add_generation_prompt=True, tokenize=False)``; the response (`response_text`) is the
bare title or ``Yes`` / ``No``.

**Prompt style** (:class:`PromptStyle`, the recipe's ``prompt:`` section): how the model reads
out its answer and which extra tokens the prompt carries.

- ``answer``: ``title`` (the response is the item's title, as above), ``index`` (candidates
  are listed as ``A. "Title"`` … and the response is the single label token; LlamaRec,
  Yue et al. 2023) or ``head`` (no candidate list and no query: every protocol asks for the
  next item and a ranking head scores items from the hidden state at the answer position,
  :mod:`hanorec.readout`).
- ``item_tokens``: a ``<|item|>`` placeholder after each history title, candidate title and
  ``hit1`` query (LLaRA's hybrid item representation); ``user_token``: ``<|user|>`` as the
  prompt's last token, after the chat template's generation prompt (:attr:`Prompt.suffix`),
  where the answer is read; ``image_tokens: pooled``: a ``<|poster|>`` placeholder per history image
  instead of the image (one token, the item's pooled vision features). The collator turns the
  placeholders into virtual token ids (:mod:`hanorec.item_tokens`); :attr:`Prompt.slots` lists them
  in text order.
- ``title_year: false`` drops a trailing ``(1995)`` from titles (six digit tokens in many
  tokenizers); ``title_words: N`` keeps the first N words; ``titles: false`` shows no titles at
  all (an item is its item token: the ablation of what titles add); ``title_budget: N`` shows
  titles for the N most recent history items only and writes the older ones as a run of bare
  item tokens (one token each: a long history for the collaborative channel and the user
  token at a fraction of the text); ``system_prompt`` replaces the chat template's default
  system message (SmolLM2's is ~20 tokens).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hanorec.data.catalog import Catalog
from hanorec.data.images import safe_image_path

#: Placeholder text of each item-token kind, registered as special tokens of the tokenizer
#: (:func:`hanorec.item_tokens.ensure_placeholders`). A ``mention`` (a candidate, a query, an item
#: prompt) shares the ``item`` placeholder; only ``item`` tokens (the history) feed the user
#: token's recommender state.
PLACEHOLDERS: dict[str, str] = {"item": "<|item|>", "mention": "<|item|>", "poster": "<|poster|>",
                                "user": "<|user|>"}
#: The row field naming the recommender (view) a training row's item and user tokens read
#: (cross-fitting, :mod:`hanorec.collab`); absent: view 0, the model every stage's evaluation uses.
VIEW_FIELD = "collab_view"
ANSWER_MODES = ("title", "index", "head")
IMAGE_TOKEN_MODES = ("full", "pooled")
#: Index labels, one token each in common tokenizers (checked by the collator).
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
VERBS = {"movie": "watch", "film": "watch", "show": "watch", "book": "read", "song": "listen to",
         "track": "listen to", "video": "watch"}
ANSWERS = ("Yes", "No")
GENERAL = "general"
IMAGE_PLACEHOLDER = "<image>"
_TURN_MARKER = re.compile(r"\b(USER|ASSISTANT):")


@dataclass
class Prompt:
    """A rendered prompt.

    Attributes:
        messages: HF chat messages (one user turn).
        image_paths: Absolute image paths, in the order of the ``{"type": "image"}`` entries.
        num_history_items: History items shown (after `max_items` truncation).
        slots: The placeholders in text order: ``(kind, item id or None)``.
        suffix: Text after the chat template's generation prompt (the user token).
        view: The recommender the item and user tokens read (the row's ``collab_view``).
    """

    messages: list[dict[str, Any]]
    image_paths: list[Path] = field(default_factory=list)
    num_history_items: int = 0
    slots: list[tuple[str, str | None]] = field(default_factory=list)
    suffix: str = ""
    view: int = 0


@dataclass(frozen=True)
class PromptStyle:
    """How a prompt reads out the answer and which item tokens it carries (module docstring)."""

    answer: str = "title"
    item_tokens: bool = False
    user_token: bool = False
    image_tokens: str = "full"
    title_words: int = 0
    title_year: bool = True
    system_prompt: str | None = None
    titles: bool = True
    title_budget: int = 0

    def __post_init__(self) -> None:
        if not self.titles and (self.answer == "title" or not self.item_tokens):
            raise ValueError("prompt.titles: false needs item_tokens (an item is then only its "
                             "token) and an "
                             "index or head answer (a title answer needs titles)")
        if self.answer not in ANSWER_MODES:
            raise ValueError(f"prompt.answer must be one of {ANSWER_MODES}, got {self.answer!r}")
        if self.image_tokens not in IMAGE_TOKEN_MODES:
            raise ValueError(f"prompt.image_tokens must be one of {IMAGE_TOKEN_MODES}, got "
                             f"{self.image_tokens!r}")
        if self.user_token and not self.item_tokens:
            raise ValueError("prompt.user_token needs prompt.item_tokens: the user token is the "
                             "recommender's "
                             "state over the history's item tokens")
        if self.title_words < 0:
            raise ValueError(f"prompt.title_words must be >= 0, got {self.title_words}")
        if self.title_budget < 0 or (self.title_budget and not self.item_tokens):
            raise ValueError("prompt.title_budget must be >= 0, and a positive budget needs "
                             "item_tokens (an item beyond it is only its item token), got "
                             f"{self.title_budget}")

    @property
    def needs_encoder(self) -> bool:
        """Whether the model needs an :class:`hanorec.item_tokens.ItemEncoder`."""
        return self.item_tokens or self.image_tokens == "pooled" or self.answer == "head"

    def display_title(self, title: str) -> str:
        """The title as the prompt shows it (year and words cut as configured)."""
        if not self.title_year:
            title = _YEAR.sub("", title) or title
        if self.title_words:
            title = " ".join(title.split()[: self.title_words])
        return title


DEFAULT_STYLE = PromptStyle()


class _Writer:
    """Accumulates a user turn's content parts, images and placeholder slots in text order.

    Text goes into the current part until :meth:`close` (or an image) ends it, so a history
    item is one text part and the question another, as in the layout above.
    """

    def __init__(self, catalog: Catalog, style: PromptStyle) -> None:
        self.catalog, self.style = catalog, style
        self.content: list[dict[str, Any]] = []
        self.images: list[Path] = []
        self.slots: list[tuple[str, str | None]] = []
        self._open: list[str] = []

    def text(self, text: str) -> None:
        self._open.append(text)

    def close(self) -> None:
        if self._open:
            self.content.append({"type": "text", "text": "".join(self._open)})
            self._open = []

    def placeholder(self, kind: str, item_id: str | None) -> None:
        self.text(PLACEHOLDERS[kind])
        self.slots.append((kind, item_id))

    def image(self, item_id: str, path: Path) -> None:
        if self.style.image_tokens == "pooled":
            self.placeholder("poster", item_id)
        else:
            self.close()
            self.content.append({"type": "image"})
            self.images.append(path)

    def item(self, item_id: str, prefix: str = "", suffix: str = "\n",
             kind: str = "mention") -> None:
        """``prefix"Title"<|item|>suffix`` (the item token only when the style has them, the
        title only when it shows titles); ``kind`` is ``item`` for history items, ``mention``
        for candidates and queries."""
        self.text(prefix)
        if self.style.titles:
            self.text(f'"{self.style.display_title(self.catalog.title(item_id))}"')
        if self.style.item_tokens:
            self.placeholder(kind, item_id)
        self.text(suffix)


def _question(writer: _Writer, row: Mapping[str, Any], protocol: str) -> None:
    """Write the protocol's question (and candidate list) for the style's answer mode."""
    catalog, style = writer.catalog, writer.style
    noun = catalog.item_noun
    verb = VERBS.get(noun, "choose")
    if protocol not in ("hit1", "hit3", "candidates", "full"):
        raise ValueError(f"unknown protocol {protocol!r}")
    if style.answer == "head" or protocol == "full":
        tail = "" if style.answer == "head" else " Answer with its title."
        writer.text(f"Which {noun} will the user {verb} next?{tail}")
        return
    if protocol == "hit1":
        writer.item(row["query"], prefix="Will the user like ", suffix="? Answer Yes or No.")
        return
    writer.text("Candidates:\n")
    candidates = list(row["candidates"])
    if style.answer == "index" and len(candidates) > len(LABELS):
        raise ValueError(f"answer: index labels at most {len(LABELS)} candidates, the row has "
                         f"{len(candidates)}")
    for number, item in enumerate(candidates):
        writer.item(item, prefix=f"{LABELS[number]}. " if style.answer == "index" else "")
    what = "letter" if style.answer == "index" else "title"
    if protocol == "hit3":
        writer.text(f"Which 3 of these {noun}s is the user most likely to {verb} next? Answer "
                    "with their "
                    f"{what}s, most likely first, one per line.")
    else:
        writer.text(f"Which {noun} will the user {verb} next? Answer with its {what}.")


def build_prompt(row: Mapping[str, Any], catalog: Catalog, protocol: str, *, image_budget: int,
                 max_items: int | None = None, with_images: bool = True,
                 style: PromptStyle = DEFAULT_STYLE) -> Prompt:
    """Render one prepared row as chat messages.

    Args:
        row: A row of a prepared protocol dataset (``history`` oldest first, plus
            ``candidates`` / ``query`` as the protocol needs).
        catalog: Titles and images by item id.
        protocol: ``hit1``, ``hit3``, ``candidates`` or ``full``.
        image_budget: How many of the most recent history items get their image.
        max_items: Keep only the most recent `max_items` history items (None: all).
        with_images: False renders a text-only ("blind", BPO) prompt.
        style: Answer mode, item tokens, title shortening, system prompt.

    Raises:
        ValueError: Empty history (after truncation) or an unknown protocol.
    """
    if protocol == GENERAL:
        return _general_prompt(row, catalog, with_images=with_images)
    history = list(row["history"])
    if max_items is not None:
        history = history[-max_items:] if max_items > 0 else []
    if not history:
        raise ValueError(f"row of user {row.get('user_id')!r} has an empty history")
    writer = _Writer(catalog, style)
    writer.text(f"A user interacted with these {catalog.item_noun}s, oldest first:\n")
    writer.close()
    first_with_image = len(history) - max(image_budget, 0)
    first_with_title = len(history) - style.title_budget if style.title_budget else 0
    for position, item_id in enumerate(history):
        if position and position == first_with_title:
            writer.close()  # ends the run of bare item tokens
        path = catalog.image_path(item_id) if with_images and position >= first_with_image else None
        if path is not None:
            writer.image(item_id, path)
        if position < first_with_title:  # beyond the title budget: the item token alone
            writer.placeholder("item", item_id)
            continue
        writer.item(item_id, kind="item")
        writer.close()
    _question(writer, row, protocol)
    writer.close()
    messages = [{"role": "user", "content": writer.content}]
    if style.system_prompt is not None:
        messages.insert(0,
                        {"role": "system",
                         "content": [{"type": "text", "text": style.system_prompt}]})
    suffix = ""
    if style.user_token:  # last, after the generation prompt: the answer position
        suffix = PLACEHOLDERS["user"]
        writer.slots.append(("user", None))
    return Prompt(messages, writer.images, len(history), writer.slots, suffix,
                  int(row.get(VIEW_FIELD) or 0))


def conversation_turns(text: str) -> list[tuple[str, str]]:
    """Split ``USER: … ASSISTANT: …`` text into ``(role, text)`` turns (``user``/``assistant``).

    Text before the first marker belongs to the first user turn; consecutive turns of one role
    are joined with a newline; a trailing empty ``ASSISTANT:`` (the generation slot) is dropped.

    Raises:
        ValueError: The conversation does not end with a user turn.
    """
    parts = _TURN_MARKER.split(text)
    turns: list[tuple[str, str]] = [("user", parts[0].strip())] if parts[0].strip() else []
    for marker, body in zip(parts[1::2], parts[2::2]):
        role = "user" if marker == "USER" else "assistant"
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]}\n{body.strip()}".strip())
        else:
            turns.append((role, body.strip()))
    if turns and turns[-1] == ("assistant", ""):
        turns.pop()
    if not turns or turns[-1][0] != "user":
        raise ValueError("conversation must end with a user turn (or an empty ASSISTANT:): "
                         f"{text[:80]!r}")
    return turns


def _general_prompt(row: Mapping[str, Any], catalog: Catalog, *, with_images: bool) -> Prompt:
    """Chat messages of a ``general`` row (``prompt`` with ``<image>``, relative ``images``)."""
    relative = list(row.get("images") or [])
    turns = conversation_turns(row["prompt"])
    placeholders = sum(body.count(IMAGE_PLACEHOLDER) for _, body in turns)
    if placeholders > len(relative):
        raise ValueError(f"row {row.get('user_id')!r}: {placeholders} {IMAGE_PLACEHOLDER} "
                         f"placeholders but {len(relative)} images")
    if relative and catalog.image_root is None:
        raise ValueError(f"row {row.get('user_id')!r} has images but the catalog has no image_root")
    paths = [safe_image_path(catalog.image_root, rel) for rel in relative]
    leading = len(paths) - placeholders  # images with no placeholder open the first user turn
    messages, images, next_image = [], [], 0
    for number, (role, body) in enumerate(turns):
        pieces = body.split(IMAGE_PLACEHOLDER)
        content: list[dict[str, Any]] = []
        slots = leading if number == 0 else 0
        for index, piece in enumerate(pieces):
            for _ in range(slots):
                if with_images:
                    content.append({"type": "image"})
                    images.append(paths[next_image])
                next_image += 1
            if piece.strip():
                content.append({"type": "text", "text": piece})
            slots = 1 if index < len(pieces) - 1 else 0
        messages.append({"role": role, "content": content})
    return Prompt(messages, images, 0)


def response_text(answer: str, catalog: Catalog, *, free_text: bool = False) -> str:
    """The assistant response for `answer`: ``Yes`` / ``No`` as is, an item id -> its title.

    With ``free_text`` (``general`` rows) an answer that is not an item id is returned unchanged;
    without it an unknown id is a KeyError (a recommendation row naming a missing item).
    """
    if answer in ANSWERS or (free_text and answer not in catalog.index):
        return answer
    return catalog.title(answer)


def plain_text(messages: list[dict[str, Any]]) -> str:
    """A readable rendering of messages without a tokenizer (``<image>`` marks images)."""
    parts = []
    for message in messages:
        body = "".join("<image>" if c["type"] == "image" else c["text"]
                       for c in message["content"])
        parts.append(f"<|{message['role']}|>\n{body}")
    return "\n".join(parts) + "\n<|assistant|>\n"
