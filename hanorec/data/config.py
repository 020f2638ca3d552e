"""Configuration of the data stage (`data:` section of a recipe)."""

from __future__ import annotations

import codecs
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from hanorec.config import FieldError

FORMATS = ("recbole", "ml-100k", "ml-1m", "amazon2023", "table")
PROTOCOLS = ("hit1", "hit3", "candidates", "full")
MISSING_IMAGE_POLICIES = ("error", "placeholder", "text-only")
NEGATIVE_SAMPLING = ("random", "popular", "hard", "policy", "collab")
#: Strategies whose negatives a model draws in the preference stage (hanorec.negatives); the
#: prepared pairs then hold random placeholders, and the prepared data is that of ``random``.
MODEL_NEGATIVES = ("policy", "collab")
LONG_TITLE_POLICIES = ("truncate", "error")
LARGE_IMAGE_POLICIES = ("downscale", "error")
#: Accepted ratings per format when ``rating_range`` is None: the formats' own scales
#: (ml-1m's ``ratings.dat`` layout is shared by ML-10M/20M, which have half stars).
DEFAULT_RATING_RANGES = {"ml-100k": (1.0, 5.0), "ml-1m": (0.5, 5.0), "amazon2023": (1.0, 5.0),
                         "recbole": (0.0, 1e9), "table": (0.0, 1e9)}


def default_cache_dir() -> Path:
    """Return the data cache: ``$HANOREC_CACHE`` or ``~/.cache/hanorec``."""
    return Path(os.environ.get("HANOREC_CACHE") or Path.home() / ".cache" / "hanorec")


@dataclass
class DataConfig:
    """Everything `python -m hanorec.data prepare` needs (field names are CLI flags)."""

    dataset_format: str = field(
        default="recbole",
        metadata={"help": f"Source format, one of {FORMATS}. `table` reads any CSV/TSV/Parquet "
                          "(MicroLens, Netflix, ...) with the *_column fields."},
    )
    interactions_path: str = field(
        default="{cache}/ml-100k/ml-100k.inter",
        metadata={"help": "Interactions file (u.data, ratings.dat, *.inter, <Category>.jsonl, "
                          "or a table). A leading `{cache}` is the cache dir."},
    )
    items_path: str = field(
        default="{cache}/ml-100k/ml-100k.item",
        metadata={"help": "Item catalogue (u.item, movies.dat, *.item, meta_<Category>.jsonl, "
                          "or a table with id and title)."},
    )
    image_root: str | None = field(
        default=None,
        metadata={"help": "Folder of item images `<item_id>.<jpg|jpeg|png|webp>` (or paths from "
                          "image_column, relative to it). None: every item is text-only."},
    )
    image_column: str | None = field(
        default=None,
        metadata={"help": "Items-table column holding each item's image path relative to "
                          "image_root (instead of `<item_id>.<ext>`)."},
    )
    missing_image_policy: str = field(
        default="error",
        metadata={"help": f"What to do with a missing or corrupt image: {MISSING_IMAGE_POLICIES}. "
                          "`placeholder` uses a generated grey image; counts go to the manifest."},
    )
    output_dir: str = field(
        default="{cache}/prepared/ml-100k",
        metadata={"help": "Where the prepared datasets, pairs, items and manifest.json go."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Data cache (what `{cache}` means); default $HANOREC_CACHE or "
                          "~/.cache/hanorec."},
    )
    protocols: list[str] = field(
        default_factory=lambda: list(PROTOCOLS),
        metadata={"help": f"Evaluation/training protocols to build, subset of {PROTOCOLS}."},
    )
    num_candidates: int = field(
        default=20,
        metadata={"help": "Candidate list size of the `candidates` protocol: target + N-1 "
                          "negatives (S-DPO / LLaRA use 20)."},
    )
    hit3_candidates: int = field(
        default=5, metadata={"help": "Candidate list size of the `hit3` protocol."}
    )
    num_negatives: int = field(
        default=3,
        metadata={"help": "K rejected items per preference pair (S-DPO uses 3; DPO uses 1)."},
    )
    negative_sampling: str = field(
        default="random",
        metadata={"help": f"How rejected items are drawn: {NEGATIVE_SAMPLING}. `popular` by "
                          "training popularity; `hard`: nearest the target (with prompt.answer "
                          "head: by the ranking head's item vectors, the space the policy ranks "
                          "with; else by the HaRS item embeddings); `policy`: the starting "
                          "policy's own top-ranked wrong items (self-play, SPRec/RoDPO), "
                          "`collab`: the collaborative recommender's, both drawn in the "
                          "preference stage from a top pool (dpo.negative_pool, "
                          "negative_scope, negative_refresh; hanorec.negatives)."},
    )
    split: str = field(
        default="leave-one-out",
        metadata={"help": "`leave-one-out` (test = last, validation = second last per user) or "
                          "`temporal` (global timestamp quantiles temporal_quantiles)."},
    )
    temporal_quantiles: list[float] = field(
        default_factory=lambda: [0.8, 0.9],
        metadata={"help": "Timestamp quantiles q1 < q2 of the temporal split: train < q1 <= "
                          "validation < q2 <= test."},
    )
    tie_break: str = field(
        default="line",
        metadata={"help": "Order of a user's interactions with equal timestamps: `line` (source "
                          "file order) or `item_id` (numeric when all ids are digits)."},
    )
    min_history: int = field(
        default=1,
        metadata={"help": "Minimum number of history items before a target; users too short for "
                          "a validation target are dropped and counted."},
    )
    max_history: int = field(
        default=20, metadata={"help": "Most recent N items kept in each row's history."}
    )
    k_core: int = field(
        default=0,
        metadata={"help": "Iterative k-core filter (users and items with >= k interactions); "
                          "0 disables it."},
    )
    min_rating: float | None = field(
        default=None,
        metadata={"help": "Keep only interactions with rating >= this (implicit feedback); None "
                          "keeps all."},
    )
    drop_unknown_items: bool = field(
        default=False,
        metadata={"help": "Drop interactions whose item is missing from the catalogue (counted) "
                          "instead of failing."},
    )
    train_targets_per_user: int | None = field(
        default=None,
        metadata={"help": "Keep the most recent N training targets per user (None = all)."},
    )
    data_seed: int = field(
        default=0, metadata={"help": "Seed of candidate, hit1-query and negative sampling."}
    )
    item_noun: str = field(
        default="item", metadata={"help": "Noun used in prompts (`movie`, `product`, ...)."}
    )
    user_column: str = field(
        default="user_id", metadata={"help": "`table` format: user id column."}
    )
    item_column: str = field(
        default="item_id", metadata={"help": "`table` format: item id column of interactions."}
    )
    timestamp_column: str = field(
        default="timestamp", metadata={"help": "`table` format: timestamp column (numeric)."}
    )
    rating_column: str | None = field(
        default=None, metadata={"help": "`table` format: optional rating column."}
    )
    item_id_column: str = field(
        default="item_id", metadata={"help": "`table` format: item id column of the items table."}
    )
    title_column: str = field(
        default="title", metadata={"help": "`table` format: title column of the items table."}
    )
    genres_column: str | None = field(
        default=None, metadata={"help": "`table` format: optional genres/categories column."}
    )
    genres_separator: str = field(
        default="|", metadata={"help": "`table` format: separator inside genres_column."}
    )
    poster_width: int = field(
        default=224, metadata={"help": "Width in pixels of rendered synthetic posters."}
    )
    poster_height: int = field(
        default=336, metadata={"help": "Height in pixels of rendered synthetic posters."}
    )
    encoding: str | None = field(
        default=None,
        metadata={"help": "Text encoding of the source files (e.g. latin-1, cp1252). None: UTF-8, "
                          "latin-1 for MovieLens u.item/movies.dat. A UTF-8 byte-order mark at "
                          "the start of any file is removed."},
    )
    rating_range: list[float] | None = field(
        default=None,
        metadata={"help": "Accepted [low, high] of ratings; a rating outside is an error naming "
                          "its line. None: 1-5 for ml-100k and amazon2023, 0.5-5 for ml-1m, "
                          "0-1e9 for recbole and table."},
    )
    max_title_chars: int = field(
        default=200,
        metadata={"help": "Longest title kept, in characters; longer ones follow "
                          "long_title_policy (a title fills every prompt it appears in)."},
    )
    long_title_policy: str = field(
        default="truncate",
        metadata={"help": f"What to do with a title over max_title_chars: {LONG_TITLE_POLICIES}. "
                          "`truncate` cuts it at a word boundary and appends an ellipsis "
                          "(counted)."},
    )
    max_image_pixels: int = field(
        default=16_000_000,
        metadata={"help": "Largest image (width x height) used as is; larger ones follow "
                          "large_image_policy."},
    )
    large_image_policy: str = field(
        default="downscale",
        metadata={"help": f"What to do with an image over max_image_pixels: "
                          f"{LARGE_IMAGE_POLICIES}. `downscale` writes a smaller copy into "
                          "output_dir/images (counted)."},
    )

    def __post_init__(self) -> None:
        for name, ok, message in self._checks():
            if not ok:
                raise FieldError("DataConfig", name, message)

    def _checks(self) -> list[tuple[str, bool, str]]:
        """``(field, holds, message)`` for every range check (the first failing one is raised)."""
        low_high = self.rating_range
        candidate_sizes = [n for p, n in (("candidates", self.num_candidates),
                                          ("hit3", self.hit3_candidates)) if p in self.protocols]
        return [
            ("dataset_format", self.dataset_format in FORMATS, f"must be one of {FORMATS}"),
            ("protocols", bool(self.protocols) and set(self.protocols) <= set(PROTOCOLS),
             f"must be a non-empty subset of {PROTOCOLS}"),
            ("missing_image_policy", self.missing_image_policy in MISSING_IMAGE_POLICIES,
             f"must be one of {MISSING_IMAGE_POLICIES}"),
            ("negative_sampling", self.negative_sampling in NEGATIVE_SAMPLING,
             f"must be one of {NEGATIVE_SAMPLING}"),
            ("split", self.split in ("leave-one-out", "temporal"),
             f"must be leave-one-out or temporal, got {self.split!r}"),
            ("tie_break", self.tie_break in ("line", "item_id"),
             f"must be line or item_id, got {self.tie_break!r}"),
            ("num_candidates", self.num_candidates >= 2,
             f"must be >= 2, got {self.num_candidates}"),
            ("hit3_candidates", self.hit3_candidates >= 3,
             f"must be >= 3, got {self.hit3_candidates}"),
            ("num_negatives", self.num_negatives >= 1,
             f"must be >= 1, got {self.num_negatives}"),
            ("num_negatives", all(self.num_negatives <= n - 1 for n in candidate_sizes),
             f"{self.num_negatives} must be below every candidate list size "
             f"{candidate_sizes} (rejected items come from a row's candidates)"),
            ("min_history", self.min_history >= 1,
             f"must be >= 1 (an empty history never reaches a prompt), got {self.min_history}"),
            ("max_history", self.max_history >= self.min_history,
             f"must be >= min_history ({self.min_history}), got {self.max_history}"),
            ("k_core", self.k_core >= 0, f"must be >= 0 (0: off), got {self.k_core}"),
            ("train_targets_per_user",
             self.train_targets_per_user is None or self.train_targets_per_user >= 1,
             f"must be >= 1 or null (all), got {self.train_targets_per_user}"),
            ("min_rating", self.min_rating is None or math.isfinite(self.min_rating),
             "must be a finite number or null"),
            ("rating_range", low_high is None or (
                len(low_high) == 2 and all(math.isfinite(v) for v in low_high)
                and low_high[0] <= low_high[1]),
             f"must be two finite numbers [low, high] with low <= high, got "
             f"{low_high}"),
            ("temporal_quantiles", len(self.temporal_quantiles) == 2
             and 0 < self.temporal_quantiles[0] < self.temporal_quantiles[1] < 1,
             f"must be two values 0 < q1 < q2 < 1, got {self.temporal_quantiles}"),
            ("data_seed", self.data_seed >= 0, f"must be >= 0, got {self.data_seed}"),
            ("poster_width", self.poster_width >= 1 and self.poster_height >= 1,
             "poster_width and poster_height must be >= 1"),
            ("encoding", self.encoding is None or _known_codec(self.encoding),
             f"unknown text encoding {self.encoding!r} (e.g. utf-8, latin-1, cp1252)"),
            ("max_title_chars", self.max_title_chars >= 8,
             f"must be >= 8, got {self.max_title_chars}"),
            ("long_title_policy", self.long_title_policy in LONG_TITLE_POLICIES,
             f"must be one of {LONG_TITLE_POLICIES}"),
            ("max_image_pixels", self.max_image_pixels >= 1,
             f"must be >= 1, got {self.max_image_pixels}"),
            ("large_image_policy", self.large_image_policy in LARGE_IMAGE_POLICIES,
             f"must be one of {LARGE_IMAGE_POLICIES}"),
        ]

    def ratings_allowed(self) -> tuple[float, float]:
        """The accepted ``(low, high)`` of ratings: ``rating_range`` or the format's default."""
        if self.rating_range is not None:
            return float(self.rating_range[0]), float(self.rating_range[1])
        return DEFAULT_RATING_RANGES[self.dataset_format]

    def resolve_cache(self) -> Path:
        """The cache dir this config refers to by `{cache}`."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def path(self, value: str | None) -> Path | None:
        """Expand `{cache}`, `~` and environment variables in a path field."""
        if value is None:
            return None
        text = os.path.expandvars(value).replace("{cache}", str(self.resolve_cache()))
        return Path(text).expanduser()


def _known_codec(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True
