"""LeGrad (arXiv 2404.03214): explainability maps from gradients w.r.t. attention maps, batched.

For each of the last ``layers`` blocks l, the image feature ``f_l = normalize(ln_post(mean_i x_l,i) @ proj)``
(mean over all tokens of the block's output) is scored against a prompt ``t``; the map is
``ReLU(∂⟨t, f_l⟩/∂A_l)`` averaged over heads and query rows, without the class column, upsampled by the patch
size and summed over layers, then min-max normalised. Upstream: ``legrad/wrapper.py`` ``compute_legrad_clip``.

Upstream forwards one image copy per prompt through the whole backbone and lets autograd walk hooked
blocks. Here the trunk runs once per image and ``∂⟨t, f⟩/∂A`` is computed in closed form (a
:class:`LinearizedBlock`): the gradient reaching every token is the same vector ``u`` (the mean's
cotangent), so the MLP's back-projection ``W2ᵀu`` is computed once per prompt instead of once per token.
The map is linear in ``t`` up to the ReLU and differentiable in ``t``, which MaskInversion relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import LeGradParams
from ..text import RAW_TEMPLATE, TextEncoder, resolve_templates
from ..vit import VisionTower, activation_derivative, min_max, mlp_layers, split_images
from .common import PromptLists, check_prompt_lists


class _LayerNormLinearization:
    """The VJP of a LayerNorm at fixed inputs: a linear map of the cotangent."""

    def __init__(self, ln: nn.LayerNorm, x: Tensor):
        mu = x.mean(dim=-1, keepdim=True)
        self.inv_std = torch.rsqrt(x.var(dim=-1, keepdim=True, unbiased=False) + ln.eps)
        self.x_hat = (x - mu) * self.inv_std
        self.weight = ln.weight

    def vjp(self, grad: Tensor) -> Tensor:
        g = grad * self.weight if self.weight is not None else grad
        mean_g = g.mean(dim=-1, keepdim=True)
        mean_gx = (g * self.x_hat).mean(dim=-1, keepdim=True)
        return (g - mean_g - self.x_hat * mean_gx) * self.inv_std


class LinearizedBlock:
    """``t ↦ ∂⟨t, f⟩/∂A`` for one block and one image, with everything independent of ``t`` precomputed.

    Args:
        tower: the :class:`VisionTower`.
        index: block index.
        x_in: ``[N, C]`` tokens entering the block (one image).
    """

    def __init__(self, tower: VisionTower, index: int, x_in: Tensor):
        with torch.no_grad():
            internals = tower.block_with_internals(index, x_in[None])
        block = tower.blocks[index]
        fc, act, proj_mlp = mlp_layers(block)
        self.block = block
        self.heads, self.head_dim = tower.heads, tower.head_dim
        self.num_tokens = x_in.shape[0]
        self.attn = internals.attn[0]  # [H, N, N] (kept for callers who want it)
        self.v = internals.v[0]  # [H, N, hd]
        self.out_weight = block.attn.out_proj.weight  # [C, C]
        self.fc_weight = fc.weight  # [4C, C]
        self.proj_mlp_weight = proj_mlp.weight  # [C, 4C]
        self.act_grad = activation_derivative(act, internals.mlp_pre[0])  # [N, 4C]
        self.ln_2 = _LayerNormLinearization(block.ln_2, internals.y[0])
        mean = internals.x_out[0].mean(dim=0)  # [C]
        self.ln_post = _LayerNormLinearization(tower.visual.ln_post, mean)
        w = tower.project(mean)  # [D]
        self.w_norm = w.norm()
        self.feature = w / self.w_norm  # f, the layer's normalised image feature
        self.proj = tower.visual.proj  # [C, D]
        self.x_out = internals.x_out[0]

    def attention_gradient(self, t: Tensor) -> Tensor:
        """``∂⟨t_p, f⟩/∂A`` for prompts ``t`` ``[P, D]`` → ``[P, H, N, N]`` (differentiable in ``t``)."""
        f = self.feature
        dw = (t - (t @ f)[:, None] * f) / self.w_norm  # through normalize
        d_mean = self.ln_post.vjp(dw @ self.proj.T)  # through proj and ln_post, [P, C]
        u = self.block.ls_2(d_mean / self.num_tokens)  # every token's output gets the same cotangent
        d_act = (u @ self.proj_mlp_weight)[:, None, :] * self.act_grad  # [P, N, 4C]
        d_y = d_mean[:, None, :] / self.num_tokens + self.ln_2.vjp(d_act @ self.fc_weight)  # [P, N, C]
        d_o = self.block.ls_1(d_y) @ self.out_weight  # [P, N, C], merged heads before out_proj
        p, n, _ = d_o.shape
        d_o = d_o.view(p, n, self.heads, self.head_dim).transpose(1, 2)  # [P, H, N, hd]
        return d_o @ self.v.transpose(-2, -1)[None]  # [P, H, N, N]

    def relevance(self, t: Tensor) -> Tensor:
        """LeGrad's per-patch relevance ``[P, N - 1]``: ReLU of the gradient, mean over heads and query rows,
        class column dropped."""
        return F.relu(self.attention_gradient(t)).mean(dim=(1, 2))[:, 1:]


def trace_blocks(
    tower: VisionTower, images: Tensor, layers: int
) -> tuple[list[list[LinearizedBlock]], Tensor, tuple[int, int]]:
    """Run the trunk once and linearise the last ``layers`` blocks for every image.

    Args:
        images: ``[B, 3, H, W]`` normalised.

    Returns:
        ``(per_image, final_tokens, grid)``: ``per_image[b]`` lists the linearised blocks of image ``b`` (first
        to last), ``final_tokens`` ``[B, N, C]`` the last block's output.
    """
    first = tower.num_layers - layers
    grid = tower.grid(*images.shape[-2:])
    per_image: list[list[LinearizedBlock]] = []
    final = []
    for image in split_images(images):  # one image at a time: nothing depends on the batch (actors/vit.py)
        with torch.no_grad():
            x, _ = tower.embed(image, antialias=True)
            x = tower.blocks_forward(x, 0, first)
        blocks = []
        for index in range(first, tower.num_layers):
            blocks.append(LinearizedBlock(tower, index, x[0]))
            x = blocks[-1].x_out[None]
        per_image.append(blocks)
        final.append(x)
    if not final:
        return per_image, images.new_zeros(0, 1 + grid[0] * grid[1], tower.width), grid
    return per_image, torch.cat(final), grid


def relevance_maps(
    blocks: Sequence[LinearizedBlock],
    t: Tensor,
    grid: tuple[int, int],
    patch: int,
    output_size: tuple[int, int] | None = None,
) -> Tensor:
    """Sum over layers of upsampled relevance for one image: ``t`` ``[P, D]`` → ``[P, h, w]``, before min-max.

    Each layer's ``[P, gh, gw]`` relevance is upsampled bilinearly to ``output_size`` (default
    ``gh*patch × gw*patch``, as upstream) and summed.
    """
    gh, gw = grid
    size = tuple(output_size) if output_size else (gh * patch, gw * patch)
    total = 0
    for block in blocks:
        r = block.relevance(t).reshape(1, -1, gh, gw)
        total = total + F.interpolate(r, size=size, mode="bilinear", align_corners=False)[0]
    return total


class LeGrad:
    """LeGrad heatmaps for batches of images, each with its own prompts.

    Args:
        model: an open_clip CLIP model with a ViT image tower (not modified).
        tokenizer: its tokenizer.
        params: :class:`LeGradParams`.
        text_encoder: a shared :class:`TextEncoder` (one is made if not given).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        params: LeGradParams | None = None,
        *,
        text_encoder: TextEncoder | None = None,
    ):
        params = params if params is not None else LeGradParams()
        self.tower = VisionTower(model.visual)
        params.check_model(self.tower.info(model))
        self.params = params
        # null templates (a job falls back to its vocabulary's) mean the method's own upstream default here
        self.templates = resolve_templates(params.templates if params.templates is not None else RAW_TEMPLATE)
        self.text = text_encoder or TextEncoder(model, tokenizer)

    def heatmaps(
        self,
        images: Tensor,
        prompts: PromptLists | None = None,
        *,
        text_embeddings: Sequence[Tensor] | None = None,
        output_size: tuple[int, int] | None = None,
        normalize: bool = True,
    ) -> list[Tensor]:
        """Heatmaps per image and prompt.

        Args:
            images: ``[B, 3, H, W]`` normalised, H and W multiples of the patch size (non-square is fine).
            prompts: one list of prompt strings per image (or one list for all), encoded with the templates;
                or instead ``text_embeddings``: one ``[P_i, D]`` tensor per image, L2-normalised.
            output_size: ``(h, w)``; default the input size.
            normalize: min-max each map to [0, 1] (constant maps give zeros); ``False`` returns the raw
                layer sum.

        Returns:
            one ``[P_i, h, w]`` float32 tensor per image.
        """
        batch = images.shape[0]
        if (prompts is None) == (text_embeddings is None):
            raise ValueError("give either prompts or text_embeddings")
        if prompts is not None:
            lists = check_prompt_lists(prompts, batch)
            text_embeddings = [self.text.encode(p, self.templates) for p in lists]
        elif len(text_embeddings) != batch:
            raise ValueError(f"got {len(text_embeddings)} text embedding sets for {batch} images")
        per_image, _, grid = trace_blocks(self.tower, images, self.params.layers)
        out = []
        with torch.no_grad():
            for blocks, t in zip(per_image, text_embeddings):
                if t.ndim != 2 or t.shape[0] == 0:
                    raise ValueError(f"text embeddings must be [P>0, D], got {list(t.shape)}")
                maps = relevance_maps(
                    blocks, t.to(images.device, torch.float32), grid, self.tower.patch_size, output_size
                )
                out.append(min_max(maps) if normalize else maps)
        return out
