"""LeGrad and MaskInversion on attention-pooling backbones (actors/methods/pooled*.py) beyond upstream parity
(tests/parity/test_parity_pooled.py): the closed-form kernel against autograd through the real pooling head,
per-prompt maps, batch invariance, refusals; and MaskInversion's optimizer settings (validation, fingerprint,
``make_optimizer``)."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from clipmaps.actors.methods.optim import make_optimizer
from clipmaps.actors.methods.pooled import PooledLeGrad, PooledTower, pooled_family, relevance
from clipmaps.actors.methods.pooled_maskinversion import PooledMaskInversion
from clipmaps.actors.models import load_model
from clipmaps.actors.params import LeGradParams, MaskInversionParams, OptimizerSettings

COCA = "clipmaps-tiny-coca"
SIGLIP = "clipmaps-tiny-mappool"


@cache
def coca():
    return load_model(COCA, seed=0)


@cache
def siglip():
    return load_model(SIGLIP, seed=0)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ the kernel
def _attention_gradient_by_autograd(tower: PooledTower, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``∂⟨t, f⟩/∂a`` of the pooled query's attention, by autograd through the model's own pooling modules."""
    v = tower.visual
    if tower.family == "coca":
        mha = v.attn_pool.attn
        x = v.attn_pool.ln_k(tokens)
        q = v.attn_pool.ln_q(v.attn_pool.query)[:1][None]  # query 0 only: the others never reach the score
        h, hd = mha.num_heads, mha.embed_dim // mha.num_heads
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        qh = F.linear(q, w_q, b_q).reshape(1, 1, h, hd).transpose(1, 2)
        kh = F.linear(x, w_k, b_k).reshape(1, -1, h, hd).transpose(1, 2)
        vh = F.linear(x, w_v, b_v).reshape(1, -1, h, hd).transpose(1, 2)
        a = torch.softmax(qh @ kh.transpose(-2, -1) / hd**0.5, dim=-1).requires_grad_(True)
        o = (a @ vh).transpose(1, 2).reshape(1, 1, -1)
        score = (mha.out_proj(o)[0, 0] @ v.proj * t).sum()
        (g,) = torch.autograd.grad(score, a)
        return g[0, :, 0, 1:]  # [H, patches]
    pool = v.trunk.attn_pool
    h, hd = pool.num_heads, pool.head_dim
    q = pool.q_norm(pool.q(pool.latent).reshape(1, 1, h, hd).transpose(1, 2))
    kv = pool.kv(tokens).reshape(1, -1, 2, h, hd).permute(2, 0, 3, 1, 4)
    k, vv = pool.k_norm(kv[0]), kv[1]
    a = torch.softmax(q * pool.scale @ k.transpose(-2, -1), dim=-1).requires_grad_(True)
    x = pool.proj((a @ vv).transpose(1, 2).reshape(1, 1, -1))
    x = x + pool.mlp(pool.norm(x))
    score = (F.normalize(x[:, 0], dim=-1) * t).sum()
    (g,) = torch.autograd.grad(score, a)
    return g[0, :, 0]


@pytest.mark.parametrize("which", ["coca", "siglip"])
def test_closed_form_kernel_is_the_autograd_gradient(which):
    lm = coca() if which == "coca" else siglip()
    tower = PooledTower(lm.model.visual)
    size = 40 if which == "coca" else 96
    with torch.no_grad():
        x, _ = tower.embed(_images(1, size))
        x = tower.run_blocks(x, 0, tower.num_layers)
    kernel = tower.kernel(x)
    t = F.normalize(torch.randn(2, kernel.shape[0], generator=torch.Generator().manual_seed(1)), dim=-1)
    for p in range(2):
        expected = _attention_gradient_by_autograd(tower, x, t[p])
        ours = torch.einsum("d,dhn->hn", t[p], kernel)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(relevance(kernel, t), F.relu(torch.einsum("pd,dhn->phn", t, kernel)).mean(1))


# ------------------------------------------------------------------------------------------------ LeGrad
def test_coca_heatmaps_per_prompt_batch_invariant_and_in_range():
    lm = coca()
    legrad = PooledLeGrad(lm.model, lm.tokenizer, LeGradParams(layers=2))
    assert legrad.family == "coca" and pooled_family(lm.model) == "coca"
    images = _images(3, 40)
    prompts = [["a cat", "a dog"], ["sky"], ["a red car", "a tree", "grass"]]
    maps = legrad.heatmaps(images, prompts)
    assert [tuple(m.shape) for m in maps] == [(2, 40, 40), (1, 40, 40), (3, 40, 40)]
    for m in maps:
        assert m.dtype == torch.float32 and m.amin() == 0 and m.amax() == 1
    alone = legrad.heatmaps(images[2:3].clone(), [prompts[2]])[0]
    assert torch.equal(alone, maps[2])  # an image's maps do not depend on its batch
    assert not torch.allclose(maps[2][0], maps[2][1])  # every prompt its own map
    small = legrad.heatmaps(images[:1], [prompts[0]], output_size=(10, 12))[0]
    assert small.shape == (2, 10, 12)


def test_non_square_inputs_resample_the_position_embedding():
    lm = coca()
    legrad = PooledLeGrad(lm.model, lm.tokenizer, LeGradParams(layers=1))
    x = _images(1, 48)[:, :, :32, :]  # 32 x 48: a 4 x 6 grid from the native 4 x 4
    maps = legrad.heatmaps(x, [["a cat"]])[0]
    assert maps.shape == (1, 32, 48) and maps.amax() == 1
    square = legrad.heatmaps(_images(1, 48), [["a cat"]])[0]
    assert square.shape == (1, 48, 48)


def test_siglip_correction_zeroes_the_empty_text_cells():
    lm = siglip()
    images = _images(1, 96)
    t = F.normalize(torch.randn(1, 768, generator=torch.Generator().manual_seed(2)), dim=-1)
    plain = PooledLeGrad(lm.model, lm.tokenizer, LeGradParams(layers=2), correction=False)
    corrected = PooledLeGrad(lm.model, lm.tokenizer, LeGradParams(layers=2))
    raw_plain = plain.raw_maps(images, text_embeddings=[t])[0]
    raw_corr = corrected.raw_maps(images, text_embeddings=[t])[0]
    assert raw_plain.shape == (1, 3, 3)  # the patch grid: SigLIP's min-max happens there
    zeroed = raw_corr == 0
    assert zeroed.any() and torch.equal(raw_corr[~zeroed], raw_plain[~zeroed])
    heat = corrected.heatmaps(images, text_embeddings=[t])[0]
    assert heat.shape == (1, 96, 96) and heat.min() >= 0 and heat.max() <= 1


def test_refusals_name_what_is_wrong():
    vit = load_model("clipmaps-tiny-vit", seed=0)
    with pytest.raises(TypeError, match="no attention-pooling head"):
        PooledLeGrad(vit.model, vit.tokenizer)
    lm = coca()
    with pytest.raises(ValueError, match="layers: 5 is out of range for the 4-layer image tower"):
        PooledLeGrad(lm.model, lm.tokenizer, LeGradParams(layers=5))
    legrad = PooledLeGrad(lm.model, lm.tokenizer)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        legrad.heatmaps(_images(1, 36), [["a cat"]])
    with pytest.raises(ValueError, match="give either prompts or text_embeddings"):
        legrad.heatmaps(_images(1, 32))
    with pytest.raises(ValueError, match=r"text embeddings must be \[P>0, D\]"):
        legrad.heatmaps(_images(1, 32), text_embeddings=[torch.zeros(0, 32)])
    with pytest.raises(ValueError, match="needs the tokenizer or an empty_embedding"):
        PooledMaskInversion(siglip().model)


# ------------------------------------------------------------------------------------------------ MaskInversion
def test_maskinversion_masks_are_independent_and_zero_masks_are_fine():
    lm = coca()
    mi = PooledMaskInversion(lm.model, MaskInversionParams(iterations=3, lr=0.1))
    images = _images(2, 32)
    m = torch.zeros(3, 32, 32)
    m[0, :16], m[1, 16:], m[2, :, :8] = 1, 1, 1
    together = mi.embed(images, [m, torch.zeros(0, 32, 32)], return_maps=True)
    assert together[0].embeddings.shape == (3, 32) and together[1].embeddings.shape == (0, 32)
    assert together[0].maps.shape == (3, 32, 32) and together[0].loss.shape == (3,)
    alone = mi.embed(images[:1].clone(), [m[1:2]])
    torch.testing.assert_close(alone[0].embeddings, together[0].embeddings[1:2], atol=1e-6, rtol=0)
    # with no step the embedding is where the optimisation starts: CoCa's own image embedding, normalised
    zero_steps = PooledMaskInversion(lm.model, MaskInversionParams(iterations=0)).embed(images[:1].clone(), [m[:1]])
    with torch.no_grad():
        e0 = lm.model.encode_image(images[:1], normalize=True)
    torch.testing.assert_close(zero_steps[0].embeddings, e0, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"masks for image 0 must hold values in \[0, 1\]"):
        mi.embed(images[:1], [m[:1] * 2])


# ------------------------------------------------------------------------------------------------ optimizer settings
def test_optimizer_names_keep_working_and_settings_are_validated():
    assert MaskInversionParams(optimizer="sgd").optimizer == "sgd"
    opt = MaskInversionParams(optimizer={"name": "adamw", "betas": [0.9, 0.99], "eps": 1e-6}).optimizer
    assert (
        isinstance(opt, OptimizerSettings)
        and opt.betas == (0.9, 0.99)
        and opt.torch_kwargs()
        == {
            "betas": (0.9, 0.99),
            "eps": 1e-6,
        }
    )
    bad = [
        ("adamww", "unknown optimizer 'adamww' (did you mean 'adamw'?); use one of adamw, adam, sgd"),
        ({"name": "adamx"}, "name: unknown optimizer 'adamx' (did you mean 'adam'?)"),
        ({"name": "adam", "momentum": 0.9}, "adam takes no momentum (SGD only)"),
        ({"name": "sgd", "betas": [0.9, 0.9]}, "sgd takes no betas (Adam/AdamW only)"),
        ({"name": "adamw", "betas": [0.9, 1.0]}, "betas.1: Input should be less than 1"),
        ({"name": "adamw", "eps": 0}, "eps: Input should be greater than 0"),
        ({"name": "sgd", "nesterov": True}, "Nesterov momentum needs momentum > 0"),
        ({"name": "adam", "lr": 1}, "lr: Extra inputs are not permitted"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=None) as err:
            MaskInversionParams(optimizer=value)
        assert message in str(err.value), (value, str(err.value))
    with pytest.raises(ValueError, match="weight decay given twice"):
        MaskInversionParams(wd=0.1, optimizer={"name": "adamw", "weight_decay": 0.1})


def test_make_optimizer_builds_what_the_settings_say():
    p = torch.zeros(3, requires_grad=True)
    named = make_optimizer([p], "adamw", lr=0.5, weight_decay=0.01)
    assert type(named) is torch.optim.AdamW
    group = named.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (0.5, 0.01, (0.9, 0.999), 1e-8)
    custom = make_optimizer(
        [p], OptimizerSettings(name="adam", betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2), lr=0.1, weight_decay=0.0
    )
    group = custom.param_groups[0]
    assert type(custom) is torch.optim.Adam and (group["betas"], group["eps"], group["weight_decay"]) == (
        (0.8, 0.9),
        1e-6,
        0.2,
    )
    sgd = make_optimizer([p], OptimizerSettings(name="sgd", momentum=0.9, nesterov=True), lr=0.1, weight_decay=0)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9
    # the settings reach the optimisation: other betas, other embeddings
    lm = coca()
    images, m = _images(1, 32), torch.zeros(1, 32, 32)
    m[0, :16] = 1
    a = PooledMaskInversion(lm.model, MaskInversionParams(iterations=4, lr=0.05)).embed(images, [m])
    b = PooledMaskInversion(
        lm.model, MaskInversionParams(iterations=4, lr=0.05, optimizer={"name": "adamw", "betas": [0.5, 0.9]})
    ).embed(images, [m])
    assert not torch.allclose(a[0].embeddings, b[0].embeddings)


def test_optimizer_settings_are_fingerprinted():
    from clipmaps.pipeline.fingerprint import params_hash
    from clipmaps.pipeline.spec import load_spec

    raw = {
        "input": {"manifest": "data/manifest.parquet"},
        "output": {"uri": "results"},
        "model": {"name": "clipmaps-tiny-vit", "seed": 0},
        "methods": {"maskinversion": {"size": 64}},
    }

    def hash_with(optimizer):
        spec = copy.deepcopy(raw)
        if optimizer is not None:
            spec["methods"]["maskinversion"]["optimizer"] = optimizer
        return params_hash(load_spec(spec), "maskinversion")

    default = hash_with(None)
    assert hash_with("adamw") == default  # a name alone is what it always was
    betas = hash_with({"name": "adamw", "betas": [0.9, 0.99]})
    assert len({default, betas, hash_with({"name": "adamw", "betas": [0.9, 0.98]}), hash_with("sgd")}) == 4
