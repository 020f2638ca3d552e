"""Read-outs (hanorec/readout.py): the ranking head against hand computation, index labels."""

from __future__ import annotations

import math

import pytest
import torch
from test_forward import build
from test_item_tokens import encoder

from hanorec.collate import ChoiceBatch
from hanorec.item_tokens import USER_ID, attach_item_encoder, virtual_id
from hanorec.readout import (
    answer_logps,
    choice_columns,
    final_states,
    head_logps,
    last_positions,
    shared_prefix_length,
    similarity,
)


def test_similarity_by_hand():
    """u = (3, 4), items e1 = (1, 0), e2 = (0, 2): dot/√2 = (3/√2, 8/√2); cos/τ with τ = 0.5
    = (0.6/0.5, 0.8/0.5) = (1.2, 1.6); per-user item sets [U, C, H] give the same numbers."""
    users = torch.tensor([[3.0, 4.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(similarity(users, items, "dot"),
                          torch.tensor([[3 / math.sqrt(2), 8 / math.sqrt(2)]]))
    assert torch.allclose(similarity(users, items, "cos", 0.5), torch.tensor([[1.2, 1.6]]))
    assert torch.allclose(similarity(users, items[None], "cos", 0.5), torch.tensor([[1.2, 1.6]]))
    with pytest.raises(ValueError, match="tau must be positive"):
        similarity(users, items, "cos", 0.0)
    with pytest.raises(ValueError, match="kind"):
        similarity(users, items, "l2")


def test_choice_columns_union_and_catalogue():
    """All rows with lists: only the union is scored; a None row makes every item a column."""
    columns, allowed = choice_columns([[4, 2], [2, 7]], 9, torch.device("cpu"))
    assert columns.tolist() == [2, 4, 7]
    assert allowed.tolist() == [[True, True, False], [True, False, True]]
    columns, allowed = choice_columns([[4, 2], None], 5, torch.device("cpu"))
    assert columns is None
    assert allowed.tolist() == [[False, False, True, False, True], [True] * 5]


def test_last_positions_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_positions(mask).tolist() == [3, 2, 3]


@pytest.fixture(scope="module")
def head_model():
    model = build("llava")
    attach_item_encoder(model, encoder(model.config.text_config.hidden_size))
    return model


def test_head_logps_equal_a_hand_softmax(head_model):
    """log π(v | x) = s_v − logsumexp over the row's candidates, with s = ⟨h, e⟩/√d, h the final
    hidden state at the last real token (right padding here) taken from a plain forward."""
    model = head_model
    enc = model.hanorec_item_encoder
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    batch = {"input_ids": ids, "attention_mask": mask}
    choices = [[3, 1, 8], None]
    picks = torch.tensor([[1, 8], [0, 9]])
    with torch.no_grad():
        got = head_logps(model, batch, choices, picks)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        h = torch.stack([hidden[0, 6], hidden[1, 4]])
        vectors = enc.item_vectors()
        scores = h @ vectors.T / math.sqrt(h.shape[1])
        row0 = scores[0, [3, 1, 8]].log_softmax(-1)
        row1 = scores[1].log_softmax(-1)
        expected = torch.stack([torch.stack([row0[1], row0[2]]), torch.stack([row1[0], row1[9]])])
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(final_states(model, batch), h, atol=1e-6)
    with pytest.raises(ValueError, match="not among"):
        head_logps(model, batch, choices, torch.tensor([[2, 8], [0, 9]]))


def test_head_noise_is_seeded_and_shifts_the_scores(head_model):
    """NoDO on head scores: same generator seed, same result; σ > 0 changes the log-probs."""
    batch = {"input_ids": torch.randint(1, 50, (2, 6)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    choices, picks = [[0, 1, 2], [3, 4, 5]], torch.tensor([[0, 1], [5, 3]])
    with torch.no_grad():
        clean = head_logps(head_model, batch, choices, picks)
        a = head_logps(head_model, batch, choices, picks, noise_std=0.5,
                       generator=torch.Generator().manual_seed(1))
        b = head_logps(head_model, batch, choices, picks, noise_std=0.5,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, clean)


def test_answer_logps_dispatch(head_model):
    """Responses go through the shared-prompt forward; head picks through the head."""
    batch = {"input_ids": torch.randint(1, 50, (2, 6)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    picks = torch.tensor([[0, 1], [5, 3]])
    with torch.no_grad():
        head = answer_logps(head_model,
                            ChoiceBatch(batch, choices=[[0, 1, 2], [3, 4, 5]], picks=picks))
        assert torch.allclose(head, head_logps(head_model, batch, [[0, 1, 2], [3, 4, 5]], picks))
        labels = torch.tensor([[[7], [9]], [[11], [12]]])
        index = answer_logps(head_model, ChoiceBatch(batch, responses=labels))
        logits = head_model(**batch).logits[:, -1].log_softmax(-1)
        assert torch.allclose(index, torch.stack([logits[0, [7, 9]], logits[1, [11, 12]]]),
                              atol=1e-5)
    with pytest.raises(ValueError, match="neither responses nor head picks"):
        answer_logps(head_model, ChoiceBatch(batch))


def _prefixed_batch() -> dict:
    """Three right-padded rows: the same 6 text tokens, then each row's own text, item tokens
    and a user token (as a ``head`` prompt: shared instruction, then the history)."""
    torch.manual_seed(3)
    prefix = torch.randint(1, 50, (6,)).tolist()
    items = [virtual_id("item", i) for i in (1, 4, 2, 7, 9, 3)]
    own = [[11, items[0], 12, items[1], USER_ID, 13, 14],
           [15, items[2], USER_ID, 16, 0, 0, 0],
           [items[3], 17, items[4], 18, items[5], USER_ID, 0]]
    ids = torch.tensor([prefix + row for row in own])
    mask = torch.tensor([[1] * 13, [1] * 10 + [0] * 3, [1] * 12 + [0]])
    return {"input_ids": ids, "attention_mask": mask}


def test_shared_prefix_states_equal_the_plain_forward(head_model):
    """Encoding the 6 shared tokens once (KV repeated to 3 rows, positions continued at 6)
    gives the plain forward's final states — the user token still reads every history item
    token of its row, all of them after the prefix."""
    batch = _prefixed_batch()
    assert shared_prefix_length(head_model, batch) == 6
    with torch.no_grad():
        plain = final_states(head_model, batch)
        shared = final_states(head_model, batch, share_prefix=True)
    assert torch.allclose(shared, plain, atol=1e-5)
    assert not torch.allclose(plain[0], plain[1], atol=1e-3)  # rows differ: a real comparison


def test_shared_prefix_stops_before_placeholders_and_images(head_model):
    """The prefix never includes an item token (its row's user token reads it), leaves a token
    to every row, and is not used with left padding, image inputs or a single row."""
    batch = _prefixed_batch()
    ids = batch["input_ids"].clone()
    ids[:, 4] = virtual_id("item", 5)  # same item token in every row, inside the prefix
    assert shared_prefix_length(head_model, {**batch, "input_ids": ids}) == 4
    same = {"input_ids": ids[:1].repeat(2, 1), "attention_mask": torch.ones(2, 13)}
    assert shared_prefix_length(head_model, same, minimum=1) == 4
    short = {"input_ids": batch["input_ids"][:, :8].clone(), "attention_mask": torch.ones(3, 8)}
    short["input_ids"][:, 6:] = 5
    assert shared_prefix_length(head_model, short) == 7
    left = {**batch, "attention_mask": batch["attention_mask"].flip(-1)}
    assert shared_prefix_length(head_model, left) == 0
    assert shared_prefix_length(head_model, {**batch, "pixel_values": torch.zeros(1)}) == 0
    one = {k: v[:1] for k, v in batch.items()}
    assert shared_prefix_length(head_model, one) == 0
