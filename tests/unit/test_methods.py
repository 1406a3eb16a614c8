"""Behaviour of the four methods beyond parity: batching, validation, no model mutation, no NaN."""

from __future__ import annotations

import pytest
import torch

from clipmaps.actors.methods.common import BackgroundRule, label_map
from clipmaps.actors.methods.gem import GEM, GEMParams
from clipmaps.actors.methods.legrad import LeGrad, LeGradParams
from clipmaps.actors.methods.maskclip import MaskCLIP, MaskCLIPParams
from clipmaps.actors.methods.maskinversion import MaskInversion, MaskInversionParams
from clipmaps.actors.models import state_dict_sha256

PROMPTS = [["cat", "dog", "sky"], ["red car"]]


def _masks():
    a = torch.zeros(3, 64, 64)
    a[0, :32] = 1
    a[1, :, :20] = 1
    a[2, 40:56, 40:56] = 1
    b = torch.zeros(2, 64, 64)
    b[0, 30:] = 1
    b[1, 5:25, 30:60] = 1
    return [a, b]


def test_batched_calls_equal_single_image_calls(tiny_vit, images):
    gem = GEM(tiny_vit.model, tiny_vit.tokenizer)
    legrad = LeGrad(tiny_vit.model, tiny_vit.tokenizer)
    for method in (gem, legrad):
        batched = method.heatmaps(images, PROMPTS)
        for i in range(2):
            single = method.heatmaps(images[i : i + 1], [PROMPTS[i]])[0]
            assert batched[i].shape == (len(PROMPTS[i]), 64, 64)
            torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=1e-4)


def test_maskinversion_batches_masks_of_several_images(tiny_vit, images):
    mi = MaskInversion(tiny_vit.model, MaskInversionParams(lr=0.5, iterations=4))
    masks = _masks()
    together = mi.embed(images, masks)
    for i in range(2):
        alone = mi.embed(images[i : i + 1], [masks[i]])[0]
        torch.testing.assert_close(together[i].embeddings, alone.embeddings, atol=1e-4, rtol=1e-4)
        assert together[i].embeddings.shape == (masks[i].shape[0], 32)
    # an image without masks is fine and returns nothing for it
    out = mi.embed(images, [masks[0], torch.zeros(0, 64, 64)])
    assert out[1].embeddings.shape == (0, 32)


def test_maskinversion_fits_the_masks(tiny_vit, images):
    """More iterations lower the Dice loss on every mask (the optimisation does something)."""
    masks = _masks()
    start = MaskInversion(tiny_vit.model, MaskInversionParams(lr=0.5, iterations=0)).embed(images, masks)
    end = MaskInversion(tiny_vit.model, MaskInversionParams(lr=0.5, iterations=20)).embed(images, masks)
    for s, e in zip(start, end):
        assert (e.loss < s.loss).all(), (s.loss, e.loss)


def test_methods_do_not_mutate_the_model(tiny_vit, images):
    before = state_dict_sha256(tiny_vit.model)
    pos = tiny_vit.model.visual.positional_embedding.clone()
    GEM(tiny_vit.model, tiny_vit.tokenizer).heatmaps(images, PROMPTS)
    LeGrad(tiny_vit.model, tiny_vit.tokenizer).heatmaps(images, PROMPTS)
    LeGrad(tiny_vit.model, tiny_vit.tokenizer).heatmaps(torch.randn(1, 3, 32, 48), [["cat"]])  # another size after
    MaskCLIP(tiny_vit.model, tiny_vit.tokenizer).class_logits(images, ["cat", "dog"])
    MaskInversion(tiny_vit.model).embed(images, _masks())
    assert state_dict_sha256(tiny_vit.model) == before
    assert torch.equal(tiny_vit.model.visual.positional_embedding, pos)
    assert not any(p.requires_grad for p in tiny_vit.model.parameters())


def test_constant_images_give_no_nan(tiny_vit):
    flat = torch.zeros(1, 3, 64, 64)
    for maps in (
        GEM(tiny_vit.model, tiny_vit.tokenizer).heatmaps(flat, [["cat"]]),
        LeGrad(tiny_vit.model, tiny_vit.tokenizer).heatmaps(flat, [["cat"]]),
    ):
        assert not maps[0].isnan().any()
    res = MaskInversion(tiny_vit.model, MaskInversionParams(iterations=2)).embed(flat, [torch.ones(1, 64, 64)])
    assert not res[0].embeddings.isnan().any()


def test_input_validation(tiny_vit, images):
    gem = GEM(tiny_vit.model, tiny_vit.tokenizer)
    with pytest.raises(ValueError, match="prompt list 1 is empty"):
        gem.heatmaps(images, [["cat"], []])
    with pytest.raises(ValueError, match="2 prompt lists for 1 images"):
        gem.heatmaps(images[:1], PROMPTS)
    with pytest.raises(ValueError, match="not a single string"):
        gem.heatmaps(images, "cat")
    with pytest.raises(ValueError, match="depth: 20 is out of range"):
        GEM(tiny_vit.model, tiny_vit.tokenizer, GEMParams(depth=20))
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        LeGrad(tiny_vit.model, tiny_vit.tokenizer, LeGradParams(layers=0))
    mi = MaskInversion(tiny_vit.model)
    with pytest.raises(ValueError, match=r"must be \[M, h, w\]"):
        mi.embed(images, [torch.ones(64, 64), torch.ones(1, 64, 64)])
    with pytest.raises(ValueError, match="1 mask stacks for 2 images"):
        mi.embed(images, [torch.ones(1, 64, 64)])
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        mi.embed(images[:1], [torch.full((1, 64, 64), 255.0)])
    with pytest.raises(ValueError, match="adamw"):
        MaskInversion(tiny_vit.model, MaskInversionParams(optimizer="lbfgs"))
    with pytest.raises(ValueError, match="ks_thresh"):
        MaskCLIP(tiny_vit.model, tiny_vit.tokenizer, MaskCLIPParams(ks_thresh=2.0))


def test_maskclip_resnet_and_odd_sizes(tiny_vit, tiny_rn):
    for lm in (tiny_vit, tiny_rn):
        mc = MaskCLIP(lm.model, lm.tokenizer, MaskCLIPParams(templates=("a photo of a {}.",)))
        out = mc.class_logits(torch.randn(2, 3, 60, 90), ["cat", "dog", "sky"], output_size=(30, 45))
        assert out.shape == (2, 3, 30, 45)
        assert out.abs().max() <= 1 + 1e-5  # cosines
    with pytest.raises(TypeError, match="ViT image tower"):
        GEM(tiny_rn.model, tiny_rn.tokenizer)


def test_label_map_background_rule():
    # two foreground classes + one background name; pixel 0 sure of class 0, pixel 1 torn, pixel 2 background
    logits = torch.tensor([[0.30, 0.200, 0.1], [0.25, 0.249, 0.1], [0.1, 0.1, 0.3]]).T.reshape(1, 3, 1, 3)
    labels, conf = label_map(logits, BackgroundRule(num_background=1))
    assert labels.tolist() == [[[1, 1, 0]]]
    labels, _ = label_map(logits, BackgroundRule(num_background=1, threshold=0.9))
    assert labels.tolist() == [[[1, 0, 0]]]  # the torn pixel falls below 0.9 confidence
    assert conf.shape == (1, 1, 3)
    with pytest.raises(ValueError, match="no foreground class"):
        label_map(logits, BackgroundRule(num_background=3))
