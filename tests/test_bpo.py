"""BPO blind negatives: blind prompts, answer → item mapping and counts, the DPO hook, end to
end."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml

from hanorec import bpo, dpo
from hanorec.bpo import blind_records, count_statuses, row_key, write_blind_dataset
from hanorec.collate import PromptCollator
from hanorec.config import from_yaml_dict
from hanorec.data.blind import mix_blind_negatives
from hanorec.runtime import load_catalog, load_rows
from hanorec.training import read_metrics

IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")


def _row(protocol: str = "candidates") -> dict:
    """u1: history with images on i2..i5 (budget 5; i10 is text-only), target i7, 4 candidates."""
    row = {"user_id": "u1", "history": ["i0", "i1", "i2", "i3", "i4", "i5", "i10"], "target": "i7",
           "chosen": "i7", "rejected": ["i8", "i9"], "protocol": protocol}
    if protocol == "candidates":
        row |= {"candidates": ["i7", "i8", "i9", "i6"], "target_index": 0}
    return row


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-idefics3"])
@pytest.mark.parametrize("protocol", ["candidates", "full"])
def test_blind_prompts_have_no_image_tokens_and_no_pixel_values(tiny_backbone_dirs, tiny_catalog,
                                                                name, protocol):
    """With images the prompt holds image tokens and pixel values (4 images); blind it holds
    neither, but still every history title."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_backbone_dirs[name])
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    seen, blind = (PromptCollator(processor, tiny_catalog, protocol, image_budget=5,
                                  max_length=1024, with_images=w)
                   .encode_prompts([_row(protocol)]) for w in (True, False))
    assert int((seen["input_ids"] == image_id).sum()) > 0 and "pixel_values" in seen
    assert int((blind["input_ids"] == image_id).sum()) == 0
    assert not any(key in blind for key in IMAGE_KEYS)
    text = processor.tokenizer.decode(blind["input_ids"][0])
    assert all(f'"Title {k} ({1990 + k})"' in text for k in (0, 1, 2, 3, 4, 5, 10))


def test_answers_are_mapped_and_duplicates_of_the_chosen_are_skipped_and_counted(tiny_catalog,
                                                                                 tmp_path):
    """candidates row (chosen i7 = "Title 7 (1997)"):
    "Title 7 (1997)" → chosen (skipped); "I pick Title 6 (1996)." → i6 (item); "no idea" → text;
    "Title 11 (2001)" → text (not a candidate). full row: "Title 11 (2001)" → i11 (whole
    catalogue). hit1 row (chosen Yes): "Yes" → chosen, "No" → item "No".
    Counts: rows 7, item 3, text 2, chosen 2 (no blank answer)."""
    hit1 = {"user_id": "u2", "history": ["i1"], "query": "i3", "label": 1, "chosen": "Yes",
            "rejected": ["No"], "protocol": "hit1"}
    rows = [_row(), _row(), _row(), _row(), _row("full"), hit1, hit1]
    answers = ["Title 7 (1997)", "I pick Title 6 (1996).", "no idea", "Title 11 (2001)",
               "Title 11 (2001)", "Yes", "No"]
    records = blind_records(rows, answers, tiny_catalog)
    assert [(r["blind_item"], r["status"]) for r in records] == [
        ("i7", "chosen"), ("i6", "item"), (None, "text"), (None, "text"), ("i11", "item"),
        ("Yes", "chosen"), ("No", "item")]
    expected = {"rows": 7, "item": 3, "text": 2, "chosen": 2, "empty": 0}
    assert count_statuses(records) == expected
    out = tmp_path / "blind"
    assert write_blind_dataset(records, out, {"checkpoint": "x"}) == expected
    assert json.loads((out / "manifest.json").read_text())["counts"] == expected
    saved = datasets.load_from_disk(str(out)).to_list()
    assert saved[1]["row_key"] == row_key(rows[1]) and saved[1]["blind_answer"] == ("I pick "
                                                                                    "Title 6 "
                                                                                    "(1996).")
    assert not (tmp_path / "blind.tmp").exists()


def test_mix_replaces_the_last_negative_keeps_k_and_respects_the_ratio(tiny_catalog, tmp_path):
    """Four rows (rejected [i8, i9]) whose blind answers name i6 (usable), plus one naming i8
    (already a negative) and one skipped as the chosen item. Ratio 1: the 4 usable rows become
    [i8, i6]; ratio 0.5: round(0.5·4) = 2 of them; ratio 0: none. Rows keep K = 2."""
    rows = [{**_row(), "user_id": f"u{k}"} for k in range(6)]
    answers = ["Title 6 (1996)"] * 4 + ["Title 8 (1998)", "Title 7 (1997)"]
    path = tmp_path / "blind"
    write_blind_dataset(blind_records(rows, answers, tiny_catalog), path)
    mixed, counts = mix_blind_negatives(rows, path, ratio=1.0)
    assert [r["rejected"] for r in mixed] == [["i8", "i6"]] * 4 + [["i8", "i9"]] * 2
    assert counts == {"rows": 6, "with_record": 6, "usable": 4, "already_rejected": 1,
                      "replaced": 4}
    half, counts = mix_blind_negatives(rows, path, ratio=0.5, seed=3)
    assert counts["replaced"] == 2 and sum(r["rejected"] == ["i8", "i6"] for r in half) == 2
    assert all(len(r["rejected"]) == 2 for r in half)
    none, _ = mix_blind_negatives(rows, path, ratio=0.0)
    assert none == rows
    with pytest.raises(ValueError, match="none of the 1 training pairs"):
        mix_blind_negatives([{**_row(), "user_id": "stranger"}], path)
    with pytest.raises(ValueError, match="blind_ratio"):
        mix_blind_negatives(rows, path, ratio=1.5)


def test_generate_then_dpo_with_blind_negatives_on_a_tiny_backbone(tiny_recipe, tiny_sft, tmp_path):
    """`hanorec.bpo generate` answers the 8 DPO training pairs blind (counts add up to 8, every
    pair joins its record); with ``--bpo-pick score`` every pick names a candidate (text 0,
    item + chosen = 8); then DPO trains 2 steps with blind negatives at ratio 0.5: the
    crafted blind set names, for every pair, a candidate that is neither chosen nor rejected
    (6 candidates, 3 negatives), so 8 are usable and round(0.5·8) = 4 replaced."""
    sft_dir = tiny_sft("tiny-llava")
    recipe = tiny_recipe("tiny-llava",
                         dpo={"sft_checkpoint": str(sft_dir), "max_steps": 2, "loss": "sdpo"})
    out = bpo.main(["generate", "--config", str(recipe), "--checkpoint", str(sft_dir),
                    "--bpo-max-new-tokens", "6"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 8 == sum(manifest["counts"][s]
                                                  for s in ("item", "text", "chosen"))
    scored = bpo.main(["generate", "--config", str(recipe), "--checkpoint", str(sft_dir),
                       "--bpo-pick", "score", "--bpo-out", str(tmp_path / "scored")])
    counts = json.loads((scored / "manifest.json").read_text())["counts"]
    # a scored pick always names a candidate
    assert counts["item"] + counts["chosen"] == 8 and counts["text"] == 0
    run = from_yaml_dict(dpo.DPORun, yaml.safe_load(recipe.read_text()))
    prepared = run.data.path(run.data.output_dir)
    rows = load_rows(prepared, ["candidates"], "train", pairs=True, limit=8, seed=0)
    assert mix_blind_negatives(rows, out, ratio=1.0)[1]["with_record"] == 8

    catalog = load_catalog(run.data, prepared)
    free = [next(c for c in r["candidates"] if c != r["chosen"] and c not in r["rejected"])
            for r in rows]
    crafted = tmp_path / "crafted"
    write_blind_dataset(blind_records(rows, [catalog.title(c) for c in free], catalog), crafted)
    dpo.main(["--config", str(recipe), "--blind-negatives", str(crafted), "--blind-ratio", "0.5"])
    run_dir = Path(run.run_dir)
    summary = json.loads((run_dir / "dpo" / "summary.json").read_text())
    assert summary["blind_negatives"] == {"rows": 8, "with_record": 8, "usable": 8,
                                          "already_rejected": 0, "replaced": 4}
    logged = [r for r in read_metrics(run_dir / "dpo" / "metrics.jsonl") if "train/loss" in r]
    assert len(logged) == 2 and all(r["train/loss"] == r["train/loss"] for r in logged)


def test_sampled_blind_answers_are_seeded_and_need_a_blind_collator(tiny_backbone_dirs,
                                                                    tiny_catalog):
    """Sampling (temperature 1.5) with one seed gives the same two answers twice; a collator that
    renders images is refused."""
    from hanorec.bpo import BPOConfig, blind_answers
    from hanorec.models.config import ModelConfig
    from hanorec.models.loading import load_backbone

    model, processor = load_backbone(
        ModelConfig(model_name_or_path=str(tiny_backbone_dirs["tiny-llava"]), use_lora=False),
        for_training=False,
    )
    cfg = BPOConfig(bpo_batch_size=2, bpo_max_new_tokens=5, bpo_sample=True, bpo_temperature=1.5)
    collator = PromptCollator(processor, tiny_catalog, "candidates", image_budget=5,
                              max_length=1024, with_images=False)
    rows = [_row(), {**_row(), "user_id": "u2", "history": ["i3", "i4"]}]
    first = blind_answers(model, collator, rows, cfg, seed=7, progress=False)
    assert len(first) == 2 and first == blind_answers(model, collator, rows, cfg, seed=7,
                                                      progress=False)
    with pytest.raises(ValueError, match="with_images=False"):
        blind_answers(model,
                      PromptCollator(processor, tiny_catalog, "candidates", image_budget=5,
                                     max_length=1024), rows, cfg)
