"""User folds for cross-fitting: which recommender gives a training row its features.

Stacking an LLM on a recommender needs, for every training row, the features that recommender
would give a user it never trained on (:mod:`hanorec.collab`). Group K-fold by user does it:
each user falls in one of K folds by a seeded hash of its id, fold model ``k`` trains on every
user outside fold ``k``, and the training rows of a fold-``k`` user read it — *view* ``k + 1``;
view 0 is the model trained on every user (validation and test rows). The hash makes the
assignment a function of the id alone: any stage recomputes it without the training data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from hanorec.data.prompts import VIEW_FIELD

__all__ = ["fold_view", "tag_views", "user_fold"]


def user_fold(user_id: str, folds: int, seed: int = 0) -> int:
    """The fold of a user: a seeded hash (BLAKE2b) of its id modulo ``folds``, stable across
    runs, processes and machines."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    digest = hashlib.blake2b(f"{seed}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % folds


def fold_view(user_id: str, folds: int, seed: int = 0) -> int:
    """The view a *training* row of ``user_id`` reads under K-fold cross-fitting: 1..K."""
    return 1 + user_fold(str(user_id), folds, seed)


def tag_views(rows: Sequence[Mapping[str, Any]], folds: int,
              seed: int = 0) -> list[dict[str, Any]]:
    """Training rows with ``collab_view`` set to their user's fold view (unchanged copies when
    ``folds`` is 0: no cross-fitting)."""
    if not folds:
        return [dict(r) for r in rows]
    return [{**r, VIEW_FIELD: fold_view(str(r["user_id"]), folds, seed)} for r in rows]
