"""Item, poster and user tokens (hanorec/item_tokens.py) on tiny VLMs.

The encoder's vectors must land exactly where the virtual ids are, for every forward path:
checked against ``inputs_embeds`` built by hand (a path that never sees a virtual id), and the
shared-prompt forward (KV, packed) against the duplicated batch on LLaVA, Qwen2-VL (M-RoPE) and
Idefics3 with item and user tokens in the prompt, gradients included.
"""

from __future__ import annotations

import pytest
import torch
from test_forward import BLOCKS, build, prompt_batch, responses

from hanorec.baselines.sasrec import SASRecConfig, SASRecModel, _left_pad
from hanorec.forward import response_logps
from hanorec.item_tokens import (
    POSTER_BASE,
    USER_ID,
    VIRTUAL_BASE,
    EncoderSpec,
    ItemEncoder,
    attach_item_encoder,
    attached_encoder,
    detach_item_encoder,
    ensure_placeholders,
    load_item_encoder,
    row_views,
    save_item_encoder,
    virtual_id,
)

NUM_ITEMS = 10
SASREC = {"sasrec_hidden_size": 8, "sasrec_num_blocks": 1, "sasrec_num_heads": 1,
          "sasrec_max_len": 6,
          "sasrec_dropout": 0.0}


def encoder(hidden: int, *, image: bool = False, seed: int = 0, views: int = 1,
            prior: bool = False) -> ItemEncoder:
    """An encoder with random collaborative features and random recommenders (one per view),
    user token on."""
    torch.manual_seed(seed)
    spec = EncoderSpec(hidden=hidden, num_items=NUM_ITEMS, collab_dim=8, text=True, image=image,
                       user=True,
                       projector_hidden=16, sasrec=SASREC, views=views, prior=prior)
    recommenders = [SASRecModel(NUM_ITEMS, SASRecConfig(**SASREC)) for _ in range(views)]
    enc = ItemEncoder(spec).set_features(collab=torch.randn(views, NUM_ITEMS, 8),
                                         text=torch.randn(NUM_ITEMS, hidden),
                                         image=torch.randn(NUM_ITEMS, hidden) if image else None,
                                         sasrec_states=[r.state_dict() for r in recommenders],
                                         token_rms=0.5)
    return enc


def reference_state(enc: ItemEncoder, history: list[int], view: int = 0) -> torch.Tensor:
    """An independent SASRec forward with view ``view``'s weights over ``history``."""
    reference = SASRecModel(NUM_ITEMS, SASRecConfig(**SASREC)).eval()
    reference.load_state_dict(enc.sasrec[view].state_dict())
    return reference(_left_pad([history], SASREC["sasrec_max_len"]))[:, -1]


def with_item_tokens(batch: dict, *, seed: int = 5) -> tuple[dict, dict[tuple[int, int], int]]:
    """Replace the first three text tokens of each row by item tokens and the fourth by the
    user token (after them, as a prompt renders it); returns the batch and the item per position."""
    gen = torch.Generator().manual_seed(seed)
    ids = batch["input_ids"].clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for token in (58, 59, 60, 63):  # image blocks of the three families stay as they are
        special |= ids == token
    placed: dict[tuple[int, int], int] = {}
    for row in range(ids.shape[0]):
        text = ((batch["attention_mask"][row] == 1) & ~special[row]).nonzero().flatten().tolist()
        for position in text[:3]:
            item = int(torch.randint(NUM_ITEMS, (1,), generator=gen))
            ids[row, position] = virtual_id("item", item)
            placed[row, position] = item
        ids[row, text[3]] = USER_ID
        placed[row, text[3]] = -1
    return {**batch, "input_ids": ids}, placed


def test_virtual_ids_and_placeholders(tiny_backbone_dirs):
    """Kinds map to disjoint ranges above any vocabulary; placeholders are one special token
    each, in every tiny tokenizer, and registering them twice changes nothing."""
    from transformers import AutoProcessor

    assert virtual_id("item", 3) == VIRTUAL_BASE + 3 and virtual_id("poster", 3) == POSTER_BASE + 3
    assert virtual_id("user") == USER_ID > POSTER_BASE > VIRTUAL_BASE > 10**9
    with pytest.raises(ValueError, match="unknown item-token kind"):
        virtual_id("movie", 1)
    for folder in tiny_backbone_dirs.values():
        tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
        ids = ensure_placeholders(tokenizer)
        size = len(tokenizer)
        assert ensure_placeholders(tokenizer) == ids and len(tokenizer) == size
        assert len(set(ids.values())) == 3
        assert tokenizer("A<|item|>B",
                         add_special_tokens=False)["input_ids"].count(ids["item"]) == 1


def test_hook_places_projections_like_inputs_embeds():
    """Logits with virtual ids equal logits from ``inputs_embeds`` assembled by hand: the token
    table for ordinary ids, ``P_c(c_i)`` at item tokens, ``P_u(SASRec(items before))`` at the user
    token, computed with an independent SASRec forward."""
    model = build("llava")
    hidden = model.config.text_config.hidden_size
    enc = attach_item_encoder(model, encoder(hidden))
    batch, placed = with_item_tokens({"input_ids": torch.randint(1, 50, (2, 9)),
                                      "attention_mask": torch.ones(2, 9, dtype=torch.long)})
    ids = batch["input_ids"]
    with torch.no_grad():
        got = model(**batch).logits
        embeds = model.get_input_embeddings()(ids.masked_fill(ids >= VIRTUAL_BASE, 0)).clone()
        for (row, position), item in placed.items():
            if item >= 0:
                embeds[row, position] = enc.collab_proj(enc.collab[0, item])
            else:
                history = [i for (r, p),
                           i in sorted(placed.items()) if r == row and p < position and i >= 0]
                embeds[row, position] = enc.user_proj(reference_state(enc, history))[0]
        expected = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert (got - expected).abs().max() < 1e-5
    plain = model.get_input_embeddings()(ids.masked_fill(ids >= VIRTUAL_BASE, 0))
    assert not torch.allclose(plain, embeds)  # the substitution is not a no-op


@pytest.mark.parametrize("family", list(BLOCKS))
def test_shared_forward_with_item_tokens_matches_duplicate(family):
    """KV and packed log-probs within 1e-4 of the duplicated batch with item and user tokens in
    the prompts (left padding, K = 2), and the projectors' gradients within 1e-4 (relative)."""
    model = build(family)
    hidden = model.config.get_text_config().hidden_size
    enc = attach_item_encoder(model, encoder(hidden))
    batch, _ = with_item_tokens(prompt_batch(family, "left"))
    resp = responses(3, 3)
    weights = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    params = [p for p in enc.parameters() if p.requires_grad]

    def run(mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logps = response_logps(model, batch, resp, mode=mode)
        grads = torch.autograd.grad((logps * weights).sum(), params, allow_unused=True)
        return logps.detach(), [torch.zeros_like(p) if g is None else g for g,
                                p in zip(grads, params)]

    reference, reference_grads = run("duplicate")
    assert sum(float(g.abs().sum()) for g in reference_grads[:4]) > 0  # collab projector is used
    for mode in ("kv", "packed"):
        got, got_grads = run(mode)
        assert (got - reference).abs().max() < 1e-4, mode
        num = sum(float((a - b).pow(2).sum()) for a, b in zip(got_grads, reference_grads)) ** 0.5
        den = sum(float(b.pow(2).sum()) for b in reference_grads) ** 0.5
        assert num / den < 1e-4, mode


def test_each_row_reads_its_own_view():
    """Two views (cross-fitting): a row whose ids name view 1 gets view 1's item table and
    view 1's recommender state at its user token; a view-0 row in the same batch gets view 0's;
    the head's item vectors follow the row's view (:func:`row_views`); a row mixing views and
    a view past the encoder's are errors."""
    enc = encoder(16, views=2)
    history = [3, 7]
    rows = []
    for view in (0, 1):
        rows.append([9 + view] + [virtual_id("item", i, view=view, num_items=NUM_ITEMS)
                                  for i in history] + [virtual_id("user", view=view)])
    ids = torch.tensor(rows)
    with torch.no_grad():
        out = enc(ids, torch.zeros(2, 4, 16))
        for view in (0, 1):
            for n, item in enumerate(history):
                expected = enc.collab_proj(enc.collab[view, item])
                assert torch.allclose(out[view, 1 + n], expected, atol=1e-6)
            state = enc.user_proj(reference_state(enc, history, view))[0]
            assert torch.allclose(out[view, 3], state, atol=1e-5)
        assert not torch.allclose(out[0, 1:], out[1, 1:])  # the two views differ
        assert row_views(ids, NUM_ITEMS).tolist() == [0, 1]
        assert row_views(torch.tensor([[5, 6]]), NUM_ITEMS).tolist() == [0]
        assert not torch.allclose(enc.item_vectors(view=0), enc.item_vectors(view=1))
    mixed = torch.tensor([[virtual_id("item", 3), virtual_id("user", view=1)]])
    with pytest.raises(ValueError, match="mixes item tokens of several views"):
        enc(mixed, torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="out of range"):
        enc(torch.tensor([[virtual_id("item", 1, view=2, num_items=NUM_ITEMS)]]),
            torch.zeros(1, 1, 16))


def test_head_prior_adds_the_recommenders_own_score():
    """With the head prior, a row's head score of item v is sim(h, e_v) + w·⟨u, c_v⟩: h the
    answer state, u its view's SASRec state over the row's history (an independent forward), c_v
    the item's embedding in that view, w the learned scale (1 at start, here set to 2.5); rows
    of view 0 and view 1 each use their own recommender; with w = 0 the plain head's scores."""
    from hanorec.readout import answer_states, score_states, similarity

    model = build("llava")
    hidden = model.config.text_config.hidden_size
    enc = attach_item_encoder(model, encoder(hidden, views=2, prior=True))
    history = [3, 7, 1]
    ids = torch.tensor([[11] + [virtual_id("item", i, view=view, num_items=NUM_ITEMS)
                                for i in history] + [12, virtual_id("user", view=view)]
                        for view in (0, 1)])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        enc.prior_scale.fill_(2.5)
        states = answer_states(model, batch)
        assert states.shape == (2, hidden + 8)
        views = torch.tensor([0, 1])
        scores, columns, _ = score_states(enc, states, [[0, 4, 9], [2, 4, 5]], views)
        for row, view in enumerate((0, 1)):
            u = reference_state(enc, history, view)[0]
            assert torch.allclose(states[row, hidden:], u, atol=1e-5)
            vectors = enc.item_vectors(columns, view)
            expected = (similarity(states[row:row + 1, :hidden], vectors, "dot")[0]
                        + 2.5 * enc.collab[view][columns] @ u)
            assert torch.allclose(scores[row], expected, atol=1e-4)
        enc.prior_scale.fill_(0.0)  # w = 0: the plain head's scores
        base, _, _ = score_states(enc, states, [[0, 4, 9], [2, 4, 5]], views)
        for row, view in enumerate((0, 1)):
            plain = similarity(states[row:row + 1, :hidden], enc.item_vectors(columns, view), "dot")
            assert torch.allclose(base[row], plain[0], atol=1e-5)
        assert not torch.allclose(base, scores)
    with pytest.raises(ValueError, match="needs the user token"):
        EncoderSpec(hidden=8, num_items=4, collab_dim=2, prior=True)


def test_recommender_stays_frozen_and_in_eval_mode():
    """Training mode reaches the projectors, never the recommender (no dropout, no gradient)."""
    enc = encoder(16)
    enc.train()
    assert enc.training and not enc.sasrec.training
    assert not any(p.requires_grad for p in enc.sasrec.parameters())
    trainable = {n.split(".")[0] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"collab_proj", "user_proj", "head_text"}


def test_rescale_matches_the_token_rms():
    """After set_features(token_rms=r), the item projector's outputs on the real features have RMS
    r."""
    enc = encoder(16)
    with torch.no_grad():
        rms = enc.collab_proj(enc.collab[0]).pow(2).mean().sqrt()
    assert abs(float(rms) - 0.5) < 1e-4


def test_item_vectors_sum_the_enabled_terms():
    """Head vector = P_c(c_i) + W_t t_i + W_v m_i; W_t and W_v start at zero."""
    enc = encoder(16, image=True)
    index = torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.allclose(enc.item_vectors(index), enc.collab_proj(enc.collab[0, index]))
        enc.head_text.weight.fill_(0.1)
        enc.head_image.weight.fill_(-0.2)
        expected = (enc.collab_proj(enc.collab[0, index]) + enc.text[index] @ enc.head_text.weight.T
                    + enc.image[index] @ enc.head_image.weight.T)
        assert torch.allclose(enc.item_vectors(index), expected, atol=1e-6)
        assert enc.item_vectors().shape == (NUM_ITEMS, 16)


def test_poster_tokens_and_bad_ids():
    """Poster ids get P_v(m_i); ids past the catalogue or kinds the encoder lacks are errors."""
    enc = encoder(16, image=True)
    ids = torch.tensor([[5, POSTER_BASE + 2, VIRTUAL_BASE + 1]])
    out = enc(ids, torch.zeros(1, 3, 16))
    assert torch.equal(out[0, 0], torch.zeros(16))
    assert torch.allclose(out[0, 1], enc.poster_proj(enc.image[2]))
    with pytest.raises(ValueError, match="out of range"):
        enc(torch.tensor([[VIRTUAL_BASE + NUM_ITEMS]]), torch.zeros(1, 1, 16))
    with pytest.raises(ValueError, match="no such features"):
        encoder(16, image=False)(torch.tensor([[POSTER_BASE]]), torch.zeros(1, 1, 16))
    with pytest.raises(ValueError, match="no item token before it"):
        enc(torch.tensor([[USER_ID, VIRTUAL_BASE]]), torch.zeros(1, 2, 16))


def test_save_load_round_trip_and_detach(tmp_path):
    """An encoder saved and loaded gives the same logits; detaching restores the plain model."""
    model = build("llava")
    hidden = model.config.text_config.hidden_size
    enc = encoder(hidden)
    batch, _ = with_item_tokens({"input_ids": torch.randint(1, 50, (2, 9)),
                                 "attention_mask": torch.ones(2, 9, dtype=torch.long)})
    attach_item_encoder(model, enc)
    with torch.no_grad():
        before = model(**batch).logits
    save_item_encoder(enc, tmp_path)
    assert detach_item_encoder(model) is enc and attached_encoder(model) is None
    with pytest.raises(IndexError):
        model(**batch)  # without the hook, a virtual id is an out-of-range token
    attach_item_encoder(model, load_item_encoder(tmp_path))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert load_item_encoder(tmp_path / "missing") is None
