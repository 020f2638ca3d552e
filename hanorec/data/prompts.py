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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hanorec.data.catalog import Catalog
from hanorec.data.images import safe_image_path

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
    """

    messages: list[dict[str, Any]]
    image_paths: list[Path] = field(default_factory=list)
    num_history_items: int = 0


def _quoted(catalog: Catalog, item_id: str) -> str:
    return f'"{catalog.title(item_id)}"'


def _question(row: Mapping[str, Any], catalog: Catalog, protocol: str) -> str:
    noun = catalog.item_noun
    verb = VERBS.get(noun, "choose")
    if protocol == "hit1":
        return f"Will the user like {_quoted(catalog, row['query'])}? Answer Yes or No."
    if protocol == "full":
        return f"Which {noun} will the user {verb} next? Answer with its title."
    listing = "\n".join(_quoted(catalog, item) for item in row["candidates"])
    if protocol == "hit3":
        ask = (f"Which 3 of these {noun}s is the user most likely to {verb} next? Answer with "
               "their titles, most likely first, one per line.")
    elif protocol == "candidates":
        ask = f"Which {noun} will the user {verb} next? Answer with its title."
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    return f"Candidates:\n{listing}\n{ask}"


def build_prompt(row: Mapping[str, Any], catalog: Catalog, protocol: str, *, image_budget: int,
                 max_items: int | None = None, with_images: bool = True) -> Prompt:
    """Render one prepared row as chat messages.

    Args:
        row: A row of a prepared protocol dataset (``history`` oldest first, plus
            ``candidates`` / ``query`` as the protocol needs).
        catalog: Titles and images by item id.
        protocol: ``hit1``, ``hit3``, ``candidates`` or ``full``.
        image_budget: How many of the most recent history items get their image.
        max_items: Keep only the most recent `max_items` history items (None: all).
        with_images: False renders a text-only ("blind", BPO) prompt.

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
    noun = catalog.item_noun
    content: list[dict[str, Any]] = [{"type": "text", "text": (
        f"A user interacted with these {noun}s, oldest first:\n")}]
    images: list[Path] = []
    first_with_image = len(history) - max(image_budget, 0)
    for position, item_id in enumerate(history):
        path = catalog.image_path(item_id) if with_images and position >= first_with_image else None
        if path is not None:
            content.append({"type": "image"})
            images.append(path)
        content.append({"type": "text", "text": f"{_quoted(catalog, item_id)}\n"})
    content.append({"type": "text", "text": _question(row, catalog, protocol)})
    return Prompt([{"role": "user", "content": content}], images, len(history))


def conversation_turns(text: str) -> list[tuple[str, str]]:
    """Split ``USER: … ASSISTANT: …`` text into ``(role, text)`` turns (roles ``user``/``assistant``).

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
        raise ValueError(f"conversation must end with a user turn (or an empty ASSISTANT:): {text[:80]!r}")
    return turns


def _general_prompt(row: Mapping[str, Any], catalog: Catalog, *, with_images: bool) -> Prompt:
    """Chat messages of a ``general`` row (``prompt`` with ``<image>``, ``images`` relative paths)."""
    relative = list(row.get("images") or [])
    turns = conversation_turns(row["prompt"])
    placeholders = sum(body.count(IMAGE_PLACEHOLDER) for _, body in turns)
    if placeholders > len(relative):
        raise ValueError(f"row {row.get('user_id')!r}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(relative)} images")
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
