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
