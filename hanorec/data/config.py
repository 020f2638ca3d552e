"""Configuration of the data stage (`data:` section of a recipe)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("recbole", "ml-100k", "ml-1m", "amazon2023", "table")
PROTOCOLS = ("hit1", "hit3", "candidates", "full")
MISSING_IMAGE_POLICIES = ("error", "placeholder", "text-only")
NEGATIVE_SAMPLING = ("random", "popular", "hard")


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
                          "training popularity; `hard` needs item embeddings (API only)."},
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

    def __post_init__(self) -> None:
        checks = [
            (self.dataset_format in FORMATS, f"dataset_format must be one of {FORMATS}"),
            (set(self.protocols) <= set(PROTOCOLS) and self.protocols,
             f"protocols must be a non-empty subset of {PROTOCOLS}"),
            (self.missing_image_policy in MISSING_IMAGE_POLICIES,
             f"missing_image_policy must be one of {MISSING_IMAGE_POLICIES}"),
            (self.negative_sampling in NEGATIVE_SAMPLING,
             f"negative_sampling must be one of {NEGATIVE_SAMPLING}"),
            (self.split in ("leave-one-out", "temporal"), "split: leave-one-out or temporal"),
            (self.tie_break in ("line", "item_id"), "tie_break: line or item_id"),
            (self.num_candidates >= 2 and self.hit3_candidates >= 3,
             "num_candidates >= 2 and hit3_candidates >= 3"),
            (self.num_negatives >= 1, "num_negatives >= 1"),
            (self.min_history >= 1, "min_history >= 1 (an empty history never reaches a prompt)"),
            (self.max_history >= self.min_history, "max_history >= min_history"),
            (len(self.temporal_quantiles) == 2
             and 0 < self.temporal_quantiles[0] < self.temporal_quantiles[1] < 1,
             "temporal_quantiles: two values 0 < q1 < q2 < 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DataConfig: {message}")

    def resolve_cache(self) -> Path:
        """The cache dir this config refers to by `{cache}`."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def path(self, value: str | None) -> Path | None:
        """Expand `{cache}`, `~` and environment variables in a path field."""
        if value is None:
            return None
        text = os.path.expandvars(value).replace("{cache}", str(self.resolve_cache()))
        return Path(text).expanduser()
