"""The shared ViT toolkit and the text cache."""

from __future__ import annotations

import pytest
import torch

from clipmaps.actors.models import state_dict_sha256
from clipmaps.actors.text import ENSEMBLE_85, TextEncoder, resolve_templates
from clipmaps.actors.vit import VisionTower, min_max


def test_tower_reproduces_encode_image(tiny_vit):
    tower = VisionTower(tiny_vit.model.visual)
    x = torch.randn(3, 3, 32, 32)
    tokens, grid = tower.embed(x, antialias=True)
    assert grid == (4, 4)
    ours = tower.pooled(tower.blocks_forward(tokens))
    with torch.no_grad():
        ref = tiny_vit.model.encode_image(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_positional_embedding_resampling_is_cached_and_leaves_model_alone(tiny_vit):
    before = state_dict_sha256(tiny_vit.model)
    tower = VisionTower(tiny_vit.model.visual)
    a = tower.positional_embedding((8, 12), antialias=True)
    b = tower.positional_embedding((8, 12), antialias=False)
    assert a.shape == (1 + 8 * 12, 64)
    assert tower.positional_embedding((8, 12), antialias=True) is a
    assert not torch.allclose(a, b)  # antialias matters when upsampling 4 → 8/12
    torch.testing.assert_close(a[0], tiny_vit.model.visual.positional_embedding[0])  # class position kept
    assert tower.positional_embedding((4, 4), antialias=True).shape == (17, 64)
    assert state_dict_sha256(tiny_vit.model) == before


def test_tower_rejects_bad_inputs(tiny_vit, tiny_rn):
    tower = VisionTower(tiny_vit.model.visual)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        tower.embed(torch.randn(1, 3, 60, 64), antialias=True)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tower.embed(torch.randn(3, 64, 64), antialias=True)
    with pytest.raises(TypeError, match="ViT image tower"):
        VisionTower(tiny_rn.model.visual)


def test_min_max_handles_constant_maps():
    maps = torch.stack([torch.full((4, 4), 3.0), torch.arange(16.0).view(4, 4)])
    out = min_max(maps)
    assert not out.isnan().any()
    assert out[0].eq(0).all()
    assert out[1].min() == 0 and out[1].max() == 1


def test_text_cache_encodes_each_name_once(tiny_vit):
    enc = TextEncoder(tiny_vit.model, tiny_vit.tokenizer)
    a = enc.encode(["cat", "dog"], "ensemble85")
    assert enc.forwards == 2 * 85
    b = enc.encode(["dog", "cat", "bird"], "ensemble85")
    assert enc.forwards == 3 * 85  # only "bird" is new
    torch.testing.assert_close(b[1], a[0])
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
    enc.encode(["cat"], "photo")
    assert enc.forwards == 3 * 85 + 1  # another template set is another cache entry


def test_templates_and_vocabulary_validation(tiny_vit):
    assert len(ENSEMBLE_85) == 85 and ENSEMBLE_85[0] == "a bad photo of a {}."
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["no placeholder"])
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("nope")
    enc = TextEncoder(tiny_vit.model, tiny_vit.tokenizer)
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    with pytest.raises(ValueError, match="non-empty strings"):
        enc.encode(["cat", " "])
