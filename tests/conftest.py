"""Shared test fixtures: tiny built-in backbones and a small catalogue with real image files.

Fixtures (reuse them; do not rebuild models in individual tests):

* ``tiny_backbone_dirs`` (session) — ``{name: folder}`` for ``tiny-llava``, ``tiny-qwen2-vl``
  and ``tiny-idefics3``, each built ONCE per test session into a temporary folder with
  :func:`hanorec.models.tiny.build_tiny_backbone` (seeded, ~0.3 s each) and saved with
  ``save_pretrained`` (safetensors + processor files).
* ``tiny_model_config`` (function) — a factory ``tiny_model_config(name, **overrides)`` returning
  a :class:`hanorec.models.config.ModelConfig` that points at the prebuilt folder, so
  ``load_backbone(cfg)`` runs the real loading path without building anything.
* ``tiny_catalog`` (session) — a :class:`hanorec.data.catalog.Catalog` of 12 items (``i0`` …
  ``i11``) with titles ``"Title k (1990+k)"``; items ``i0``–``i9`` have a 40×48 PNG each (solid
  colour, non-square on purpose), ``i10``–``i11`` are text-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_NAMES = ("tiny-llava", "tiny-qwen2-vl", "tiny-idefics3")
PLANTED_ITEMS, PLANTED_USERS = 24, 48


@pytest.fixture(scope="session")
def tiny_backbone_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build each tiny backbone once per session; return ``{name: save_pretrained folder}``."""
    from hanorec.models.tiny import build_tiny_backbone

    root = tmp_path_factory.mktemp("tiny_backbones")
    return {name: build_tiny_backbone(name, root / name) for name in TINY_NAMES}


@pytest.fixture
def tiny_model_config(tiny_backbone_dirs: dict[str, Path]) -> Callable[..., object]:
    """Factory: ``tiny_model_config("tiny-llava", use_lora=False)`` → ModelConfig on the prebuilt
    folder."""
    from hanorec.models.config import ModelConfig

    def make(name: str = "tiny-llava", **overrides: object) -> ModelConfig:
        return ModelConfig(model_name_or_path=str(tiny_backbone_dirs[name]), **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory: pytest.TempPathFactory):
    """A 12-item catalogue; items i0–i9 have a 40×48 PNG, i10–i11 are text-only."""
    from PIL import Image

    from hanorec.data.catalog import Catalog

    root = tmp_path_factory.mktemp("tiny_images")
    ids = [f"i{k}" for k in range(12)]
    images: list[str | None] = []
    for k, item_id in enumerate(ids):
        if k < 10:
            Image.new("RGB", (40, 48), (20 * k, 255 - 20 * k, 128)).save(root / f"{item_id}.png")
            images.append(f"{item_id}.png")
        else:
            images.append(None)
    titles = [f"Title {k} ({1990 + k})" for k in range(12)]
    return Catalog(ids, titles, images, image_root=root, item_noun="movie")


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory: pytest.TempPathFactory,
                tiny_backbone_dirs: dict[str, Path]) -> Callable[..., Path]:
    """Factory ``tiny_recipe(backbone="tiny-llava", **section_overrides) -> recipe.yaml``.

    The data is a small RecBole-format set written once per session with a learnable
    pattern (each user walks through consecutive item ids), real rendered posters and a
    prepared output shared by every recipe; the recipe's ``run_dir`` is a fresh folder.
    """
    import numpy as np
    import yaml

    from hanorec.data.posters import render_posters

    root = tmp_path_factory.mktemp("tiny_recipe_data")
    rng = np.random.default_rng(0)
    num_items, lines = 30, []
    for user in range(1, 25):
        start = int(rng.integers(1, num_items))
        for step in range(int(rng.integers(7, 11))):
            item = (start + step - 1) % num_items + 1
            lines.append(f"{user}\t{item}\t4\t{1000 + step}\n")
    (root
     / "s.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                             + "".join(lines))
    titles = [f"Film {k}" for k in range(1, num_items + 1)]
    genres = [["Action"] if k % 2 else ["Drama", "Comedy"] for k in range(1, num_items + 1)]
    (root / "s.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(
            f"{k}\t{t}\t{1980 + k}\t{' '.join(g)}\n"
            for k, t, g in zip(range(1, num_items + 1), titles, genres)
        )
    )
    render_posters([str(k) for k in range(1, num_items + 1)], titles, genres, root / "posters",
                   size=(32, 48), workers=1)
    counter = iter(range(10_000))

    def make(backbone: str = "tiny-llava", **sections: dict) -> Path:
        run_dir = root / f"run{next(counter)}"
        recipe = {
            "run_dir": str(run_dir), "seed": 0,
            "data": {"dataset_format": "recbole", "interactions_path": str(root / "s.inter"),
                     "items_path": str(root / "s.item"),
                     "image_root": str(root / "posters"), "output_dir": str(root / "prepared"),
                     "item_noun": "movie",
                     "num_candidates": 6, "hit3_candidates": 4, "num_negatives": 3,
                     "max_history": 5},
            "model": {"model_name_or_path": str(tiny_backbone_dirs[backbone]), "lora_r": 4,
                      "lora_alpha": 8, "lora_dropout": 0.0},
            "prompt": {"image_budget": 2, "max_length": 512},
            "sft": {"sft_protocols": ["candidates", "hit1"], "learning_rate": 5e-3,
                    "per_device_batch_size": 2, "max_steps": 6,
                    "max_train_examples": 8, "warmup_ratio": 0.0, "eval_examples": 4},
            "dpo": {"dpo_protocols": ["candidates"], "learning_rate": 5e-3,
                    "per_device_batch_size": 2, "max_steps": 6,
                    "max_train_pairs": 8, "warmup_ratio": 0.0, "eval_examples": 4},
        }
        for section, values in sections.items():
            recipe[section].update(values) if isinstance(recipe.get(section),
                                                         dict) else recipe.__setitem__(section,
                                                                                       values)
        run_dir.mkdir(parents=True)
        path = run_dir / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make


@pytest.fixture(scope="session")
def tiny_sft(tiny_recipe: Callable[..., Path]) -> Callable[[str], Path]:
    """Factory ``tiny_sft(backbone) -> <run>/sft/final``: a short SFT run, trained once per
    session."""
    from hanorec import sft

    done: dict[str, Path] = {}

    def make(backbone: str = "tiny-llava") -> Path:
        if backbone not in done:
            done[backbone] = sft.main(["--config",
                                       str(tiny_recipe(backbone, sft={"max_steps": 4}))])
        return done[backbone]

    return make


@pytest.fixture(scope="session")
def planted_recipe(tmp_path_factory, tiny_backbone_dirs):
    """Factory ``planted_recipe(**section_overrides) -> recipe.yaml`` over planted-signal data.

    24 items whose titles are all "Movie", no images; each of 48 users walks through the
    catalogue in order (item k is followed by k+1) from a random start. Only the collaborative
    modality can tell the items apart. The recipe trains the ranking head with item and user
    tokens on tiny-llava; its recommender is cross-fitted over 3 user folds.
    """
    import numpy as np
    import yaml

    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    lines = []
    for user in range(1, PLANTED_USERS + 1):
        start = int(rng.integers(PLANTED_ITEMS))
        for step in range(int(rng.integers(9, 13))):
            lines.append(f"{user}\t{(start + step) % PLANTED_ITEMS + 1}\t4\t{1000 + step}\n")
    (root
     / "p.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                             + "".join(lines))
    (root / "p.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{k}\tMovie\t1990\tDrama\n" for k in range(1, PLANTED_ITEMS + 1))
    )
    counter = iter(range(100))

    def make(**sections: dict) -> Path:
        run_dir = root / f"run{next(counter)}"
        recipe = {
            "run_dir": str(run_dir), "seed": 0,
            "data": {"dataset_format": "recbole", "interactions_path": str(root / "p.inter"),
                     "items_path": str(root / "p.item"), "output_dir": str(root / "prepared"),
                     "item_noun": "movie",
                     "protocols": ["hit1", "hit3", "candidates", "full"], "num_candidates": 6,
                     "hit3_candidates": 4, "num_negatives": 3, "max_history": 5},
            "model": {"model_name_or_path": str(tiny_backbone_dirs["tiny-llava"]), "lora_r": 4,
                      "lora_alpha": 8,
                      "lora_dropout": 0.0},
            "prompt": {"image_budget": 0, "max_length": 512, "answer": "head", "item_tokens": True,
                       "user_token": True, "title_year": False},
            "collab": {"collab_fit": "crossfit", "collab_folds": 3, "collab_workers": 1,
                       "sasrec_epochs": 60, "sasrec_eval_every": 5, "sasrec_patience": 4,
                       "sasrec_hidden_size": 16, "sasrec_num_heads": 1, "sasrec_dropout": 0.1,
                       "sasrec_max_len": 12},
            "sft": {"sft_protocols": ["candidates"], "learning_rate": 1e-2,
                    "per_device_batch_size": 8,
                    "warmup_ratio": 0.0, "eval_examples": 16},
            "dpo": {"dpo_protocols": ["candidates"], "learning_rate": 5e-3,
                    "per_device_batch_size": 4, "max_steps": 8,
                    "warmup_ratio": 0.0, "eval_examples": 8},
            "eval": {"bootstrap_resamples": 100},
        }
        for section, values in sections.items():
            recipe.setdefault(section, {}).update(values)
        run_dir.mkdir(parents=True)
        path = run_dir / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make
