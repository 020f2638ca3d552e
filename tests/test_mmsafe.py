"""MMSafe-PO format: reader/writer round trip, malformed rows, `general` prompts, DPO on it."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from hanorec import bpo, dpo
from hanorec.collate import PromptCollator
from hanorec.data.catalog import Catalog
from hanorec.data.mmsafe import convert_mmsafe, read_mmsafe, to_general_rows, write_mmsafe
from hanorec.data.prompts import build_prompt, response_text
from hanorec.training import read_metrics


def _sample(root: Path) -> tuple[list[dict], Path]:
    """Five MMSafe-PO rows over three real 40×48 PNGs (one in a sub-folder); rows 2 and 5 are
    multi-turn, row 4 has two images, row 3 has an image without a placeholder."""
    images = root / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(["p0.png", "p1.png", "sub/p2.png"]):
        Image.new("RGB", (40, 48), (80 * k, 200 - 60 * k, 90)).save(images / name)
    rows = [
        {"id": "a", "prompt": "USER: <image>\nWhat colour is the square? ASSISTANT:",
         "image": "p0.png",
         "chosen": "It is dark green.", "rejected": "I cannot tell without seeing it.",
         "category": "colour", "score": 1.0},
        {"id": "b",
         "prompt": "USER: <image>\nIs this safe? ASSISTANT: It looks fine. USER: Are you sure? "
                   "ASSISTANT:",
         "image": "p1.png", "chosen": "Yes, it is a plain square.", "rejected": "No.",
         "category": "safety", "score": 0.5},
        {"id": "c", "prompt": "USER: Describe the picture. ASSISTANT:", "image": "sub/p2.png",
         "chosen": "A brown square.", "rejected": "A cat on a sofa.", "category": "caption",
         "score": 0.0},
        {"id": "d", "prompt": "USER: Compare <image> and <image>. ASSISTANT:",
         "image": ["p0.png", "sub/p2.png"],
         "chosen": "The first is greener.", "rejected": "They are identical.",
         "category": "compare", "score": 2.0},
        {"id": "e",
         "prompt": "USER: <image>\nName it. ASSISTANT: A square. USER: Which colour? ASSISTANT:",
         "image": "p1.png", "chosen": "Olive.", "rejected": "Red.", "category": "colour",
         "score": 1.5},
    ]
    return rows, images


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_reader_round_trips_the_sample(tmp_path, suffix):
    """read(write(rows)) == rows, and a second write → read gives the same rows again; metadata
    columns (``id``, ``category``, ``score``) survive and list-valued ``image`` stays a list
    (JSON); Parquet refuses a column mixing paths and lists with a ValueError."""
    rows, images = _sample(tmp_path)
    if suffix == ".parquet":  # one type per Parquet column: drop the two-image row
        with pytest.raises(ValueError, match="one type per column"):
            write_mmsafe(rows, tmp_path / "mixed.parquet")
        rows = [r for r in rows if isinstance(r["image"], str)]
    first = read_mmsafe(write_mmsafe(rows, tmp_path / f"a{suffix}"), images)
    assert first == rows
    second = read_mmsafe(write_mmsafe(first, tmp_path / f"b{suffix}"), images)
    assert second == rows


@pytest.mark.parametrize(("change", "field"), [
    (lambda r: r.pop("chosen"), "chosen"),
    (lambda r: r.update(chosen="  "), "chosen"),
    (lambda r: r.update(rejected=[]), "rejected"),
    (lambda r: r.update(image="../outside.png"), "image"),
    (lambda r: r.update(image="/etc/passwd"), "image"),
    (lambda r: r.update(image="missing.png"), "image"),
    (lambda r: r.update(prompt="USER: <image> and <image>? ASSISTANT:"), "prompt"),
])
def test_malformed_rows_are_rejected_with_file_row_and_field(tmp_path, change, field):
    """Row 3 of the file is broken; the error names the file, row 3 and the field."""
    rows, images = _sample(tmp_path)
    # exists, but outside the root
    (tmp_path / "outside.png").write_bytes((images / "p0.png").read_bytes())
    change(rows[2])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"bad\.jsonl, row 3, field '{field}'"):
        read_mmsafe(path, images)


def test_general_prompt_turns_images_and_blind_rendering(tmp_path):
    """Row b: user / assistant / user turns, one image at its placeholder. Row c: no placeholder,
    so the image opens the first user turn. Row d: two placeholders → two images in order.
    Blind: the same turns with no image entries and no paths. Free-text responses pass through."""
    rows, images = _sample(tmp_path)
    general = to_general_rows(rows)
    catalog = Catalog([], [], image_root=images)
    b = build_prompt(general[1], catalog, "general", image_budget=0)
    assert [m["role"] for m in b.messages] == ["user", "assistant", "user"]
    assert b.messages[0]["content"] == [{"type": "image"},
                                        {"type": "text", "text": "\nIs this safe?"}]
    assert b.messages[1]["content"] == [{"type": "text", "text": "It looks fine."}]
    assert b.image_paths == [(images / "p1.png").resolve()]
    c = build_prompt(general[2], catalog, "general", image_budget=0)
    assert [e["type"] for e in c.messages[0]["content"]] == ["image", "text"]
    d = build_prompt(general[3], catalog, "general", image_budget=0)
    assert [e["type"]
            for e in d.messages[0]["content"]] == ["text", "image", "text", "image", "text"]
    assert d.image_paths == [(images / "p0.png").resolve(), (images / "sub/p2.png").resolve()]
    blind = build_prompt(general[3], catalog, "general", image_budget=0, with_images=False)
    assert blind.image_paths == [] and all(e["type"] == "text"
                                           for e in blind.messages[0]["content"])
    assert response_text("They are identical.", catalog, free_text=True) == "They are identical."
    with pytest.raises(KeyError):  # recommendation rows: an unknown item id stays an error
        response_text("They are identical.", catalog)
    assert json.loads(general[0]["metadata"]) == {"id": "a", "category": "colour", "score": 1.0}


def test_general_rows_collate_with_and_without_images(tmp_path, tiny_backbone_dirs):
    """tiny-llava: 16 image tokens per image (conftest notes), so row d (two images) has 32 and
    pixel values for 2 images; blind, it has neither."""
    from transformers import AutoProcessor

    rows, images = _sample(tmp_path)
    processor = AutoProcessor.from_pretrained(tiny_backbone_dirs["tiny-llava"])
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    catalog = Catalog([], [], image_root=images)
    row = {**to_general_rows(rows)[3], "protocol": "general"}
    seen = PromptCollator(processor, catalog, "general", image_budget=5,
                          max_length=512).encode_prompts([row])
    assert int((seen["input_ids"] == image_id).sum()) == 32 and seen["pixel_values"].shape[0] == 2
    blind = PromptCollator(processor, catalog, "general", image_budget=5, max_length=512,
                           with_images=False).encode_prompts([row])
    assert int((blind["input_ids"] == image_id).sum()) == 0 and "pixel_values" not in blind


def test_bpo_and_dpo_train_on_converted_mmsafe_data(tmp_path, tiny_recipe, tiny_sft):
    """5 rows → 4 train / 1 validation (fraction 0.2). `hanorec.bpo generate` answers the 4
    train prompts blind (free text: no item); DPO then runs two steps through the same loop with
    ``--preference-data``, ``--dpo-protocols general`` and the blind answers as negatives (every
    non-empty blind text that differs from the chosen one replaces the rejected response): two
    logged steps with finite losses, the first one log 2 (policy = reference at step 1)."""
    rows, images = _sample(tmp_path)
    source = write_mmsafe(rows, tmp_path / "mmsafe.jsonl")
    out = convert_mmsafe(source, images, tmp_path / "converted", validation_fraction=0.2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["train"], manifest["validation"]) == (4, 1)
    recipe = tiny_recipe("tiny-llava", dpo={"sft_checkpoint": str(tiny_sft("tiny-llava"))})
    general = ["--config", str(recipe), "--preference-data", str(out), "--dpo-protocols", "general",
               "--max-train-pairs", "0"]
    blind = bpo.main(["generate", *general, "--bpo-max-new-tokens", "4"])
    records = datasets.load_from_disk(str(blind)).to_list()
    # free text, no catalogue
    assert len(records) == 4 and all(r["blind_item"] is None for r in records)
    usable = sum(r["status"] == "text" and bool(r["blind_answer"].strip()) for r in records)
    dpo.main([*general, "--max-steps", "2", "--blind-negatives", str(blind)])
    run_dir = Path(yaml.safe_load(recipe.read_text())["run_dir"])
    logged = [r for r in read_metrics(run_dir / "dpo" / "metrics.jsonl") if "train/loss" in r]
    assert len(logged) == 2
    assert abs(logged[0]["train/loss"] - 0.6931) < 1e-3
    assert all(r["train/loss"] == r["train/loss"] for r in logged)
    summary = json.loads((run_dir / "dpo" / "summary.json").read_text())
    assert summary["train_pairs"] == 4
    assert summary["blind_negatives"]["replaced"] == summary["blind_negatives"]["usable"] == usable
