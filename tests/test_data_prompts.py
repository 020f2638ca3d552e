"""Prompt rendering (`build_prompt`, `response_text`) against the shared tiny catalogue."""

from __future__ import annotations

import pytest

from hanorec.data.catalog import Catalog
from hanorec.data.images import UnsafeImagePathError
from hanorec.data.prompts import build_prompt, plain_text, response_text

ROW = {"user_id": "u", "history": ["i0", "i1", "i10", "i3"], "target": "i4",
       "candidates": ["i5", "i4", "i6"], "target_index": 1}


def _texts(prompt) -> list[str]:
    return [c.get("text", "<image>") for c in prompt.messages[0]["content"]]


def test_candidates_prompt_layout(tiny_catalog: Catalog) -> None:
    """image_budget 2 -> only the last two history items (i10 is text-only, i3) may carry an
    image: one image (i3). Titles are quoted; candidates are listed; the question uses 'movie'."""
    prompt = build_prompt(ROW, tiny_catalog, "candidates", image_budget=2)
    assert prompt.messages[0]["role"] == "user" and prompt.num_history_items == 4
    assert _texts(prompt)[1:6] == ['"Title 0 (1990)"\n', '"Title 1 (1991)"\n',
                                   '"Title 10 (2000)"\n', "<image>", '"Title 3 (1993)"\n']
    assert prompt.image_paths == [tiny_catalog.image_root.resolve() / "i3.png"]
    assert all(p.is_absolute() for p in prompt.image_paths)
    question = _texts(prompt)[-1]
    assert question.startswith('Candidates:\n"Title 5 (1995)"\n"Title 4 (1994)"\n')
    assert question.endswith("Which movie will the user watch next? Answer with its title.")


def test_budget_truncation_and_blind(tiny_catalog: Catalog) -> None:
    """max_items 2 keeps i10, i3; image_budget 10 then gives i3 an image (i10 has none);
    with_images=False removes every image."""
    prompt = build_prompt(ROW, tiny_catalog, "full", image_budget=10, max_items=2)
    assert prompt.num_history_items == 2 and len(prompt.image_paths) == 1
    assert _texts(prompt)[-1] == "Which movie will the user watch next? Answer with its title."
    wide = build_prompt(ROW, tiny_catalog, "full", image_budget=10)
    assert len(wide.image_paths) == 3  # i0, i1, i3
    blind = build_prompt(ROW, tiny_catalog, "full", image_budget=10, with_images=False)
    assert blind.image_paths == [] and "<image>" not in _texts(blind)
    assert plain_text(blind.messages).count("<image>") == 0
    assert plain_text(wide.messages).count("<image>") == 3


def test_hit1_hit3_and_responses(tiny_catalog: Catalog) -> None:
    """hit1 asks about the query; hit3 asks for three titles; responses are bare titles."""
    hit1 = build_prompt({**ROW, "query": "i7", "label": 0}, tiny_catalog, "hit1", image_budget=0)
    assert _texts(hit1)[-1] == 'Will the user like "Title 7 (1997)"? Answer Yes or No.'
    assert hit1.image_paths == []
    hit3 = build_prompt(ROW, tiny_catalog, "hit3", image_budget=1)
    assert "Which 3 of these movies" in _texts(hit3)[-1]
    assert response_text("i4", tiny_catalog) == "Title 4 (1994)"
    assert response_text("Yes", tiny_catalog) == "Yes"


def test_bad_rows(tiny_catalog: Catalog, tmp_path) -> None:
    """Empty history, unknown protocol or item, and an escaping image path all raise."""
    with pytest.raises(ValueError, match="empty history"):
        build_prompt({**ROW, "history": []}, tiny_catalog, "full", image_budget=1)
    with pytest.raises(ValueError, match="empty history"):
        build_prompt(ROW, tiny_catalog, "full", image_budget=1, max_items=0)
    with pytest.raises(ValueError, match="unknown protocol"):
        build_prompt(ROW, tiny_catalog, "top5", image_budget=1)
    with pytest.raises(KeyError, match="nope"):
        response_text("nope", tiny_catalog)
    evil = Catalog(["x"], ["X"], ["../x.png"], image_root=tmp_path)
    with pytest.raises(UnsafeImagePathError):
        build_prompt({"history": ["x"]}, evil, "full", image_budget=1)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_messages_fit_real_chat_templates(tiny_backbone_dirs, tiny_catalog: Catalog,
                                          name: str) -> None:
    """A saved processor's chat template renders the messages: one image placeholder per
    image path, the quoted titles and the question in order."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_backbone_dirs[name])
    prompt = build_prompt(ROW, tiny_catalog, "candidates", image_budget=3)
    text = processor.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                         tokenize=False)
    image_token = "<|image_pad|>" if "qwen" in name else "<image>"
    assert text.count(image_token) == len(prompt.image_paths) == 2
    assert text.index('"Title 0 (1990)"') < text.index('"Title 3 (1993)"') < text.index(
        "Candidates:")


def test_index_style_lists_labels_and_item_slots(tiny_catalog: Catalog) -> None:
    """answer: index lists 'A. "Title"<|item|>' per candidate and asks for a letter; with item
    tokens, history items (``item``), candidates (``mention``) and the user token get a slot, in
    text order, the user token last, after the prompt."""
    from hanorec.data.prompts import PromptStyle

    style = PromptStyle(answer="index", item_tokens=True, user_token=True, title_year=False)
    prompt = build_prompt(ROW, tiny_catalog, "candidates", image_budget=0, style=style)
    texts = _texts(prompt)
    assert texts[1:5] == ['"Title 0"<|item|>\n', '"Title 1"<|item|>\n', '"Title 10"<|item|>\n',
                          '"Title 3"<|item|>\n']
    assert texts[5] == ('Candidates:\nA. "Title 5"<|item|>\nB. "Title 4"<|item|>\nC. "Title '
                        '6"<|item|>\n'
                        "Which movie will the user watch next? Answer with its letter.")
    assert prompt.suffix == "<|user|>"  # after the generation prompt: the answer position
    assert prompt.slots == [("item", "i0"), ("item", "i1"), ("item", "i10"), ("item", "i3"),
                            ("mention", "i5"), ("mention", "i4"), ("mention", "i6"), ("user", None)]


def test_head_style_asks_without_candidates_or_query(tiny_catalog: Catalog) -> None:
    """answer: head renders the same history prompt for every protocol (no list, no query);
    pooled posters are '<|poster|>' slots instead of images; a system prompt is its own turn."""
    from hanorec.data.prompts import PromptStyle

    style = PromptStyle(answer="head", image_tokens="pooled", system_prompt="Recommend.",
                        title_words=1)
    prompts = [build_prompt({**ROW, "query": "i7", "label": 1}, tiny_catalog, protocol,
                            image_budget=2, style=style)
               for protocol in ("candidates", "hit1", "hit3", "full")]
    assert all(p.messages == prompts[0].messages for p in prompts)
    head = prompts[0]
    assert head.messages[0] == {"role": "system",
                                "content": [{"type": "text", "text": "Recommend."}]}
    user = [c["text"] for c in head.messages[1]["content"]]
    assert user[-2:] == ['<|poster|>"Title"\n', "Which movie will the user watch next?"]
    assert head.image_paths == [] and head.slots == [("poster", "i3")]  # i10 has no image


def test_style_checks_and_display_titles() -> None:
    from hanorec.data.prompts import PromptStyle

    assert PromptStyle(title_year=False).display_title("Heat (1995)") == "Heat"
    assert PromptStyle(title_year=False).display_title("(1995)") == "(1995)"  # never empty
    assert PromptStyle(title_words=2).display_title("Star Wars (1977)") == "Star Wars"
    with pytest.raises(ValueError, match="user_token needs"):
        PromptStyle(user_token=True)
    with pytest.raises(ValueError, match="answer must be one of"):
        PromptStyle(answer="letters")
    with pytest.raises(ValueError, match="image_tokens"):
        PromptStyle(image_tokens="mean")
    with pytest.raises(ValueError, match="titles: false needs"):
        PromptStyle(titles=False, item_tokens=True)  # a title answer needs titles


def test_no_titles_leaves_the_item_tokens(tiny_catalog: Catalog) -> None:
    """titles: false — each history item and candidate is its item token alone."""
    from hanorec.data.prompts import PromptStyle

    style = PromptStyle(answer="index", item_tokens=True, titles=False)
    texts = _texts(build_prompt(ROW, tiny_catalog, "candidates", image_budget=0, style=style))
    assert texts[1:5] == ["<|item|>\n"] * 4
    assert texts[5].startswith("Candidates:\nA. <|item|>\nB. <|item|>\nC. <|item|>\n")


def test_title_budget_writes_older_items_as_bare_item_tokens(tiny_catalog: Catalog) -> None:
    """title_budget: 2 of a 4-item history — the two oldest items become one run of bare item
    tokens (no title, no newline), the two newest keep their titles; the slots still list every
    history item in order, then the user token; the row's collab_view reaches the prompt."""
    from hanorec.data.prompts import PromptStyle

    style = PromptStyle(answer="head", item_tokens=True, user_token=True, title_budget=2,
                        title_year=False)
    prompt = build_prompt({**ROW, "collab_view": 3}, tiny_catalog, "candidates", image_budget=0,
                          style=style)
    texts = _texts(prompt)
    assert texts[1] == "<|item|><|item|>"
    assert texts[2:4] == ['"Title 10"<|item|>\n', '"Title 3"<|item|>\n']
    assert prompt.slots == [("item", "i0"), ("item", "i1"), ("item", "i10"), ("item", "i3"),
                            ("user", None)]
    assert prompt.view == 3
    assert build_prompt(ROW, tiny_catalog, "candidates", image_budget=0, style=style).view == 0
    every = PromptStyle(answer="head", item_tokens=True, title_budget=9)  # budget > history
    assert _texts(build_prompt(ROW, tiny_catalog, "candidates", image_budget=0, style=every))[
        1:5] == _texts(build_prompt(ROW, tiny_catalog, "candidates", image_budget=0,
                                    style=PromptStyle(answer="head", item_tokens=True)))[1:5]
    with pytest.raises(ValueError, match="title_budget"):
        PromptStyle(answer="head", title_budget=2)  # older items would vanish
