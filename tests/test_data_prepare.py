"""End to end: `prepare` and the CLI on synthetic RecBole files, determinism, reuse,
placeholders, and the real MovieLens-100K when the cache holds it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pytest

from hanorec.data.__main__ import main
from hanorec.data.catalog import Catalog
from hanorec.data.cli_args import parse_data_cli
from hanorec.data.config import DataConfig
from hanorec.data.posters import render_posters
from hanorec.data.prepare import is_current, prepare

HEADER_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
HEADER_ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"


def _write_source(folder: Path, users: int = 12, items: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, users + 1):
        for item in rng.choice(items, size=int(rng.integers(6, 14)), replace=False):
            lines.append(f"{user}\t{item + 1}\t{rng.integers(1, 6)}\t{rng.integers(100, 110)}\n")
    (folder / "s.inter").write_text(HEADER_INTER + "".join(lines))
    (folder / "s.item").write_text(HEADER_ITEM + "".join(
        f"{k}\tMovie {k}\t{1980 + k}\t{'Drama Comedy' if k % 2 else 'Action'}\n"
        for k in range(1, items + 1)))


def _config(folder: Path, **overrides) -> DataConfig:
    values = dict(dataset_format="recbole", interactions_path=str(folder / "s.inter"),
                  items_path=str(folder / "s.item"), output_dir=str(folder / "out"),
                  num_candidates=10, item_noun="movie")
    return DataConfig(**{**values, **overrides})


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    _write_source(tmp_path)
    return tmp_path


def test_prepare_layout_counts_and_reuse(source: Path, capsys) -> None:
    """12 users -> 12 validation/test rows per protocol; pairs have train/validation with
    K = 3 rejected; items carry training popularity; a second run prints 'reusing'."""
    config = _config(source)
    manifest = prepare(config, progress=False)
    out = source / "out"
    assert manifest["users"] == 12 and manifest["stats"]["short_users_dropped"] == 0
    for protocol in ("hit1", "hit3", "candidates", "full"):
        data = datasets.load_from_disk(str(out / protocol))
        assert set(data) == {"train", "validation", "test"}
        assert data["test"].num_rows == data["validation"].num_rows == 12
        assert manifest["counts"][protocol]["train"] == data["train"].num_rows
        pairs = datasets.load_from_disk(str(out / "pairs" / protocol))
        assert set(pairs) == {"train", "validation"}
        width = 1 if protocol == "hit1" else 3
        assert all(len(r) == width for r in pairs["train"]["rejected"])
    items = datasets.load_from_disk(str(out / "items"))
    assert items.column_names == ["item_id", "title", "genres", "image", "popularity"]
    assert sum(items["popularity"]) == manifest["interactions"] - 2 * 12
    assert manifest["sources"]["interactions_path"]["sha256"] == hashlib.sha256(
        (source / "s.inter").read_bytes()).hexdigest()
    capsys.readouterr()
    again = prepare(config, progress=False)
    assert "reusing" in capsys.readouterr().out and again == manifest
    prepare(_config(source, data_seed=1), progress=False)
    assert "reusing" not in capsys.readouterr().out


def test_is_current_tracks_config_and_sources(source: Path) -> None:
    """``is_current`` is False before any prepare, True right after, False for the same folder
    under another ``max_history`` (what a second recipe sharing the folder would do) and False
    once a source file changes; a prepare of the new config makes it True again."""
    config = _config(source)
    assert not is_current(config)
    prepare(config, progress=False)
    assert is_current(config)
    other = _config(source, max_history=3)
    assert not is_current(other)
    with open(source / "s.inter", "a") as handle:
        handle.write("1\t40\t5\t200\n")
    assert not is_current(config)
    prepare(config, progress=False)
    assert is_current(config)


def test_deterministic_output(source: Path) -> None:
    """Two prepares with one seed are byte-identical (every file, manifest included);
    another seed changes the candidate files."""
    config = _config(source)
    prepare(config, progress=False)
    first = _digest(source / "out")
    prepare(config, progress=False, force=True)
    assert _digest(source / "out") == first
    prepare(_config(source, data_seed=7), progress=False, force=True)
    assert _digest(source / "out") != first


def test_images_placeholder_and_catalog(source: Path) -> None:
    """Posters for items 1..39 only: item 40 gets the placeholder (counted), the catalog
    resolves it to placeholder.png; the error policy fails naming item 40."""
    posters = source / "posters"
    render_posters([str(k) for k in range(1, 40)], [f"Movie {k}" for k in range(1, 40)],
                   [["Drama"]] * 39, posters, size=(32, 48), workers=1)
    with pytest.raises(ValueError, match="missing image for item '40'"):
        prepare(_config(source, image_root=str(posters)), progress=False)
    manifest = prepare(_config(source, image_root=str(posters),
                               missing_image_policy="placeholder"), progress=False)
    assert manifest["stats"]["images_missing"] == 1
    assert manifest["stats"]["images_placeholder"] == 1
    catalog = Catalog.from_prepared(source / "out")
    assert catalog.item_noun == "movie" and catalog.title("3") == "Movie 3 (1983)"
    assert catalog.image_path("3") == (posters / "3.png").resolve()
    assert catalog.image_path("40") == source / "out" / "placeholder.png"
    assert catalog.image_path("40").is_file()


def test_cli_and_flag_parser(source: Path, capsys) -> None:
    """YAML `data:` section + flat flags (flags win); `prepare` and `show` run."""
    recipe = source / "r.yaml"
    recipe.write_text(f"run_dir: x\ndata:\n  dataset_format: recbole\n"
                      f"  interactions_path: {source / 's.inter'}\n"
                      f"  items_path: {source / 's.item'}\n  output_dir: {source / 'cli'}\n"
                      f"  num_candidates: 8\n  protocols: [candidates, hit1]\n")
    config = parse_data_cli(["--config", str(recipe), "--num-candidates", "6",
                             "--train-targets-per-user", "none", "--drop-unknown-items", "true"])
    assert config.num_candidates == 6 and config.protocols == ["candidates", "hit1"]
    assert config.train_targets_per_user is None and config.drop_unknown_items is True
    with pytest.raises(ValueError, match="unknown flag --beta"):
        parse_data_cli(["--beta", "0.1"])
    with pytest.raises(ValueError, match="num_candidates"):
        parse_data_cli(["--num-candidates", "1"])
    assert main(["prepare", "--config", str(recipe), "--num-candidates", "6"]) == 0
    assert re.search(r"candidates\s+train=\d+\s+validation=12\s+test=12", capsys.readouterr().out)
    assert main(["show", "--config", str(recipe), "--num-candidates", "6", "--protocol",
                 "hit1", "--index", "2"]) == 0
    shown = capsys.readouterr().out
    assert "<|user|>" in shown and "Answer Yes or No." in shown
    assert main(["show", "--config", str(recipe), "--num-candidates", "6", "--split",
                 "validation", "--index", "11"]) == 0  # --split: the dataset split for show
    assert "(19" in capsys.readouterr().out  # default prompt: titles keep their year
    index_recipe = source / "index.yaml"
    index_recipe.write_text(recipe.read_text() + "prompt:\n  answer: index\n"
                            "  title_year: false\n  image_budget: 0\n")
    assert main(["show", "--config", str(index_recipe), "--num-candidates", "6"]) == 0
    shown = capsys.readouterr().out  # the recipe's prompt: section, not the defaults
    assert "A. " in shown and "(19" not in shown.split("<|assistant|>")[0]
    assert re.search(r"<\|assistant\|>\n[A-F]\n", shown)
    assert main(["show", "--config", str(index_recipe), "--num-candidates", "6",
                 "--answer", "title"]) == 0
    assert re.search(r"<\|assistant\|>\nMovie \d+\n", capsys.readouterr().out)
    assert main(["prepare", "--config", str(recipe), "--split", "temporal", "--output-dir",
                 str(source / "temporal")]) == 0  # --split: DataConfig.split for prepare
    manifest = json.loads((source / "temporal" / "manifest.json").read_text())
    assert manifest["config"]["split"] == "temporal"


def _real_ml100k() -> Path | None:
    cache = os.environ.get("HANOREC_CACHE")
    folder = Path(cache) / "ml-100k" if cache else None
    if folder and (folder / "ml-100k.inter").is_file() and (folder / "ml-100k.item").is_file():
        return folder
    return None


@pytest.mark.skipif(_real_ml100k() is None,
                    reason="MovieLens-100K not fetched: set HANOREC_CACHE to a cache filled by "
                           "`python -m hanorec.data fetch-ml100k` (make test does it)")
def test_real_movielens_100k(tmp_path: Path) -> None:
    """Real ML-100K: 943 users, 1,682 items, 100,000 ratings, 943 test rows per protocol,
    415 users tied at the split (docs/methods.md); candidate lists hold the target once and no
    item of the user's sequence. Train targets capped at 1 per user to stay fast."""
    folder = _real_ml100k()
    config = DataConfig(interactions_path=str(folder / "ml-100k.inter"),
                        items_path=str(folder / "ml-100k.item"), output_dir=str(tmp_path),
                        train_targets_per_user=1)
    manifest = prepare(config, progress=False)
    assert (manifest["users"], manifest["items"], manifest["interactions"]) == (943, 1682,
                                                                                100_000)
    assert manifest["stats"]["users_tied_at_split"] == 415
    assert all(manifest["counts"][p]["test"] == 943 for p in manifest["counts"])
    full = datasets.load_from_disk(str(tmp_path / "full"))
    whole: dict[str, set[str]] = {}
    for split in ("train", "validation", "test"):
        for row in full[split]:
            whole.setdefault(row["user_id"], set()).update(row["history"] + [row["target"]])
    test = datasets.load_from_disk(str(tmp_path / "candidates"))["test"]
    for row in test:
        assert row["candidates"].count(row["target"]) == 1
        assert row["candidates"][row["target_index"]] == row["target"]
        assert not (set(row["candidates"]) - {row["target"]}) & whole[row["user_id"]]
    json.dumps(manifest)  # serialisable
