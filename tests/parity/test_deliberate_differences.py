"""Where clipmaps deliberately differs from upstream, each difference shown (README: "Deliberate differences")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipmaps.actors.methods.common import BackgroundRule, label_map
from clipmaps.actors.methods.gem import GEM
from clipmaps.actors.methods.legrad import LeGrad
from clipmaps.actors.methods.maskclip import MaskCLIP
from clipmaps.actors.models import load_model
from clipmaps.actors.vit import min_max

from .test_parity import CASES, arr, image_input


def test_maskclip_uses_the_models_layernorm_eps():
    """The original MaskCLIP config ran CLIP weights (trained with LN eps 1e-5) with eps 1e-6. clipmaps keeps the
    model's own eps: logits differ from an eps-1e-6 run by a small but non-zero amount."""
    lm = load_model("clipmaps-tiny-vit", seed=0)
    case = CASES["mc_vit"]
    mc = MaskCLIP(lm.model, lm.tokenizer)
    for batch in case["batches"].values():
        x = torch.cat([arr(r) for r in batch["inputs"]])
        ours = mc.patch_logits(x, case["classes"])
        diff = (ours - arr(batch["outputs"]["logits_85_eps1e-6"])).abs().max()
        assert 1e-7 < diff < 1e-4
        assert (ours - arr(batch["outputs"]["logits_85"])).abs().max() < 1e-6


def test_maskclip_crops_padding_instead_of_stretching_it():
    """For inputs that are not a multiple of the patch, the original pads, then resizes the padded score map onto
    the unpadded image (shifting every score towards the top-left by up to a patch). clipmaps resizes to the padded
    size and crops, so a score stays over the pixels its patch saw. On multiples of the patch both agree."""
    lm = load_model("clipmaps-tiny-vit", seed=0)
    mc = MaskCLIP(lm.model, lm.tokenizer, text_encoder=None)
    classes = ["cat", "dog"]
    x = torch.randn(1, 3, 60, 90, generator=torch.Generator().manual_seed(0))
    ours = mc.class_logits(x, classes)
    patch = mc.patch_logits(F.pad(x, (0, 6, 0, 4)), classes)
    stretched = F.interpolate(patch, size=(60, 90), mode="bilinear", align_corners=False)
    assert ours.shape == stretched.shape == (1, 2, 60, 90)
    assert (ours - stretched).abs().max() > 1e-3
    aligned = F.interpolate(patch, size=(64, 96), mode="bilinear", align_corners=False)[..., :60, :90]
    torch.testing.assert_close(ours, aligned)


def test_min_max_of_a_constant_map_is_zero_not_nan():
    """Upstream's min-max divides by (max - min) with no guard: a constant map becomes NaN."""
    flat = torch.full((1, 1, 4, 4), 0.5)
    upstream_style = (flat - flat.amin()) / (flat.amax() - flat.amin())
    assert upstream_style.isnan().all()
    assert min_max(flat).eq(0).all()


def test_gem_readme_background_recipe_marks_everything_background():
    """GEM's README thresholds softmax(min-max heatmaps) at 0.85; on maps in [0, 1] the best probability is at
    most e / (e + K - 1) < 0.85, so every pixel would be background. clipmaps thresholds softmax(100 · cosine)."""
    lm = load_model("clipmaps-tiny-vit", seed=0)
    gem = GEM(lm.model, lm.tokenizer)
    classes = ["cat", "dog", "sky"]
    x = image_input("sq0")
    heat = gem.heatmaps(x, [classes])[0][None]
    readme_probs = heat.softmax(dim=1)
    assert readme_probs.max() <= math.e / (math.e + len(classes) - 1) < 0.85
    labels, _ = label_map(gem.class_logits(x, classes), BackgroundRule(threshold=0.5))
    assert (labels > 0).any()


def test_legrad_keeps_the_callers_model_usable_at_any_size():
    """Upstream LeGrad writes the resampled positional embedding into the model, after which a call at another
    size fails. clipmaps resamples into a cache and can alternate sizes freely."""
    lm = load_model("clipmaps-tiny-vit", seed=0)
    before = lm.model.visual.positional_embedding.clone()
    legrad = LeGrad(lm.model, lm.tokenizer)
    for size in (64, 32, 48, 64):
        maps = legrad.heatmaps(torch.randn(1, 3, size, size), [["cat"]])
        assert maps[0].shape == (1, size, size)
    assert torch.equal(lm.model.visual.positional_embedding, before)
