"""The R²ec dual head (hanorec.r2ec): marker handling, hidden-state extraction, item scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hanorec.data.prompt_config import PromptConfig
from hanorec.r2ec import (
    ItemTable,
    MarkerStop,
    close_trace,
    item_batch,
    item_scores,
    marker_ids,
    sample_traces,
    sequence_batch,
    state_and_token_logps,
)
from hanorec.runtime import make_collator

MARKER = [7, 8]


def test_close_trace_cuts_at_marker_or_stop_and_appends_otherwise() -> None:
    """[1, 7, 8, 5] → [1, 7, 8] (cut after the marker); [1, 0, 3] with stop {0} → [1, 7, 8];
    [1, 2] → [1, 2, 7, 8]; a lone 7 not followed by 8 is not the marker."""
    assert close_trace([1, 7, 8, 5], MARKER, {0}) == [1, 7, 8]
    assert close_trace([1, 0, 3], MARKER, {0}) == [1, 7, 8]
    assert close_trace([1, 2], MARKER, {0}) == [1, 2, 7, 8]
    assert close_trace([7, 1], MARKER, {0}) == [7, 1, 7, 8]


def test_marker_stop_only_on_generated_marker() -> None:
    """Prompt of length 2 = [7, 8]: the marker inside the prompt must not stop generation;
    row 0 ends with 7, 8 after the prompt → True; row 1 ends with 8, 7 → False."""
    stop = MarkerStop(MARKER, prompt_length=2)
    ids = torch.tensor([[7, 8, 1, 7, 8], [7, 8, 1, 8, 7]])
    assert stop(ids, None).tolist() == [True, False]
    assert stop(ids[:, :3], None).tolist() == [False, False]


def test_item_scores_are_cosine_over_tau() -> None:
    """u = (1, 0), items (2, 0) and (0, 3), τ = 0.5 → cos = 1 and 0 → scores 2 and 0."""
    scores = item_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]), 0.5)
    assert torch.allclose(scores, torch.tensor([[2.0, 0.0]]))
    with pytest.raises(ValueError, match="tau"):
        item_scores(torch.ones(1, 2), torch.ones(1, 2), 0.0)


@pytest.mark.parametrize("backbone", ["tiny-llava", "tiny-qwen2-vl"])
def test_scores_match_hand_computation_from_hidden_states(backbone, tiny_model_config,
                                                          tiny_catalog) -> None:
    """s(v) = cos(h_T, H_V[v]) / τ with h_T and H_V[v] extracted here, one sequence at a time,
    without padding: the final-layer hidden state at the last marker token of
    prompt ⊕ trace ⊕ <answer> (user) and of item prompt ⊕ <answer> (item, image when present)."""
    from hanorec.models.loading import load_backbone

    model, processor = load_backbone(tiny_model_config(backbone), for_training=False)
    collator = make_collator(processor, tiny_catalog, "full",
                             PromptConfig(image_budget=2, max_length=512))
    marker = marker_ids(collator.tokenizer)
    items = ["i0", "i3", "i10"]  # i10 has no image
    rows = [{"user_id": "u1", "history": ["i1", "i2"], "target": "i3"},
            {"user_id": "u2", "history": ["i4", "i5", "i6", "i7"], "target": "i8"}]
    words = collator.tokenizer("so it is", add_special_tokens=False)["input_ids"]
    traces = [words + marker, marker]  # unequal lengths: the batch is left-padded
    table = ItemTable(items, marker, batch_size=2)
    table.refresh(model, collator, progress=False)
    with torch.no_grad():
        users, _, _ = state_and_token_logps(model,
                                            sequence_batch(collator, rows, traces, reserve=4))
    got = table.scores(users, 0.02)

    def alone(batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            return model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]

    hand_users = torch.stack([alone(sequence_batch(collator, [r], [t], reserve=4)) for r,
                              t in zip(rows, traces)])
    hand_items = torch.stack([alone(item_batch(collator, [i], marker)) for i in items])
    expected = F.cosine_similarity(hand_users[:, None], hand_items[None], dim=-1) / 0.02
    assert torch.allclose(got, expected, atol=1e-3), (got, expected)
    assert got.shape == (2, 3)


def test_sampled_traces_end_with_marker_and_respect_budget(tiny_model_config, tiny_catalog) -> None:
    """Every sampled trace ends with the marker ids and has at most budget + |marker| tokens;
    token log-probs are ≤ 0 on the trace and 0 on padding."""
    from hanorec.models.loading import load_backbone

    model, processor = load_backbone(tiny_model_config("tiny-llava"), for_training=False)
    collator = make_collator(processor, tiny_catalog, "full",
                             PromptConfig(image_budget=1, max_length=512))
    marker = marker_ids(collator.tokenizer)
    rows = [{"user_id": "u1", "history": ["i1", "i2"], "target": "i3"}]
    torch.manual_seed(0)
    traces = sample_traces(model, collator, rows, num_traces=3, max_new_tokens=5, marker=marker,
                           temperature=1.0, top_k=20)
    assert len(traces) == 3
    special = set(collator.tokenizer.all_special_ids)
    for trace in traces:
        assert trace[-len(marker):] == marker and len(trace) <= 5 + len(marker)
        assert not special & set(trace)
    with torch.no_grad():
        _, logps, mask = state_and_token_logps(model,
                                               sequence_batch(collator, rows, traces,
                                                              reserve=5 + len(marker)))
    assert mask.sum(1).tolist() == [len(t) for t in traces]
    assert (logps[mask] <= 0).all() and (logps[~mask] == 0).all()


def test_joint_batch_gives_the_separate_states(tiny_model_config, tiny_catalog) -> None:
    """Users and items in one left-padded forward (joint_batch, what DDP needs) give the same
    states as sequence_batch and item_batch run separately (float32, atol 1e-4)."""
    from hanorec.models.loading import load_backbone
    from hanorec.r2ec import joint_batch, last_states

    model, processor = load_backbone(tiny_model_config("tiny-llava"), for_training=False)
    collator = make_collator(processor, tiny_catalog, "full",
                             PromptConfig(image_budget=2, max_length=512))
    marker = marker_ids(collator.tokenizer)
    rows = [{"user_id": "u1", "history": ["i1", "i2", "i3"], "target": "i4"}]
    traces = [collator.tokenizer("so", add_special_tokens=False)["input_ids"] + marker, marker]
    with torch.no_grad():
        joint = last_states(model,
                            joint_batch(collator, rows, traces, ["i4", "i11"], marker, reserve=6))
        users = last_states(model, sequence_batch(collator, rows, traces, reserve=6))
        items = last_states(model, item_batch(collator, ["i4", "i11"], marker))
    assert torch.allclose(joint, torch.cat([users, items]), atol=1e-4)
