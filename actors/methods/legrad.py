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

One computation per batch: the trunk runs over ``[B, N, C]`` and the prompts of all images are one ``[M, D]``
tensor with the index of each row's image, so the per-layer gradients of every (image, prompt) come from one
set of products; the layers are upsampled together.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import LeGradParams
from ..text import RAW_TEMPLATE, TextEncoder, resolve_templates
from ..vit import VisionTower, activation_derivative, min_max, mlp_layers, rows_matmul
from .common import PromptLists, prompt_rows


class _LayerNormLinearization:
    """The VJP of a LayerNorm at fixed inputs ``x`` ``[..., C]``: a linear map of the cotangent."""

    def __init__(self, ln: nn.LayerNorm, x: Tensor):
        mu = x.mean(dim=-1, keepdim=True)
        self.inv_std = torch.rsqrt(x.var(dim=-1, keepdim=True, unbiased=False) + ln.eps)
        self.x_hat = (x - mu) * self.inv_std
        self.weight = ln.weight

    def vjp(self, grad: Tensor, rows: Tensor | None = None) -> Tensor:
        """Cotangent ``grad`` ``[R, ...]`` → input cotangent; ``rows`` ``[R]`` picks, for each, the input (first
        dim of ``x``) it belongs to (default: ``grad`` is aligned with ``x``)."""
        x_hat, inv_std = (self.x_hat, self.inv_std) if rows is None else (self.x_hat[rows], self.inv_std[rows])
        g = grad * self.weight if self.weight is not None else grad
        mean_g = g.mean(dim=-1, keepdim=True)
        mean_gx = (g * x_hat).mean(dim=-1, keepdim=True)
        return (g - mean_g - x_hat * mean_gx) * inv_std


class LinearizedBlock:
    """``t ↦ ∂⟨t, f⟩/∂A`` for one block and a batch of images, with everything independent of ``t`` precomputed.

    Args:
        tower: the :class:`VisionTower`.
        index: block index.
        x_in: ``[B, N, C]`` tokens entering the block.
    """

    #: Whether the per-image tensors are already gathered per row (:meth:`for_rows`).
    aligned = False

    def __init__(self, tower: VisionTower, index: int, x_in: Tensor):
        with torch.no_grad():
            internals = tower.block_with_internals(index, x_in, with_attention=False)
            block = tower.blocks[index]
            fc, act, proj_mlp = mlp_layers(block)
            self.block = block
            self.heads, self.head_dim = tower.heads, tower.head_dim
            self.num_tokens = x_in.shape[1]
            self.v = internals.v  # [B, H, N, hd]
            self.out_weight = block.attn.out_proj.weight  # [C, C]
            self.fc_weight = fc.weight  # [4C, C]
            self.proj_mlp_weight = proj_mlp.weight  # [C, 4C]
            self.act_grad = activation_derivative(act, internals.mlp_pre)  # [B, N, 4C]
            self.ln_2 = _LayerNormLinearization(block.ln_2, internals.y)
            mean = internals.x_out.mean(dim=1)  # [B, C]
            self.ln_post = _LayerNormLinearization(tower.visual.ln_post, mean)
            w = tower.project_rows(mean)  # [B, D]
            self.w_norm = w.norm(dim=-1, keepdim=True)  # [B, 1]
            self.feature = w / self.w_norm  # f, each image's normalised layer feature
            self.proj = tower.visual.proj.contiguous()  # [C, D]
            # row-major copies of both orientations of the small products' operands (see rows_matmul)
            self.proj_t = self.proj.T.contiguous()  # [D, C]
            self.proj_mlp_t = self.proj_mlp_weight.T.contiguous()  # [4C, C]
            self.x_out = internals.x_out

    def for_rows(self, image: Tensor) -> LinearizedBlock:
        """This block with its per-image tensors gathered once for rows of images ``image`` ``[M]``: its
        :meth:`attention_gradient` then takes ``t`` ``[M, D]`` aligned with those rows and no index (MaskInversion
        calls it every iteration with the same rows; the gathers would otherwise be repeated each time)."""
        rows = copy.copy(self)
        rows.feature, rows.w_norm, rows.act_grad, rows.v = (
            x[image] for x in (self.feature, self.w_norm, self.act_grad, self.v)
        )
        for name in ("ln_post", "ln_2"):
            ln = copy.copy(getattr(self, name))
            ln.x_hat, ln.inv_std = ln.x_hat[image], ln.inv_std[image]
            setattr(rows, name, ln)
        rows.aligned = True
        return rows

    def attention_gradient(self, t: Tensor, image: Tensor | None = None, *, relevance: bool = False) -> Tensor:
        """``∂⟨t_m, f_image[m]⟩/∂A`` for rows ``t`` ``[M, D]`` → ``[M, H, N, N]`` (differentiable in ``t``); with
        ``relevance``, its ReLU averaged over heads and query rows instead, ``[M, N]``.

        ``image`` ``[M]`` (int64) says which image of the batch each row belongs to; default all image 0 (a block
        from :meth:`for_rows` takes none: its rows are already aligned).
        """
        if self.aligned:
            image = None

            def pick(x):
                return x
        else:
            if image is None:
                image = torch.zeros(t.shape[0], dtype=torch.long, device=t.device)

            def pick(x):
                return x[image]

        f, wn = pick(self.feature), pick(self.w_norm)  # [M, D], [M, 1]
        dw = (t - (t * f).sum(-1, keepdim=True) * f) / wn  # through normalize
        d_mean = self.ln_post.vjp(rows_matmul(dw, self.proj_t, self.proj), image)  # through proj and ln_post, [M, C]
        u = self.block.ls_2(d_mean / self.num_tokens)  # every token's output gets the same cotangent
        d_act = rows_matmul(u, self.proj_mlp_weight, self.proj_mlp_t)[:, None, :] * pick(self.act_grad)  # [M, N, 4C]
        d_y = d_mean[:, None, :] / self.num_tokens + self.ln_2.vjp(d_act @ self.fc_weight, image)  # [M, N, C]
        d_o = self.block.ls_1(d_y) @ self.out_weight  # [M, N, C], merged heads before out_proj
        m, n, _ = d_o.shape
        d_o = d_o.view(m, n, self.heads, self.head_dim).transpose(1, 2)  # [M, H, N, hd]
        if relevance and t.requires_grad:  # MaskInversion: the map's own backward (see _GradientRelevance)
            return _GradientRelevance.apply(d_o, pick(self.v))
        g = d_o @ pick(self.v).transpose(-2, -1)  # [M, H, N, N]
        return g.relu_().mean(dim=(1, 2)) if relevance else g

    def relevance(self, t: Tensor, image: Tensor | None = None) -> Tensor:
        """LeGrad's per-patch relevance ``[M, N - 1]``: ReLU of the gradient, mean over heads and query rows,
        class column dropped (arguments as :meth:`attention_gradient`)."""
        return self.attention_gradient(t, image, relevance=True)[:, 1:]


class _GradientRelevance(torch.autograd.Function):
    """``relu(d_o @ vᵀ).mean(heads, query rows)`` with a backward that keeps only the sign of the map.

    ``d_o`` ``[M, H, N, hd]``, ``v`` ``[M, H, N, hd]`` (constant) → ``[M, N]``. Autograd's own backward would
    materialise the ``[M, H, N, N]`` map three more times (the mean's expanded gradient, its division, the ReLU's
    mask); here the backward turns the saved map into the ReLU's 0/1 mask in place and makes one batched product:
    ``∂/∂d_o = mask @ (w ⊙ v)`` with ``w`` the incoming gradient per key divided by ``H·N``.
    """

    @staticmethod
    def forward(ctx, d_o: Tensor, v: Tensor) -> Tensor:
        g = (d_o @ v.transpose(-2, -1)).relu_()  # [M, H, N, N]
        ctx.save_for_backward(g, v)
        return g.mean(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, v = ctx.saved_tensors
        heads, n = g.shape[1], g.shape[2]
        w = grad / (heads * n)  # [M, N]: each key's share of the mean
        # the saved map turned into the ReLU's 0/1 mask in place (no new [M, H, N, N] tensor): it is used only here,
        # so this backward runs once per forward (no retain_graph)
        return g.sign_() @ (w[:, None, :, None] * v), None


def trace_blocks(
    tower: VisionTower, images: Tensor, layers: int
) -> tuple[list[LinearizedBlock], Tensor, tuple[int, int]]:
    """Run the trunk once over the batch and linearise the last ``layers`` blocks.

    Args:
        images: ``[B, 3, H, W]`` normalised.

    Returns:
        ``(blocks, final_tokens, grid)``: the linearised blocks (first to last, each over the whole batch),
        ``final_tokens`` ``[B, N, C]`` the last block's output.
    """
    first = tower.num_layers - layers
    with torch.no_grad():
        x, grid = tower.embed(images, antialias=True)
        x = tower.blocks_forward(x, 0, first)
    blocks = []
    for index in range(first, tower.num_layers):
        blocks.append(LinearizedBlock(tower, index, x))
        x = blocks[-1].x_out
    return blocks, x, grid


def relevance_maps(
    blocks: Sequence[LinearizedBlock],
    t: Tensor,
    grid: tuple[int, int],
    patch: int,
    output_size: tuple[int, int] | None = None,
    image: Tensor | None = None,
) -> Tensor:
    """Sum over layers of upsampled relevance: rows ``t`` ``[M, D]`` (of images ``image`` ``[M]``, default all
    image 0) → ``[M, h, w]``, before min-max.

    Each layer's ``[M, gh, gw]`` relevance is upsampled bilinearly to ``output_size`` (default
    ``gh*patch × gw*patch``, as upstream) and summed.
    """
    gh, gw = grid
    size = tuple(output_size) if output_size else (gh * patch, gw * patch)
    # the layers' relevances stacked along the channels: one upsampling for all layers and rows
    r = torch.stack([block.relevance(t, image) for block in blocks], dim=1)  # [M, L, hw]
    up = F.interpolate(r.reshape(t.shape[0], len(blocks), gh, gw), size=size, mode="bilinear", align_corners=False)
    total = up[:, 0]
    for layer in range(1, len(blocks)):  # summed in layer order, as upstream accumulates
        total = total + up[:, layer]
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
        self._maps = self._compute_maps

    def compile(self, **options) -> None:
        """Run the trunk, the linearised blocks and the maps through ``torch.compile`` (``options`` as its)."""
        self._maps = torch.compile(self._compute_maps, **options)

    def _compute_maps(self, images: Tensor, t: Tensor, image: Tensor, output_size, normalize: bool) -> Tensor:
        blocks, _, grid = trace_blocks(self.tower, images, self.params.layers)
        maps = relevance_maps(blocks, t, grid, self.tower.patch_size, output_size, image)
        return min_max(maps) if normalize else maps

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
        t, counts = prompt_rows(self.text, self.templates, prompts, text_embeddings, batch, images.device)
        if batch == 0:
            return []
        image = torch.repeat_interleave(
            torch.arange(batch, device=images.device), torch.tensor(counts, device=images.device)
        )
        with torch.no_grad():
            # every prompt of every image in one computation: rows [M, D] and the image each belongs to
            maps = self._maps(images, t, image, output_size, normalize)
        return list(torch.split(maps, counts))
