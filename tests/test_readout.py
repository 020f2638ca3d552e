"""Read-outs (hanorec/readout.py): the ranking head against hand computation, index labels."""

from __future__ import annotations

import math

import pytest
import torch
from test_forward import build
from test_item_tokens import encoder

from hanorec.collate import ChoiceBatch
from hanorec.item_tokens import attach_item_encoder
from hanorec.readout import (
    answer_logps,
    choice_columns,
    final_states,
    head_logps,
    last_positions,
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
