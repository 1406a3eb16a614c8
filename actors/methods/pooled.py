"""LeGrad on backbones whose image embedding comes from an attention-pooling head: SigLIP and CoCa.

Upstream ``legrad-torch`` 1.1 (``legrad/wrapper.py``: ``compute_legrad_siglip``, ``compute_legrad_coca``) takes,
for these families, the gradient of the image-text score with respect to the *pooling head's* attention (one
latent query over the tokens), not the blocks' self-attention:

* **SigLIP** (open_clip ``TimmModel``, a timm ViT with a ``map`` head, no class token): for each of the last
  ``layers`` blocks, the block's output tokens go straight into the trunk's ``attn_pool`` (the trunk's final
  ``norm`` is skipped), the pooled vector is L2-normalised and scored against the prompt. Relevance = ReLU of
  the gradient w.r.t. the pool's attention, mean over heads, query 0; summed over layers *at the patch grid*.
  Correction (on by default): the same map for the embedding of the text ``"a photo of a"`` is min-max
  normalised and grid cells above 0.8 are zeroed in the prompt's map. Then min-max at the grid, then bilinear
  upsampling by the patch size (so maps span slightly less than [0, 1] after upsampling, as upstream).
* **CoCa** (open_clip ``VisionTransformer`` with ``attn_pool``): each of the last blocks' output goes through
  ``attn_pool``; pooled query 0 is projected with ``proj`` (no ``ln_post``, no normalisation) and scored.
  Relevance = ReLU of the gradient w.r.t. the pooler's attention, mean over heads, query 0, class column
  dropped; each layer upsampled by the patch size, summed, then one min-max.

Closed form. The pooled query's attention row ``a`` (``[H, N]``) enters the score only through
``o = merge_h(a_h @ v_h)``, so ``∂⟨t, f⟩/∂a[h, j] = ⟨(t · J)[h], v[h, j]⟩`` with ``J = ∂f/∂o`` (``[D, C]``):
for CoCa ``J = projᵀ W_out`` exactly (the score is linear in ``o``); for SigLIP ``J`` is the Jacobian of the
pool's tail (``proj`` → MLP residual → L2 normalisation) at the forward point, computed once per image and layer.
Contracting ``J`` with ``v`` gives a kernel ``K`` ``[D, H, N]`` per image and layer, and every prompt's gradient
is one product ``t @ K``: the trunk runs once per image (upstream: once per call, all prompts summed into one
map), prompts cost a matrix product each, and the map is differentiable in ``t`` (MaskInversion optimises it).

Deliberate difference: upstream scores the *sum* of all prompts of a call (one map per call); here every prompt
gets its own map (upstream's map of several prompts is ours for their summed embedding; tests show both).
SigLIP's empty text is encoded with the model's own tokenizer (upstream always uses ``ViT-B-16-SigLIP``'s, wrong
for SigLIP 2's vocabulary).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import LeGradParams, ModelInfo
from ..text import RAW_TEMPLATE, TextEncoder, resolve_templates
from .common import PromptLists, prompt_rows

logger = logging.getLogger(__name__)

#: The text upstream encodes for SigLIP's correction map (``LeWrapper._init_empty_embedding``).
EMPTY_PROMPT = "a photo of a"
#: Grid cells where the min-max-normalised correction map exceeds this are zeroed (upstream default).
CORRECTION_THRESHOLD = 0.8
#: Families this module runs (``clipmaps.actors.registry.FAMILIES``).
POOLED_FAMILIES = ("siglip", "coca")


def pooled_family(model: nn.Module) -> str | None:
    """``"siglip"``, ``"coca"`` or ``None``: which attention-pooling family ``model``'s image tower is.

    SigLIP: an open_clip ``TimmModel`` whose trunk has an ``attn_pool`` (timm ``AttentionPoolLatent``). CoCa: an
    open_clip ``VisionTransformer`` with ``attn_pool``.
    """
    visual = getattr(model, "visual", model)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and getattr(trunk, "attn_pool", None) is not None:
        return "siglip"
    if getattr(visual, "attn_pool", None) is not None and hasattr(visual, "conv1"):
        return "coca"
    return None


def min_max(maps: Tensor) -> Tensor:
    """Min-max each map over its last two dims to [0, 1]; a constant map becomes zeros (upstream divides by 0)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))


def _resample_pos(pos: Tensor, grid: tuple[int, int], native: tuple[int, int], prefix: int) -> Tensor:
    """``pos`` ``[1, prefix + gh0*gw0, C]`` resampled to ``grid`` with timm's ``resample_abs_pos_embed`` (bicubic,
    antialiased; what upstream LeGrad calls for both families). Unchanged at the native grid."""
    from timm.layers import resample_abs_pos_embed

    if tuple(grid) == tuple(native):
        return pos
    return resample_abs_pos_embed(
        pos,
        new_size=list(grid),
        old_size=list(native),
        num_prefix_tokens=prefix,
        interpolation="bicubic",
        antialias=True,
    )


class PooledTower:
    """A read-only view of an attention-pooling image tower (SigLIP or CoCa); nothing in the model is modified.

    Args:
        visual: ``model.visual`` of an open_clip SigLIP (``TimmModel``) or CoCa model.

    Raises:
        TypeError: the tower is neither (or a variant whose layout upstream LeGrad does not handle).
    """

    def __init__(self, visual: nn.Module):
        family = pooled_family(visual)
        if family is None:
            raise TypeError(
                f"{type(visual).__name__} has no attention-pooling head; SigLIP (timm tower with a map head) and "
                "CoCa (open_clip ViT with attn_pool) only"
            )
        self.family = family
        self.visual = visual
        if family == "siglip":
            trunk = visual.trunk
            if getattr(trunk, "num_prefix_tokens", 0) or getattr(trunk, "cls_token", None) is not None:
                raise TypeError("SigLIP towers with class or register tokens are not supported (upstream neither)")
            pool = trunk.attn_pool
            if pool.pos_embed is not None or pool.pool != "token":
                raise TypeError("attention pool with its own positional embedding or average pooling not supported")
            self.blocks = list(trunk.blocks)
            self.heads = pool.num_heads
            patch = trunk.patch_embed.patch_size
            self.native_grid = tuple(trunk.patch_embed.grid_size)
            self.prefix = 0
        else:
            if getattr(visual, "attn_pool_contrastive", None) is not None:
                raise TypeError("CoCa towers with a separate contrastive pooler are not supported (upstream neither)")
            self.blocks = list(visual.transformer.resblocks)
            self.heads = visual.attn_pool.attn.num_heads
            patch = visual.conv1.kernel_size
            self.native_grid = tuple(visual.grid_size)
            self.prefix = 1
        if patch[0] != patch[1]:
            raise TypeError(f"non-square patches {tuple(patch)} are not supported")
        self.patch_size = int(patch[0])
        self.num_layers = len(self.blocks)

    def info(self, name: str) -> ModelInfo:
        """This tower as a :class:`ModelInfo` (for the params' layer bounds)."""
        return ModelInfo(name=name, family=self.family, layers=self.num_layers, patch_size=self.patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of a ``height × width`` input; ``ValueError`` unless both are multiples of the patch."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    # ---------------------------------------------------------------- trunk
    def embed(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Tokens ``[1, N, C]`` entering the first block for one image ``[1, 3, H, W]``, and the grid."""
        grid = self.grid(*image.shape[-2:])
        v = self.visual
        if self.family == "siglip":
            trunk = v.trunk
            pe = trunk.patch_embed
            x = pe.proj(image.to(pe.proj.weight.dtype))  # [1, C, gh, gw]
            x = pe.norm(x.flatten(2).transpose(1, 2))  # [1, N, C], patches row-major
            x = x + _resample_pos(trunk.pos_embed, grid, self.native_grid, 0).to(x.dtype)
            x = trunk.norm_pre(trunk.patch_drop(trunk.pos_drop(x)))
        else:
            x = v.conv1(image.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)
            cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
            pos = _resample_pos(v.positional_embedding[None], grid, self.native_grid, 1)
            x = v.ln_pre(v.patch_dropout(x + pos.to(x.dtype)))
        return x, grid

    def run_blocks(self, x: Tensor, start: int, stop: int) -> Tensor:
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def image_embedding(self, final: Tensor) -> Tensor:
        """The model's own image embedding (``encode_image``) from the last block's tokens ``[1, N, C]`` → ``[1, D]``:
        SigLIP un-normalised (``encode_image``'s default), CoCa L2-normalised (CoCa's ``encode_image`` default)."""
        v = self.visual
        if self.family == "siglip":
            return v.head(v.trunk.forward_head(v.trunk.norm(final)))
        pooled = v.ln_post(v.attn_pool(final))[:, 0]
        return F.normalize(pooled @ v.proj, dim=-1)

    # ---------------------------------------------------------------- the pool, linearised
    def kernel(self, tokens: Tensor) -> Tensor:
        """``K`` ``[D, H, n]`` with ``∂⟨t, f⟩/∂a = t @ K`` for one layer's output ``tokens`` ``[1, N, C]``.

        ``a`` is the pooled query's attention over the ``n`` patch tokens (CoCa's class column dropped), ``f``
        the layer's image feature as upstream scores it.
        """
        if self.family == "siglip":
            return self._siglip_kernel(tokens)
        return self._coca_kernel(tokens)

    def _siglip_kernel(self, tokens: Tensor) -> Tensor:
        pool = self.visual.trunk.attn_pool
        _, n, c = tokens.shape
        h, hd = pool.num_heads, pool.head_dim
        kv = pool.kv(tokens).reshape(n, 2, h, hd).permute(1, 2, 0, 3)  # [2, H, N, hd]
        k, v = kv[0], kv[1]
        q = pool.q(pool.latent[:, :1]).reshape(1, h, hd).transpose(0, 1)  # [H, 1, hd], latent query 0
        q, k = pool.q_norm(q), pool.k_norm(k)
        attn = torch.softmax((q * pool.scale) @ k.transpose(-2, -1), dim=-1)[:, 0]  # [H, N]
        o = torch.einsum("hn,hnd->hd", attn, v).reshape(c)  # merged heads, [C]

        def feature(merged: Tensor) -> Tensor:  # the pool's tail and upstream's normalisation, for one token
            x = pool.proj_drop(pool.proj(merged))
            if pool.mlp is not None:
                x = x + pool.mlp(pool.norm(x))
            return F.normalize(x, dim=-1)

        with torch.enable_grad():
            jac = torch.func.jacrev(feature)(o.detach())  # [D, C]
        return torch.einsum("dhe,hne->dhn", jac.reshape(-1, h, hd), v)

    def _coca_kernel(self, tokens: Tensor) -> Tensor:
        v_ = self.visual
        mha = v_.attn_pool.attn
        h = mha.num_heads
        hd = mha.embed_dim // h
        x = v_.attn_pool.ln_k(tokens)[0]  # [N, C_ctx]
        if mha._qkv_same_embed_dim:
            w_v = mha.in_proj_weight[2 * mha.embed_dim :]
        else:
            w_v = mha.v_proj_weight
        b_v = mha.in_proj_bias[2 * mha.embed_dim :] if mha.in_proj_bias is not None else None
        v = F.linear(x, w_v, b_v).reshape(-1, h, hd).transpose(0, 1)[:, 1:]  # [H, n], class column dropped
        jac = v_.proj.T @ mha.out_proj.weight  # ∂(pooled0 @ proj)/∂o, [D, C_out]: the score is linear in o
        return torch.einsum("dhe,hne->dhn", jac.reshape(-1, h, hd), v)

    def trace(self, image: Tensor, layers: int) -> tuple[list[Tensor], Tensor, tuple[int, int]]:
        """Run the trunk once on ``image`` ``[1, 3, H, W]``; ``(kernels of the last layers, final tokens, grid)``."""
        first = self.num_layers - layers
        with torch.no_grad():
            x, grid = self.embed(image)
            x = self.run_blocks(x, 0, first)
            kernels = []
            for i in range(first, self.num_layers):
                x = self.run_blocks(x, i, i + 1)
                kernels.append(self.kernel(x))
        return kernels, x, grid


@dataclass
class TracedImage:
    """One image's linearised pool, ready for any number of prompts.

    Attributes:
        kernels: per layer (first to last) ``[D, H, n]``.
        grid: ``(gh, gw)`` with ``gh * gw == n``.
        correction: SigLIP: ``[gh, gw]`` bool, the cells the empty-text map zeroes; ``None`` otherwise.
        final: the last block's tokens ``[1, N, C]``.
    """

    kernels: list[Tensor]
    grid: tuple[int, int]
    correction: Tensor | None
    final: Tensor


def relevance(kernel: Tensor, t: Tensor) -> Tensor:
    """``ReLU(t @ K)`` averaged over heads: prompts ``[P, D]`` → ``[P, n]`` (differentiable in ``t``)."""
    return F.relu(torch.einsum("pd,dhn->phn", t, kernel)).mean(dim=1)


def layer_sum(traced: TracedImage, t: Tensor, family: str, patch: int) -> Tensor:
    """The pre-min-max map, at the resolution upstream min-maxes it: SigLIP ``[P, gh, gw]`` (summed at the grid,
    correction applied), CoCa ``[P, gh*patch, gw*patch]`` (each layer upsampled, then summed)."""
    gh, gw = traced.grid
    if family == "siglip":
        total = sum(relevance(k, t) for k in traced.kernels).reshape(-1, gh, gw)
        if traced.correction is not None:
            total = torch.where(traced.correction, torch.zeros_like(total), total)
        return total
    total = 0
    for k in traced.kernels:
        r = relevance(k, t).reshape(1, -1, gh, gw)
        total = total + F.interpolate(r, size=(gh * patch, gw * patch), mode="bilinear", align_corners=False)[0]
    return total


def final_maps(raw: Tensor, family: str, size: tuple[int, int], normalize: bool) -> Tensor:
    """``layer_sum`` output → ``[P, *size]`` maps: min-max (if asked) where upstream applies it, then bilinear
    resizing (SigLIP: the grid upsampled after min-max, as upstream)."""
    out = min_max(raw) if normalize else raw
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return out


def trace_images(tower: PooledTower, images: Tensor, layers: int, empty: Tensor | None) -> list[TracedImage]:
    """Trace every image of ``images`` ``[B, 3, H, W]`` alone (results never depend on the batch) and, for SigLIP
    with an empty-text embedding ``empty`` ``[D]``, its correction mask."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
    out = []
    for b in range(images.shape[0]):
        kernels, final, grid = tower.trace(images[b : b + 1].clone(), layers)
        correction = None
        if tower.family == "siglip" and empty is not None:
            with torch.no_grad():
                e = empty.reshape(1, -1).to(kernels[0])
                empty_map = sum(relevance(k, e) for k in kernels).reshape(1, *grid)
                correction = (min_max(empty_map) > CORRECTION_THRESHOLD)[0]
        out.append(TracedImage(kernels, grid, correction, final))
    return out


def empty_text_embedding(model: nn.Module, tokenizer) -> Tensor:
    """``[D]`` unit embedding of :data:`EMPTY_PROMPT` with the model's own tokenizer (upstream: always
    ``ViT-B-16-SigLIP``'s tokenizer), as upstream: ``normalize(encode_text(tokens))``."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer([EMPTY_PROMPT]).to(device)).float(), dim=-1)[0]


class PooledLeGrad:
    """LeGrad heatmaps on SigLIP and CoCa models, for batches of images each with its own prompts.

    Same call shape as :class:`clipmaps.actors.methods.legrad.LeGrad`.

    Args:
        model: an open_clip SigLIP (``CustomTextCLIP`` with a ``TimmModel`` tower) or CoCa model (not modified).
        tokenizer: its tokenizer (encodes prompts and, for SigLIP, :data:`EMPTY_PROMPT`).
        params: :class:`LeGradParams` (``layers`` counts the trunk's last blocks).
        text_encoder: a shared :class:`TextEncoder` (one is made if not given).
        empty_embedding: SigLIP's correction embedding ``[D]`` (default: :func:`empty_text_embedding`).
        correction: SigLIP's empty-text correction (upstream ``apply_correction``, default on).

    Raises:
        TypeError: the model is not SigLIP or CoCa.
        ValueError: ``params.layers`` exceeds the trunk's depth.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        params: LeGradParams | None = None,
        *,
        text_encoder: TextEncoder | None = None,
        empty_embedding: Tensor | None = None,
        correction: bool = True,
    ):
        params = params if params is not None else LeGradParams()
        self.tower = PooledTower(model.visual)
        params.check_model(self.tower.info(getattr(model, "name", type(model).__name__)))
        self.params = params
        self.templates = resolve_templates(params.templates if params.templates is not None else RAW_TEMPLATE)
        self.text = text_encoder or TextEncoder(model, tokenizer)
        self.empty = None
        if self.tower.family == "siglip" and correction:
            self.empty = empty_embedding if empty_embedding is not None else empty_text_embedding(model, tokenizer)

    @property
    def family(self) -> str:
        return self.tower.family

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
            images: ``[B, 3, H, W]`` normalised, H and W multiples of the patch size.
            prompts: one list of prompt strings per image (or one list for all); or instead
                ``text_embeddings``: one ``[P_i, D]`` tensor per image, L2-normalised.
            output_size: ``(h, w)``; default the input size.
            normalize: min-max each map to [0, 1] where upstream does (SigLIP: at the patch grid, before
                upsampling); ``False`` returns the raw layer sum resized to ``output_size``.

        Returns:
            one ``[P_i, h, w]`` float32 tensor per image.
        """
        size = tuple(output_size) if output_size else tuple(images.shape[-2:])
        raws = self.raw_maps(images, prompts, text_embeddings=text_embeddings)
        return [final_maps(raw, self.family, size, normalize) for raw in raws]

    def raw_maps(
        self, images: Tensor, prompts: PromptLists | None = None, *, text_embeddings: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        """The pre-min-max maps (:func:`layer_sum`) per image: SigLIP ``[P_i, gh, gw]``, CoCa ``[P_i, H, W]``."""
        batch = images.shape[0]
        # every distinct prompt of the batch encoded once (the shared step of the ViT path), then split per image
        rows, counts = prompt_rows(self.text, self.templates, prompts, text_embeddings, batch, images.device)
        traced = trace_images(self.tower, images, self.params.layers, self.empty)
        with torch.no_grad():
            return [
                layer_sum(image, t, self.family, self.tower.patch_size)
                for image, t in zip(traced, torch.split(rows, counts), strict=True)
            ]
