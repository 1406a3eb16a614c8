"""MaskInversion's ``optimizer`` setting on the ViT path: a name and the same optimiser spelled as settings give the
same embeddings bit for bit; other settings change them (so they are honoured, and fingerprinted for a reason)."""

from __future__ import annotations

import torch

from clipmaps.actors.methods.maskinversion import MaskInversion
from clipmaps.actors.params import MaskInversionParams, OptimizerSettings


def _embed(tiny_vit, optimizer) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 64, 64, generator=g)
    masks = [(torch.rand(2, 64, 64, generator=g) > 0.5).float()]
    params = MaskInversionParams(iterations=3, lr=0.5, optimizer=optimizer)
    return MaskInversion(tiny_vit.model, params).embed(images, masks)[0].embeddings


def test_optimizer_settings_reach_the_vit_path(tiny_vit):
    named = _embed(tiny_vit, "adamw")
    assert torch.equal(named, _embed(tiny_vit, OptimizerSettings(name="adamw", betas=(0.9, 0.999), eps=1e-8)))
    assert not torch.allclose(named, _embed(tiny_vit, OptimizerSettings(name="adamw", betas=(0.5, 0.9))))
    assert not torch.allclose(named, _embed(tiny_vit, OptimizerSettings(name="sgd", momentum=0.9)))
