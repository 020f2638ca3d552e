"""Collation on the three tiny backbones: image tokens vs. vision features, labels, truncation.

Catalogue (conftest ``tiny_catalog``): items i0–i9 have a 40×48 (w×h) image, i10–i11 are
text-only. Image tokens per image: LLaVA (32/8)² = 16 (CLS dropped); Idefics3 (32/8)²/2² = 4
(plus 3 tag tokens that are not image tokens); Qwen2-VL scales 40×48 up to at least 64² pixels
in multiples of 16 px (smart_resize: β = √(4096/1920) ≈ 1.46 → 64×80), a 8×10 patch grid
merged 2×2 → 20 tokens. Tests compare the placeholder count with the vision tower's real
output rather than with these numbers.
"""

from __future__ import annotations

import pytest
import torch

from hanorec.collate import IGNORE_INDEX, PromptCollator, answer_of
from hanorec.data.prompts import response_text
from hanorec.models.families import image_features
from hanorec.models.loading import load_backbone

NAMES = ("tiny-llava", "tiny-qwen2-vl", "tiny-idefics3")


def _rows() -> list[dict]:
    """Two candidate rows: u1 has 7 history items (the newest text-only), u2 has 6."""
    return [
        {"user_id": "u1", "history": ["i0", "i1", "i2", "i3", "i4", "i5", "i10"], "target": "i7",
         "candidates": ["i7", "i8", "i9"], "target_index": 0, "chosen": "i7",
         "rejected": ["i8", "i9"]},
        {"user_id": "u2", "history": ["i3", "i4", "i5", "i6", "i7", "i8"], "target": "i1",
         "candidates": ["i2", "i1", "i11"], "target_index": 1, "chosen": "i1",
         "rejected": ["i2", "i11"]},
    ]


@pytest.fixture(scope="module")
def backbones(tiny_backbone_dirs):
    """``{name: (model, processor)}``, LoRA-wrapped training models, loaded once for this module."""
    from hanorec.models.config import ModelConfig

    return {name: load_backbone(ModelConfig(model_name_or_path=str(folder)))
            for name, folder in tiny_backbone_dirs.items()}


def _image_token_id(model) -> int:
    config = model.get_base_model().config
    return getattr(config, "image_token_id", None) or config.image_token_index


def _collator(processor, catalog, **kwargs) -> PromptCollator:
    kwargs.setdefault("image_budget", 5)
    kwargs.setdefault("max_length", 512)
    return PromptCollator(processor, catalog, "candidates", **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_image_tokens_match_vision_features_and_forward_runs(name, backbones, tiny_catalog):
    """u1 shows 4 images (budget 5 over i2,i3,i4,i5,i10; i10 is text-only), u2 shows 5: 9 in all.

    The placeholder tokens in input_ids equal the rows of the vision features, and a real
    forward + backward runs with a finite loss.
    """
    model, processor = backbones[name]
    batch = _collator(processor, tiny_catalog)(_rows())
    features = image_features(model, batch)
    assert len(features) == 9
    assert int((batch["input_ids"] == _image_token_id(model)).sum()) == sum(f.shape[0]
                                                                            for f in features)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("name", NAMES)
def test_labels_score_only_response_and_eos(name, backbones, tiny_catalog):
    """Labels are -100 on prompt and padding; the scored tokens decode to 'Title 7 (1997)<|im_end|>'
    for u1."""
    _, processor = backbones[name]
    collator = _collator(processor, tiny_catalog)
    batch = collator(_rows())
    tok = processor.tokenizer
    for b, row in enumerate(_rows()):
        scored = batch["labels"][b][batch["labels"][b] != IGNORE_INDEX]
        expected = response_text(answer_of(row), tiny_catalog)
        assert tok.decode(scored) == expected + tok.eos_token
        assert scored[-1].item() == tok.eos_token_id
        real = batch["attention_mask"][b].bool()
        assert torch.equal(batch["input_ids"][b][real][-len(scored):], scored)
    assert tok.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]).startswith("Title "
                                                                                         "7 "
                                                                                         "(1997)")


def test_truncation_drops_whole_oldest_items_and_counts(backbones, tiny_catalog):
    """tiny-llava, u2 (6 items, all with images, budget 5 → 5 images × 16 tokens).

    With max_length = full length − 1, exactly one item must go: the oldest (i3, 'Title 3').
    The kept prompt shows 5 items and 5 images (budget now covers all), i.e. 80 image tokens.
    """
    model, processor = backbones["tiny-llava"]
    rows = _rows()[1:]
    full = _collator(processor, tiny_catalog).encode_pairs(rows)["input_ids"].shape[1]
    collator = _collator(processor, tiny_catalog, max_length=full - 1)
    batch = collator.encode_pairs(rows)
    assert batch["input_ids"].shape[1] <= full - 1
    assert (collator.num_truncated, collator.num_items_dropped) == (1, 1)
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert '"Title 3 (1993)"' not in text.split("Candidates")[0]
    assert all(f'"Title {k} ({1990 + k})"' in text for k in (4, 5, 6, 7, 8))
    assert batch["pixel_values"].shape[0] == 5
    assert int((batch["input_ids"] == _image_token_id(model)).sum()) == 5 * 16


@pytest.mark.parametrize("name", NAMES)
def test_truncation_never_cuts_image_tokens(name, backbones, tiny_catalog):
    """For every max_length from the full length down to the minimum, image tokens come in whole
    blocks: placeholder count == vision feature rows, and lengths never exceed max_length."""
    model, processor = backbones[name]
    rows = _rows()[:1]
    full = _collator(processor, tiny_catalog).encode_prompts(rows)["input_ids"].shape[1]
    seen_items = set()
    for max_length in range(full, 0, -7):
        collator = _collator(processor, tiny_catalog, max_length=max_length)
        try:
            encoded = collator.encode_prompt_row(rows[0])
        except ValueError:
            break
        batch = collator.encode_prompts(rows)
        assert batch["input_ids"].shape[1] <= max_length
        n_features = sum(f.shape[0]
                         for f in image_features(model, batch)) if "pixel_values" in batch else 0
        assert int((batch["input_ids"] == _image_token_id(model)).sum()) == n_features
        seen_items.add(encoded.num_history_items)
    assert 1 in seen_items and len(seen_items) >= 4


def test_too_long_minimal_prompt_raises(backbones, tiny_catalog):
    """A prompt that needs more tokens than max_length even with one history item is a
    ValueError."""
    _, processor = backbones["tiny-llava"]
    with pytest.raises(ValueError, match="single history item"):
        _collator(processor, tiny_catalog, max_length=20)(_rows())


def test_left_padded_prompts_and_response_tensor(backbones, tiny_catalog):
    """encode_preference: left-padded prompts (last column all real), responses [2, 3, R] with eos,
    -100 padded."""
    _, processor = backbones["tiny-qwen2-vl"]
    collator = _collator(processor, tiny_catalog, padding_side="left")
    prompts, responses = collator.encode_preference(_rows())
    assert prompts["attention_mask"][:, -1].all() and not prompts["attention_mask"][:, 0].all()
    assert (
        "labels" not in prompts and prompts["mm_token_type_ids"].shape == prompts["input_ids"].shape
    )
    assert responses.shape[:2] == (2, 3)
    eos = processor.tokenizer.eos_token_id
    for b in range(2):
        for k in range(3):
            valid = responses[b, k][responses[b, k] != IGNORE_INDEX]
            assert valid[-1].item() == eos and (valid == eos).sum() == 1
    assert processor.tokenizer.decode(responses[1,
                                                2][responses[1,
                                                             2] != IGNORE_INDEX]) == ("Title 11 "
                                                                                      "(2001)<|im_end|>")


def test_blind_prompts_have_no_images(backbones, tiny_catalog):
    """with_images=False (BPO): no pixel inputs and no image tokens."""
    model, processor = backbones["tiny-llava"]
    batch = _collator(processor, tiny_catalog, with_images=False)(_rows())
    assert "pixel_values" not in batch
    assert int((batch["input_ids"] == _image_token_id(model)).sum()) == 0
    assert torch.isfinite(model(**batch).loss)


def test_bad_arguments_raise(backbones, tiny_catalog):
    """Non-positive max_length, a bad padding side and unequal response counts are ValueErrors."""
    _, processor = backbones["tiny-llava"]
    with pytest.raises(ValueError, match="max_length"):
        _collator(processor, tiny_catalog, max_length=0)
    with pytest.raises(ValueError, match="padding_side"):
        _collator(processor, tiny_catalog, padding_side="middle")
    with pytest.raises(ValueError, match="same number of responses"):
        _collator(processor, tiny_catalog).response_tensor([["a", "b"], ["a"]])


def test_answer_of_rows():
    """Pair rows answer `chosen`; hit1 rows Yes/No from `label`; other rows their `target`."""
    assert answer_of({"chosen": "i3", "target": "i3", "rejected": ["i4"]}) == "i3"
    assert answer_of({"query": "i2", "label": 1, "target": "i2"}) == "Yes"
    assert answer_of({"query": "i5", "label": 0, "target": "i2"}) == "No"
    assert answer_of({"target": "i9", "candidates": ["i9"]}) == "i9"


@pytest.mark.parametrize("name", NAMES)
def test_item_tokens_become_virtual_ids(name, backbones, tiny_catalog):
    """Each placeholder becomes its slot's virtual id, in order, for every family; the rest of
    the sequence equals the prompt rendered without item tokens, placeholders removed."""
    from hanorec.data.prompts import PromptStyle
    from hanorec.item_tokens import MENTION_BASE, USER_ID, VIRTUAL_BASE

    _, processor = backbones[name]
    style = PromptStyle(item_tokens=True, user_token=True)
    ids = _collator(processor, tiny_catalog,
                    style=style).encode_prompts(_rows()[:1], padding_side="right")["input_ids"][0]
    virtual = ids[ids >= VIRTUAL_BASE].tolist()
    history = ["i0", "i1", "i2", "i3", "i4", "i5", "i10"]
    positions = [tiny_catalog.position(i) for i in history + ["i7", "i8", "i9"]]
    assert virtual[:7] == [VIRTUAL_BASE + p for p in positions[:7]]
    assert virtual[7:10] == [MENTION_BASE + p for p in positions[7:]]
    assert virtual[10] == USER_ID == int(ids[-1])  # the answer position
    plain = _collator(processor, tiny_catalog).encode_prompts(_rows()[:1])["input_ids"][0]
    assert ids[ids < VIRTUAL_BASE].tolist() == plain.tolist()  # only the placeholders are new


@pytest.mark.parametrize("name", NAMES)
def test_index_answers_are_one_label_token_without_eos(name, backbones, tiny_catalog):
    """answer: index — the SFT response of u2 (target i1 at index 1) is the single token 'B';
    preference responses are [B, K+1, 1]; Yes/No keep their eos."""
    from hanorec.data.prompts import PromptStyle

    _, processor = backbones[name]
    collator = _collator(processor, tiny_catalog, style=PromptStyle(answer="index"))
    batch = collator(_rows())
    scored = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()
    assert scored == processor.tokenizer("B", add_special_tokens=False)["input_ids"]
    _, responses = collator.encode_preference(_rows())
    assert responses.shape == (2, 3, 1)
    assert collator.candidate_texts(_rows()[1]) == ["A", "B", "C"]
    assert collator.encode_responses(["Yes"])[0][-1] == processor.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="among the row's candidates"):
        collator.encode_pairs([{**_rows()[0], "chosen": "i11"}])


def test_head_choices_batch(backbones, tiny_catalog):
    """answer: head — pair rows become candidate index lists and [B, K+1] picks, chosen first."""
    from hanorec.data.prompts import PromptStyle

    _, processor = backbones["tiny-llava"]
    batch = _collator(processor, tiny_catalog,
                      style=PromptStyle(answer="head")).encode_choices(_rows())
    pos = tiny_catalog.position
    assert batch.responses is None
    assert batch.picks.tolist() == [[pos("i7"), pos("i8"), pos("i9")],
                                    [pos("i1"), pos("i2"), pos("i11")]]
    assert batch.choices == [[pos("i7"), pos("i8"), pos("i9")], [pos("i2"), pos("i1"), pos("i11")]]
