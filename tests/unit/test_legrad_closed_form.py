"""LeGrad's closed-form attention gradient equals autograd through an explicit forward (no upstream needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipmaps.actors.methods.legrad import LinearizedBlock
from clipmaps.actors.vit import VisionTower


def autograd_attention_gradient(tower: VisionTower, index: int, x_in: torch.Tensor, t: torch.Tensor):
    """∂⟨t_p, f⟩/∂A by autograd: A is a leaf, everything downstream is recomputed from it."""
    block = tower.blocks[index]
    with torch.no_grad():
        q, k, v = tower.qkv(index, block.ln_1(x_in[None]))
        attn = torch.softmax((q * tower.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
    grads = []
    for p in range(t.shape[0]):
        a = attn.clone().requires_grad_(True)
        y = x_in[None] + block.ls_1(tower.out_proj(index, tower.merge_heads(a @ v)))
        x_out = tower.mlp_residual(index, y)
        f = F.normalize(tower.project(x_out.mean(dim=1)), dim=-1)
        (g,) = torch.autograd.grad((f[0] * t[p]).sum(), a)
        grads.append(g[0])
    return torch.stack(grads)


def test_closed_form_matches_autograd(tiny_vit, images):
    """Both images of a batch linearised together, prompt rows routed to their image by index."""
    tower = VisionTower(tiny_vit.model.visual)
    with torch.no_grad():
        x, _ = tower.embed(images, antialias=True)
        x = tower.blocks_forward(x, 0, tower.num_layers - 1)
    t = F.normalize(torch.randn(5, tiny_vit.model.visual.proj.shape[1]), dim=-1)
    image = torch.tensor([0, 1, 1, 0, 1])
    index = tower.num_layers - 1
    closed = LinearizedBlock(tower, index, x).attention_gradient(t, image)
    for b in range(2):
        rows = (image == b).nonzero()[:, 0]
        reference = autograd_attention_gradient(tower, index, x[b], t[rows])
        rel = (closed[rows] - reference).norm() / reference.norm()
        assert rel < 1e-5, (b, rel)


def test_relevance_backward_matches_autograd():
    """MaskInversion's map-to-relevance step has its own backward (a boolean mask, no stored map): same gradient as
    autograd through ReLU and mean."""
    from clipmaps.actors.methods.legrad import _GradientRelevance

    g = torch.Generator().manual_seed(0)
    d_o = torch.randn(3, 2, 9, 4, generator=g, dtype=torch.float64)
    v = torch.randn(3, 2, 9, 4, generator=g, dtype=torch.float64)
    weights = torch.randn(3, 9, generator=g, dtype=torch.float64)
    a = d_o.clone().requires_grad_(True)
    (_GradientRelevance.apply(a, v) * weights).sum().backward()
    b = d_o.clone().requires_grad_(True)
    (F.relu(b @ v.transpose(-2, -1)).mean(dim=(1, 2)) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
