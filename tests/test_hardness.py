"""HaRS item embeddings: title means, vision-feature means, fusion, the on-disk cache, λ."""

from __future__ import annotations

import pytest
import torch

from hanorec.hardness import (
    catalogue_embeddings,
    catalogue_key,
    image_embeddings,
    pair_hardness,
    title_embeddings,
)
from hanorec.losses import fuse_item_embeddings
from hanorec.models.families import image_features, unwrap
from hanorec.models.loading import load_backbone


def test_title_embedding_is_the_mean_of_the_title_token_embeddings(tiny_model_config):
    model, processor = load_backbone(tiny_model_config("tiny-llava"), for_training=False)
    tok = processor.tokenizer
    got = title_embeddings(model, tok, ["Toy Story (1995)", "Heat"])
    table = unwrap(model).get_input_embeddings().weight
    for row, title in enumerate(["Toy Story (1995)", "Heat"]):
        ids = tok(title, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(got[row], table[ids].mean(0))


@pytest.mark.parametrize("backbone", ["tiny-llava", "tiny-qwen2-vl", "tiny-idefics3"])
def test_image_embedding_is_the_mean_vision_feature(tiny_model_config, tiny_catalog, backbone):
    """Every item with an image gets the mean of the features its image tokens would receive;
    text-only items are masked out. Checked against a per-image call of the family accessor."""
    model, processor = load_backbone(tiny_model_config(backbone), for_training=False)
    paths = [tiny_catalog.image_path(i) for i in tiny_catalog.item_ids]
    paths = [str(p) if p else None for p in paths]
    matrix, mask = image_embeddings(model, processor.image_processor, paths, batch_size=4,
                                    progress=False)
    assert mask.tolist() == [p is not None for p in paths]
    assert matrix.shape[0] == len(paths) and torch.all(matrix[~mask] == 0)
    from PIL import Image

    from hanorec.hardness import _image_inputs

    single = _image_inputs(processor.image_processor, [Image.open(paths[3]).convert("RGB")])
    expected = image_features(model, single)[0].float().mean(0)
    torch.testing.assert_close(matrix[3], expected, rtol=1e-4, atol=1e-5)


def test_catalogue_embeddings_fuse_and_cache(tiny_model_config, tiny_catalog, tmp_path):
    model, processor = load_backbone(tiny_model_config("tiny-llava"), for_training=False)
    titles = tiny_catalog.titles
    paths = [str(p) if p else None for p in map(tiny_catalog.image_path, tiny_catalog.item_ids)]
    key = catalogue_key([], titles, paths)
    fused = catalogue_embeddings(model, processor, titles, paths, cache_dir=tmp_path, cache_key=key,
                                 progress=False)
    text = title_embeddings(model, processor.tokenizer, titles)
    image, mask = image_embeddings(model, processor.image_processor, paths, progress=False)
    torch.testing.assert_close(fused, fuse_item_embeddings(text, image, mask))
    torch.testing.assert_close(fused.norm(dim=1), torch.ones(len(titles)))
    # text-only item
    torch.testing.assert_close(fused[10], torch.nn.functional.normalize(text[10], dim=0))
    assert (tmp_path / f"item-embeddings-{key}.safetensors").is_file()
    with torch.no_grad():  # a changed model must not matter: the cache answers
        unwrap(model).get_input_embeddings().weight.add_(1.0)
    again = catalogue_embeddings(model, processor, titles, paths, cache_dir=tmp_path, cache_key=key,
                                 progress=False)
    assert torch.equal(again, fused)
    assert catalogue_key([], titles[:-1] + ["other"], paths) != key


def test_pair_hardness_lambda_is_sigmoid_delta_over_sigmoid_mean():
    """λ_i = σ(Δ_i) / σ(mean Δ) (eq. 6), so the pair with the largest Δ gets the largest λ."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1)
    chosen, rejected = torch.arange(6), torch.arange(6, 12)
    deltas, lam = pair_hardness(emb, chosen, rejected, top_k=5)
    torch.testing.assert_close(lam, torch.sigmoid(deltas) / torch.sigmoid(deltas.mean()))
    assert int(lam.argmax()) == int(deltas.argmax())


# --------------------------------------------------------------------------- embedding choices


def _encoder_model(views: int = 2):
    """A tiny LLaVA with an item encoder of ``views`` recommenders (random features)."""
    from test_forward import build
    from test_item_tokens import encoder

    from hanorec.item_tokens import attach_item_encoder

    model = build("llava")
    enc = attach_item_encoder(model, encoder(model.config.text_config.hidden_size, views=views))
    return model, enc


def test_head_and_collab_embeddings_read_view_0_of_the_item_encoder(tmp_path):
    """head: ItemEncoder.item_vectors(view=0) (the ranking head's vectors); collab: collab[0]
    (the full recommender), not a fold view; both float32 on CPU."""
    from hanorec.hardness import hardness_item_embeddings

    model, enc = _encoder_model(views=2)
    catalogue = [None] * enc.spec.num_items  # only its length is read for these two
    head = hardness_item_embeddings("head", model, None, catalogue, tmp_path, cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(head, enc.item_vectors(None, view=0).float())
        assert not torch.allclose(head, enc.item_vectors(None, view=1).float())
    collab = hardness_item_embeddings("collab", model, None, catalogue, tmp_path,
                                      cache_dir=tmp_path)
    assert torch.equal(collab, enc.collab[0].float())
    assert head.dtype == collab.dtype == torch.float32 and not head.requires_grad


def test_embedding_choices_fail_clearly(tmp_path):
    """No item encoder (a title read-out): head and collab say what they need; a catalogue of
    another size and an unknown kind are refused."""
    from test_forward import build

    from hanorec.hardness import hardness_item_embeddings

    plain = build("llava")
    with pytest.raises(ValueError, match="answer: head"):
        hardness_item_embeddings("head", plain, None, [None] * 5, tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="item_tokens"):
        hardness_item_embeddings("collab", plain, None, [None] * 5, tmp_path, cache_dir=tmp_path)
    model, enc = _encoder_model(views=1)
    with pytest.raises(ValueError, match="items, the catalogue"):
        hardness_item_embeddings("head", model, None, [None] * (enc.spec.num_items + 1), tmp_path,
                                 cache_dir=tmp_path)
    with pytest.raises(ValueError, match="hardness_embedding"):
        hardness_item_embeddings("title", model, None, [None], tmp_path, cache_dir=tmp_path)


@pytest.mark.parametrize("pairwise", [False, True])
def test_pair_lambdas_use_the_profile_temperature(tiny_catalog, pairwise):
    """λ per training row (eq. 6) from Δ with τ (eq. 5): S-DPO rows take the mean Δ over their
    negatives, pairwise rows one Δ per negative; a Yes/No row keeps λ = 1 and stays out of the
    mean Δ of eq. 6; τ = 1 is the default."""
    from hanorec.hardness import pair_lambdas
    from hanorec.losses import hardness_lambdas, pair_deltas

    ids = tiny_catalog.item_ids
    emb = torch.randn(len(ids), 6, generator=torch.Generator().manual_seed(0))
    rows = [{"chosen": ids[0], "rejected": [ids[1], ids[2]]},
            {"chosen": ids[3], "rejected": [ids[4], ids[9]]},
            {"chosen": ids[5], "rejected": [ids[6], ids[7]]},
            {"chosen": "Yes", "rejected": ["No", "No"]}]
    got = pair_lambdas(emb, rows, tiny_catalog, top_k=3, pairwise=pairwise, temperature=0.05)
    pos = torch.tensor([tiny_catalog.index[r["chosen"]] for r in rows[:3]])
    neg = torch.tensor([[tiny_catalog.index[x] for x in r["rejected"]] for r in rows[:3]])
    if pairwise:
        deltas = pair_deltas(emb, pos.repeat_interleave(2), neg.reshape(-1), top_k=3,
                             temperature=0.05)
        expected = torch.cat([hardness_lambdas(deltas).view(3, 2), torch.ones(1, 2)])
    else:
        deltas = pair_deltas(emb, pos, neg, top_k=3, temperature=0.05)
        expected = torch.cat([hardness_lambdas(deltas), torch.ones(1)])
    torch.testing.assert_close(got, expected)
    # the Yes/No row changes nothing for the item rows (it is not in the mean Δ)
    items_only = pair_lambdas(emb, rows[:3], tiny_catalog, top_k=3, pairwise=pairwise,
                              temperature=0.05)
    torch.testing.assert_close(got[:3], items_only)
    default = pair_lambdas(emb, rows, tiny_catalog, top_k=3, pairwise=pairwise)
    assert torch.equal(default, pair_lambdas(emb, rows, tiny_catalog, top_k=3,
                                             pairwise=pairwise, temperature=1.0))
    assert not torch.allclose(default, got)
