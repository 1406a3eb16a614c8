"""One computation per batch: the operator calls of one call on 8 images stay within 1.2× those on 1 image.

Every method is called through its public API (and MaskCLIP also through its predictor, which groups images of
equal size) on the tiny seeded ViT, CPU, fp32. Operator calls are counted at torch's dispatcher (ATen ops, what a
GPU would launch kernels for), so a Python loop over images or prompts shows up as calls growing with the batch.
The text cache is filled before counting (text encoding is per distinct prompt, not per image); the prompt lists
and mask counts differ between images, so padding and flattening are exercised.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from clipmaps.actors.methods.gem import GEM
from clipmaps.actors.methods.legrad import LeGrad
from clipmaps.actors.methods.maskclip import MaskCLIP
from clipmaps.actors.methods.maskinversion import MaskInversion
from clipmaps.actors.params import MaskCLIPParams, MaskInversionParams, ModelSpec
from clipmaps.actors.predictors import OutputOptions, Vocabulary
from clipmaps.actors.registry import REGISTRY
from clipmaps.schemas import batches as cols
from tests.helpers.opcount import OpCounter

logger = logging.getLogger(__name__)
LIMIT = 1.2
BATCH = 8
NAMES = ["red circle", "blue square", "green triangle", "yellow circle", "a dog"]


def count(fn) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def _prompts(n: int) -> list[list[str]]:
    return [NAMES[: 1 + i % len(NAMES)] for i in range(n)]  # 1 to 5 prompts per image


def _masks(n: int, size: int = 64) -> list[torch.Tensor]:
    out = []
    for i in range(n):
        m = torch.zeros(1 + i % 3, size, size)
        for j in range(m.shape[0]):
            m[j, 8 * j : 8 * j + 24, 4 * i : 4 * i + 30] = 1
        out.append(m)
    return out


def _check(name: str, one: OpCounter, many: OpCounter) -> None:
    ratio = many.total / one.total
    logger.info(f"op counts {name}: 1 image {one.total}, {BATCH} images {many.total} ({ratio:.2f}x)")
    grown = {k: (one.calls.get(k, 0), v) for k, v in many.calls.items() if v > one.calls.get(k, 0)}
    worst = sorted(grown.items(), key=lambda kv: kv[1][0] - kv[1][1])[:8]
    assert ratio <= LIMIT, (
        f"{name}: {many.total} operator calls for {BATCH} images vs {one.total} for 1 ({ratio:.2f}x); grown: {worst}"
    )


@pytest.fixture(scope="module")
def x():
    return torch.randn(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def test_gem_heatmaps_and_labels(tiny_vit, x):
    gem = GEM(tiny_vit.model, tiny_vit.tokenizer)
    gem.heatmaps(x, _prompts(BATCH))  # fills the text cache
    _check(
        "GEM.heatmaps", count(lambda: gem.heatmaps(x[:1], _prompts(1))), count(lambda: gem.heatmaps(x, _prompts(BATCH)))
    )
    gem.class_logits(x[:1], NAMES)
    _check("GEM.class_logits", count(lambda: gem.class_logits(x[:1], NAMES)), count(lambda: gem.class_logits(x, NAMES)))


def test_legrad_heatmaps(tiny_vit, x):
    legrad = LeGrad(tiny_vit.model, tiny_vit.tokenizer)
    legrad.heatmaps(x, _prompts(BATCH))
    _check(
        "LeGrad.heatmaps",
        count(lambda: legrad.heatmaps(x[:1], _prompts(1))),
        count(lambda: legrad.heatmaps(x, _prompts(BATCH))),
    )


def test_maskinversion_embed(tiny_vit, x):
    mi = MaskInversion(tiny_vit.model, MaskInversionParams(iterations=3))
    masks = _masks(BATCH)
    _check(
        "MaskInversion.embed",
        count(lambda: mi.embed(x[:1], masks[:1], return_maps=True)),
        count(lambda: mi.embed(x, masks, return_maps=True)),
    )


def test_maskclip_class_logits(tiny_vit, x):
    mc = MaskCLIP(tiny_vit.model, tiny_vit.tokenizer, MaskCLIPParams(templates="photo", ks_thresh=0.5, pd_thresh=0.2))
    mc.class_logits(x[:1], NAMES)
    _check(
        "MaskCLIP.class_logits", count(lambda: mc.class_logits(x[:1], NAMES)), count(lambda: mc.class_logits(x, NAMES))
    )


def test_maskclip_predictor_groups_equal_sizes(tiny_vit):
    """Keep-ratio inputs: eight rows of one size cost about what one row costs; a second size costs one more call."""
    from clipmaps.actors.actor import ActorConfig, MethodActor

    entry = REGISTRY["maskclip"]
    config = ActorConfig(
        method="maskclip",
        model=ModelSpec(name="clipmaps-tiny-vit", seed=0),
        settings=entry.settings(size=64),
        templates="photo",
        vocabulary=Vocabulary(names=tuple(NAMES[:4]), background=("background",)),
        options=OutputOptions(),
    )
    predictor = MethodActor(config).predictor
    g = np.random.default_rng(0)
    pixels = [g.standard_normal((3, 64, 80)).astype(np.float32) for _ in range(BATCH)]

    def rows(n, pix=pixels):
        return {cols.HEIGHT: [48] * n, cols.WIDTH: [60] * n, cols.PIXELS_MASKCLIP: pix[:n]}

    predictor.run(rows(1))
    one, many = count(lambda: predictor.run(rows(1))), count(lambda: predictor.run(rows(BATCH)))
    _check("MaskCLIP predictor", one, many)
    mixed = pixels[:4] + [g.standard_normal((3, 80, 64)).astype(np.float32) for _ in range(4)]
    two = count(lambda: predictor.run(rows(BATCH, mixed)))
    assert two.calls["aten.convolution.default"] == 2 * one.calls["aten.convolution.default"]
