"""Shared ViT toolkit: read-only access to an open_clip ``VisionTransformer``'s internals.

Every method builds on this instead of patching the model: positional-embedding resampling per method
(GEM/LeGrad/MaskInversion antialiased, MaskCLIP not), the trunk of standard blocks (SDPA), one block's
pieces (``ln_1`` → q, k, v → attention → ``out_proj`` → MLP) and the output head (``ln_post`` → ``proj``).
Nothing here writes to the model; caches are keyed by grid size, flag, device and dtype.

Token tensors are batch-first: ``[B, N, C]`` with ``N = 1 + gh * gw`` (class token first, patches row-major).
Per-head tensors are ``[B, H, N, hd]``.

Batching: every method runs its whole batch as one computation (one trunk forward over ``[B, N, C]``, the
prompts or masks of all images as one padded or flattened tensor), so the number of operator calls, hence kernel
launches on a GPU, does not grow with the batch. Results still do not depend on what else shares a batch on the
CPU: a matrix product's row (or column) is rounded the same way whatever the row count — except when a side is
1, where the BLAS takes its matrix-vector path and rounds differently (measured: ``[1, C] @ proj`` vs
``[B > 1, C] @ proj`` differ by up to 6e-7). :func:`rows_matmul` therefore never hands a one-row product to the
BLAS as a matrix-vector product, and the methods pad prompt lists to at least two. GPU kernels may pick other
algorithms per shape; there the promise is a tolerance (README, "Batch invariance").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from .params import ModelInfo


@dataclass
class BlockInternals:
    """What one block computed, for methods that differentiate through it (LeGrad, MaskInversion).

    Shapes: ``x_in``/``y``/``x_out`` ``[B, N, C]``; ``v`` ``[B, H, N, hd]``; ``attn`` ``[B, H, N, N]``
    (post-softmax; None when not asked for); ``mlp_pre`` ``[B, N, 4C]`` (MLP pre-activation).
    """

    x_in: Tensor
    v: Tensor
    attn: Tensor | None
    y: Tensor
    mlp_pre: Tensor
    x_out: Tensor


class VisionTower:
    """A read-only view of an open_clip ViT image tower.

    Args:
        visual: ``model.visual`` of an open_clip CLIP model; must be a ``VisionTransformer`` built from
            standard ``ResidualAttentionBlock``s (open_clip ≥ 2.26, batch-first) without an attention pooler.
    """

    def __init__(self, visual: nn.Module):
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"this method needs a ViT image tower (open_clip VisionTransformer), got {type(visual).__name__}; "
                "ResNet backbones are supported by MaskCLIP only"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("ViTs with an attention pooler (CoCa-style) are not supported")
        blocks = list(visual.transformer.resblocks)
        for i, block in enumerate(blocks):
            if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
                raise TypeError(f"block {i} is a {type(block).__name__}; only standard CLIP blocks are supported")
            if not block.attn.batch_first:
                raise TypeError("sequence-first transformer blocks (open_clip < 2.26) are not supported")
            if hasattr(block, "ln_1_kv"):
                raise TypeError(f"block {i} is a cross-attention block; not a CLIP image tower")
            mlp_layers(block)  # validates the MLP's shape
        self.visual = visual
        self.blocks = blocks
        self.num_layers = len(blocks)
        self.width = visual.conv1.out_channels
        self.heads = blocks[0].attn.num_heads
        self.head_dim = self.width // self.heads
        patch = visual.conv1.kernel_size
        if patch[0] != patch[1] or visual.conv1.stride != patch:
            raise TypeError(f"non-square or overlapping patches {patch} are not supported")
        self.patch_size = patch[0]
        n_pos = visual.positional_embedding.shape[0] - 1
        side = math.isqrt(n_pos)
        if side * side != n_pos:
            raise TypeError(f"positional embedding of {n_pos} patches is not a square grid")
        self.native_grid = (side, side)
        self._pos_cache: dict[tuple, Tensor] = {}

    def info(self, model: nn.Module | None = None) -> ModelInfo:
        """This tower as a :class:`~clipmaps.actors.params.ModelInfo` (for the params' model-dependent bounds)."""
        name = getattr(model, "name", None) or type(model if model is not None else self.visual).__name__
        return ModelInfo(name=name, family="vit", layers=self.num_layers, patch_size=self.patch_size)

    # ---------------------------------------------------------------- embedding
    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` for an input of ``height × width`` pixels (both multiples of the patch)."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {p}; "
                "resize or pad the input (clipmaps.pipeline.decode.preprocess does this)"
            )
        return height // p, width // p

    def positional_embedding(self, grid: tuple[int, int], *, antialias: bool) -> Tensor:
        """Positional embedding ``[1 + gh*gw, C]`` for ``grid``, bicubic-resampled from the native grid.

        Only the patch part is resized; the class position is kept. ``antialias=True`` matches GEM/LeGrad
        (timm's ``resample_abs_pos_embed``), ``False`` matches original MaskCLIP (mmseg ``resize``).
        Cached per (grid, antialias, device, dtype); the model is never modified.
        """
        pos = self.visual.positional_embedding
        key = (tuple(grid), antialias, pos.device, pos.dtype)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        if tuple(grid) == self.native_grid:
            out = pos.detach()
        else:
            cls_pos, patch_pos = pos[:1], pos[1:]
            gh0, gw0 = self.native_grid
            patch_pos = patch_pos.reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(
                patch_pos, size=tuple(grid), mode="bicubic", antialias=antialias, align_corners=False
            )
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
            out = torch.cat([cls_pos, patch_pos], dim=0).detach()
        self._pos_cache[key] = out
        return out

    def embed(self, images: Tensor, *, antialias: bool) -> tuple[Tensor, tuple[int, int]]:
        """Patch-embed ``images`` ``[B, 3, H, W]`` (normalised) into tokens ``[B, N, C]`` after ``ln_pre``.

        Returns the tokens and the grid ``(gh, gw)``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        grid = self.grid(images.shape[-2], images.shape[-1])
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid, antialias=antialias).to(x.dtype)
        x = v.ln_pre(x)
        return x, grid

    # ---------------------------------------------------------------- blocks
    def qkv(self, index: int, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split ``in_proj(y)`` of block ``index`` into heads: q, k, v each ``[B, H, N, hd]``.

        ``y`` is the block's ``ln_1`` output ``[B, N, C]``.
        """
        attn = self.blocks[index].attn
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
        b, n, _ = y.shape
        qkv = qkv.view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, o: Tensor) -> Tensor:
        """``[B, H, N, hd]`` → ``[B, N, C]``."""
        b, h, n, d = o.shape
        return o.transpose(1, 2).reshape(b, n, h * d)

    def out_proj(self, index: int, o: Tensor) -> Tensor:
        """Block ``index``'s attention output projection of merged heads ``[B, N, C]`` (bias included)."""
        attn = self.blocks[index].attn
        return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)

    def mlp_residual(self, index: int, y: Tensor) -> Tensor:
        """``y + ls_2(mlp(ln_2(y)))`` for block ``index``."""
        block = self.blocks[index]
        return y + block.ls_2(block.mlp(block.ln_2(y)))

    def block(self, index: int, x: Tensor) -> Tensor:
        """Standard forward of block ``index`` on ``x`` ``[B, N, C]`` with fused attention (SDPA)."""
        block = self.blocks[index]
        q, k, v = self.qkv(index, block.ln_1(x))
        o = F.scaled_dot_product_attention(q, k, v)
        y = x + block.ls_1(self.out_proj(index, self.merge_heads(o)))
        return self.mlp_residual(index, y)

    def blocks_forward(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Run blocks ``start … stop-1`` (standard forward) on tokens ``[B, N, C]``."""
        for i in range(start, self.num_layers if stop is None else stop):
            x = self.block(i, x)
        return x

    def block_with_internals(self, index: int, x: Tensor, *, with_attention: bool = True) -> BlockInternals:
        """Forward of block ``index`` keeping what gradient-based methods need; with ``with_attention`` the
        attention is explicit and its map kept (``attn``), else fused (SDPA, ``attn`` None: LeGrad's closed form
        never reads the map, and an ``[B, H, N, N]`` map is the largest tensor of the block)."""
        block = self.blocks[index]
        q, k, v = self.qkv(index, block.ln_1(x))
        if with_attention:
            attn = torch.softmax((q * self.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
            o = attn @ v
        else:
            attn, o = None, F.scaled_dot_product_attention(q, k, v)
        y = x + block.ls_1(self.out_proj(index, self.merge_heads(o)))
        fc, _, _ = mlp_layers(block)
        mlp_pre = F.linear(block.ln_2(y), fc.weight, fc.bias)
        x_out = self.mlp_residual(index, y)
        return BlockInternals(x_in=x, v=v, attn=attn, y=y, mlp_pre=mlp_pre, x_out=x_out)

    # ---------------------------------------------------------------- head
    def project(self, tokens: Tensor) -> Tensor:
        """``ln_post`` then ``proj``: tokens ``[..., C]`` → joint-space features ``[..., D]`` (not normalised)."""
        x = self.visual.ln_post(tokens)
        proj = self.visual.proj
        return x @ proj if proj is not None else x

    def project_rows(self, rows: Tensor) -> Tensor:
        """:meth:`project` for ``[B, C]`` rows, each rounded the same whatever ``B`` (:func:`rows_matmul`)."""
        x = self.visual.ln_post(rows)
        proj = self.visual.proj
        return rows_matmul(x, proj) if proj is not None else x

    def pooled(self, x: Tensor) -> Tensor:
        """The model's own image embedding from final tokens ``[B, N, C]`` → ``[B, D]`` (== ``encode_image``)."""
        v = self.visual
        if v.final_ln_after_pool:
            pooled = v.ln_post(self._pool(x))
        else:
            pooled = self._pool(v.ln_post(x))
        return rows_matmul(pooled, v.proj) if v.proj is not None else pooled

    def _pool(self, x: Tensor) -> Tensor:
        pool_type = self.visual.pool_type
        if pool_type == "tok":
            return x[:, 0]
        if pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        raise TypeError(f"pool_type {pool_type!r} is not supported")


def _rows_mm(a: Tensor, b: Tensor) -> Tensor:
    if a.shape[0] == 1:  # the matrix-vector kernel rounds differently: duplicate the row
        return (a.expand(2, -1).contiguous() @ b)[:1]
    return a @ b


class _RowsMatmul(torch.autograd.Function):
    """``a @ b`` whose backward ``grad @ bᵀ`` also runs on a row-major operand (``b_t``)."""

    @staticmethod
    def forward(a: Tensor, b: Tensor, b_t: Tensor) -> Tensor:
        return _rows_mm(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (b_t,) = ctx.saved_tensors
        return _rows_mm(grad.contiguous(), b_t), None, None


def rows_matmul(a: Tensor, b: Tensor, b_t: Tensor | None = None) -> Tensor:
    """``a @ b`` for ``a`` ``[M, K]`` and ``b`` ``[K, N]``, each row rounded the same whatever ``M`` (forward and,
    where ``a`` needs a gradient, backward).

    Measured on the CPU's BLAS: a one-row product goes to the matrix-vector kernel, whose summation order differs
    from the matrix kernel's, so the row is duplicated; and with a transposed (column-major) right operand the
    kernel's order changes with ``M`` below 16 rows, so both ``b`` and, for the backward, ``bᵀ`` are used
    row-major. Pass ``b`` contiguous and ``b_t`` (``b.T.contiguous()``) to avoid copies on every call.
    """
    b = b.contiguous()
    if not a.requires_grad:
        return _rows_mm(a, b)
    return _RowsMatmul.apply(a, b, b_t if b_t is not None else b.T.contiguous())


def mlp_layers(block: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """The (fc, activation, proj) of a CLIP block's MLP; raises ``TypeError`` for other layouts."""
    mlp = block.mlp
    names = list(getattr(mlp, "_modules", {}))
    if names != ["c_fc", "gelu", "c_proj"]:
        raise TypeError(f"unsupported MLP layout {names}; expected c_fc → activation → c_proj")
    return mlp.c_fc, mlp.gelu, mlp.c_proj


def layer_norm_vjp(ln: nn.LayerNorm, x: Tensor, grad: Tensor) -> Tensor:
    """Vector-Jacobian product of ``ln`` at ``x`` with cotangent ``grad`` (broadcast over leading dims).

    Linear in ``grad`` and differentiable, so it can sit inside a graph that is differentiated again.
    """
    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    inv_std = torch.rsqrt(var + ln.eps)
    x_hat = (x - mu) * inv_std
    g = grad * ln.weight if ln.weight is not None else grad
    return (g - g.mean(dim=-1, keepdim=True) - x_hat * (g * x_hat).mean(dim=-1, keepdim=True)) * inv_std


def activation_derivative(act: nn.Module, pre: Tensor) -> Tensor:
    """Elementwise derivative of an elementwise activation (GELU, QuickGELU…) at ``pre``.

    GELU uses its own backward kernel and QuickGELU its closed form (no autograd engine, so ``torch.compile`` traces
    it whole); other activations are differentiated by autograd.
    """
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_backward(torch.ones_like(pre), pre, approximate=act.approximate)
    if type(act).__name__ == "QuickGELU":  # x * sigmoid(1.702 x)
        s = torch.sigmoid(1.702 * pre)
        return s + 1.702 * pre * s * (1 - s)
    with torch.enable_grad():
        a = pre.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(act.forward(a), a, torch.ones_like(a))
    return d


def min_max(maps: Tensor) -> Tensor:
    """Min-max normalise each map over its last two dims to [0, 1]; a constant map becomes all zeros (no NaN)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))
