"""Learnability checks: a tiny backbone learns what the collaborative tokens carry.

A synthetic catalogue whose titles say nothing (every item is "Movie") and that has no images:
the only way to tell items apart is the collaborative modality. Users walk through the
catalogue in order (item k is followed by item k+1, with a random start), so the next item is
recoverable from the recommender's item embeddings and user state, and from nothing else.

* **Overfit**: SFT on 24 training rows until their own HR@1 (20-way… here 6-way candidates,
  ranked by the head) is at least 0.9.
* **Planted signal**: a short SFT on the held-out training rows; HR@1 on the *test* split's
  users (never trained on) must be far above chance (1/6).

Both fail when the collaborative tokens are switched off (every item then has the same title
vector and the same score: HR@1 0 with pessimistic ties) or when the head scores the wrong
items — checked once by breaking them when these tests were written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PLANTED_USERS

from hanorec import sft
from hanorec.metrics import target_ranks
from hanorec.models.lineage import load_trained
from hanorec.runtime import load_catalog, load_rows, make_collator
from hanorec.scoring import candidate_scores
from hanorec.sft import SFTRun


def hr1(recipe: Path, final: Path, rows: list[dict]) -> float:
    """HR@1 (pessimistic ties) of the trained model's head on ``rows``."""
    from hanorec import config

    run = config.parse(SFTRun, ["--config", str(recipe)], prog="t", description="")
    prepared = run.data.path(run.data.output_dir)
    model, processor = load_trained(run.model, final)
    collator = make_collator(processor, load_catalog(run.data, prepared), "candidates", run.prompt)
    scores = candidate_scores(model, collator, rows, batch_size=16, progress=False)
    return float(np.mean(target_ranks(scores, [r["target_index"] for r in rows]) == 1))


@pytest.mark.slow
def test_overfit_24_rows(planted_recipe):
    """24 training rows, 60 steps of 8 (20 epochs): HR@1 on those rows >= 0.9."""
    recipe = planted_recipe(sft={"max_train_examples": 24, "max_steps": 60},
                            collab={"collab_fit": "insample"})
    final = sft.main(["--config", str(recipe)])
    trained = _trained_rows(recipe)
    assert len(trained) == 24
    assert hr1(recipe, final, trained) >= 0.9


def _trained_rows(recipe: Path) -> list[dict]:
    from hanorec import config
    from hanorec.collab import collab_features

    run = config.parse(SFTRun, ["--config", str(recipe)], prog="t", description="")
    prepared = run.data.path(run.data.output_dir)
    catalog = load_catalog(run.data, prepared)
    return sft.training_rows(prepared, run, catalog,
                             collab_features(prepared, len(catalog), run.collab, log=None))


@pytest.mark.slow
def test_planted_signal_generalises_to_test_users(planted_recipe):
    """SFT on every training row with cross-fitted features (3 user folds), 200 steps of 8: the
    test split's HR@1 (48 users, 6 candidates, chance 1/6) is at least 0.6."""
    recipe = planted_recipe(sft={"max_steps": 200})
    final = sft.main(["--config", str(recipe)])
    prepared = Path(yaml.safe_load(recipe.read_text())["data"]["output_dir"])
    test_rows = load_rows(prepared, ["candidates"], "test")
    assert len(test_rows) == PLANTED_USERS
    assert hr1(recipe, final, test_rows) >= 0.6
