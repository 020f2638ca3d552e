"""The ``prompt:`` section of a recipe: how prepared rows become prompts.

One dataclass shared by every stage (SFT, DPO, RecPO, BPO, evaluation) and by
``python -m hanorec.data show``, so that training, evaluation and the rows a user inspects
are rendered from the same fields. :meth:`PromptConfig.style` turns it into the
:class:`hanorec.data.prompts.PromptStyle` the renderer takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hanorec.data.prompts import ANSWER_MODES, IMAGE_TOKEN_MODES, PromptStyle

__all__ = ["PromptConfig"]


@dataclass
class PromptConfig:
    """How rows become prompts; shared by training and evaluation so both see the same text."""

    image_budget: int = field(default=5, metadata={
        "help": "Only the most recent N history items carry their image (the rest are titles), "
                "so prompts fit the context (HaNoRec interleaves titles and posters)."})
    max_length: int = field(default=1024, metadata={
        "help": "Token budget of prompt + response; the oldest history items are dropped whole "
                "to fit, never cutting image tokens."})
    with_images: bool = field(default=True, metadata={
        "help": "Render images; false gives the text-only (blind) prompts used by the `SFT "
                "text-only` ablation and BPO."})
    answer: Literal[ANSWER_MODES] = field(default="title", metadata={  # type: ignore[valid-type]
        "help": "Read-out of the model's choice: `title` = the item's title as the response "
                "(its log-likelihood scores it), `index` = candidates listed with letters and "
                "the single label token as the response (LlamaRec, Yue et al. 2023: every "
                "candidate scored from one forward), `head` = a ranking head over the "
                "answer-position state scores item vectors (R2ec arXiv 2505.16994; "
                "docs/guide.md, 'Read-outs')."})
    item_tokens: bool = field(default=False, metadata={
        "help": "One collaborative token after each history, candidate and query title: a "
                "SASRec item embedding through a trainable MLP (LLaRA's hybrid item "
                "representation, Liao et al. SIGIR 2024); the recommender trains on the "
                "training split (collab section)."})
    user_token: bool = field(default=False, metadata={
        "help": "A user token after the history: the recommender's sequence state over the "
                "history shown, projected (A-LLMRec, Kim et al. KDD 2024). Needs item_tokens."})
    image_tokens: Literal[IMAGE_TOKEN_MODES] = field(default="full", metadata={  # type: ignore[valid-type]
        "help": "`full`: every image through the vision tower, one token per vision feature; "
                "`pooled`: one token per image, the mean of its vision features computed once "
                "per item (vision tower and projector frozen)."})
    title_words: int = field(default=0, metadata={
        "help": "Keep only the first N words of each title in prompts and title answers (0: "
                "whole titles)."})
    title_year: bool = field(default=True, metadata={
        "help": "Keep a trailing '(1995)' in titles (false saves ~6 digit tokens per title in "
                "byte-level tokenizers)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System message replacing the chat template's default one (None: the template's "
                "own; SmolLM2's costs ~20 tokens per prompt)."})
    titles: bool = field(default=True, metadata={
        "help": "Show item titles; false leaves each item as its item token only (the ablation "
                "of what titles add; needs item_tokens and an index or head answer)."})

    title_budget: int = field(default=0, metadata={
        "help": "Only the most recent N history items show their title; older ones are their "
                "collaborative item token alone, one token each, so a long history (data "
                "max_history) feeds the item tokens and the user token without a long text "
                "(0: every item shows its title). Needs item_tokens."})

    def style(self) -> PromptStyle:
        """The prompt style these fields describe."""
        return PromptStyle(answer=self.answer, item_tokens=self.item_tokens,
                           user_token=self.user_token,
                           image_tokens=self.image_tokens, title_words=self.title_words,
                           title_year=self.title_year, system_prompt=self.system_prompt,
                           titles=self.titles, title_budget=self.title_budget)

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise ValueError(f"prompt.max_length must be positive, got {self.max_length}")
        if self.image_budget < 0:
            raise ValueError(f"prompt.image_budget must be >= 0, got {self.image_budget}")
        self.style()  # validates the combination
