"""GEM — Grounding Everything (arXiv 2312.00878), batched, on the shared ViT toolkit.

The last ``depth - 1`` blocks get a second, parallel path: self-self attention (q–q, k–k, v–v cosine
attention with an inverse temperature, refined ``ss_attn_iter`` times, then assigned to the raw values),
averaged over the three branches, projected by the block's ``out_proj`` and accumulated without MLP on top of
the tokens entering the first modified block. The original path runs unchanged and feeds the next ``ln_1``.
Each softmax-attention is a fused SDPA call (cosine attention = SDPA on normalised inputs, the inverse
temperature folded into the queries, so it can differ per image). Upstream: ``gem/gem_utils.py``.

One computation per batch: the trunk and both paths run on ``[B, N, C]``; the prompts of all images are padded
to one ``[B, P_max, D]`` tensor (at least two columns, see ``actors/vit.py``), matched with one batched product,
upsampled and min-max normalised together; each image's maps are its first ``P_i`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import GEMParams
from ..text import PHOTO_TEMPLATE, TextEncoder, resolve_templates
from ..vit import VisionTower, min_max
from .common import PromptLists, check_prompt_lists, padded_text, patch_logits_to_maps


class GEM:
    """GEM heatmaps and patch–text logits for batches of images.

    Args:
        model: an open_clip CLIP model with a ViT image tower (not modified).
        tokenizer: its tokenizer.
        params: :class:`GEMParams`.
        text_encoder: a shared :class:`TextEncoder` (one is made if not given).
    """

    def __init__(
        self, model: nn.Module, tokenizer, params: GEMParams | None = None, *, text_encoder: TextEncoder | None = None
    ):
        params = params if params is not None else GEMParams()
        self.tower = VisionTower(model.visual)
        params.check_model(self.tower.info(model))
        self.params = params
        # null templates (a job falls back to its vocabulary's) mean the method's own upstream default here
        self.templates = resolve_templates(params.templates if params.templates is not None else PHOTO_TEMPLATE)
        self.text = text_encoder or TextEncoder(model, tokenizer)
        self._forward = self._features

    def compile(self, **options) -> None:
        """Run the image forward through ``torch.compile`` (``options`` are passed on, e.g. ``fullgraph=True``)."""
        self._forward = torch.compile(self._features, **options)

    @torch.no_grad()
    def features(self, images: Tensor, *, with_original: bool = False) -> tuple[Tensor, Tensor | None]:
        """Token features of the GEM path (and optionally the original path).

        Args:
            images: ``[B, 3, H, W]`` normalised, H and W multiples of the patch size.
            with_original: also return the unmodified model's tokens (upstream ``return_ori``).

        Returns:
            ``(feat_gem, feat_ori)`` each ``[B, N, D]`` after ``ln_post`` and ``proj``, not normalised
            (``feat_ori`` is ``None`` unless asked for).

        One forward for the whole batch; on the CPU an image's features do not depend on the batch
        (``actors/vit.py``).
        """
        return self._forward(images, with_original)

    def _features(self, images: Tensor, with_original: bool) -> tuple[Tensor, Tensor | None]:
        t = self.tower
        x, _ = t.embed(images, antialias=True)
        first = t.num_layers - (self.params.depth - 1)
        x = t.blocks_forward(x, 0, first)
        x_gem = x
        for i in range(first, t.num_layers):
            # the last block's original path only matters for the baseline maps
            need_next = with_original or i < t.num_layers - 1
            x, gem_out = self._modified_block(i, x, need_next)
            x_gem = x_gem + t.blocks[i].ls_1(gem_out)
        return t.project(x_gem), (t.project(x) if with_original else None)

    def _modified_block(self, index: int, x: Tensor, need_next: bool = True) -> tuple[Tensor | None, Tensor]:
        t = self.tower
        block = t.blocks[index]
        y = block.ln_1(x)
        q, k, v = t.qkv(index, y)
        x_next = None
        if need_next:  # original path: the standard block
            o = F.scaled_dot_product_attention(q, k, v)
            x_next = t.mlp_residual(index, x + block.ls_1(t.out_proj(index, t.merge_heads(o))))
        # GEM path: the three self-self branches stacked along the batch
        b = x.shape[0]
        if self.params.ss_attn_temp is None:
            inv_temp = y.norm(dim=-1).mean(dim=-1) * t.head_dim**-0.5  # [B]
        else:
            inv_temp = torch.full((b,), float(self.params.ss_attn_temp), device=x.device, dtype=x.dtype)
        inv_temp = inv_temp.repeat(3).view(3 * b, 1, 1, 1)
        s = torch.cat([q, k, v], dim=0)  # [3B, H, N, hd]
        values = v.repeat(3, 1, 1, 1)
        for _ in range(self.params.ss_attn_iter):
            s = F.normalize(s, dim=-1)
            s = F.scaled_dot_product_attention(s * inv_temp, s, s, scale=1.0)
        s = F.normalize(s, dim=-1)
        out = F.scaled_dot_product_attention(s * inv_temp, s, values, scale=1.0)
        out = out.view(3, b, *out.shape[1:]).mean(dim=0)
        return x_next, t.out_proj(index, t.merge_heads(out))

    @torch.no_grad()
    def padded_logits(
        self,
        images: Tensor,
        prompts: PromptLists,
        *,
        original: bool = False,
        output_size: tuple[int, int] | None = None,
        features: Tensor | None = None,
    ) -> tuple[Tensor, list[int]]:
        """:meth:`logits` as one tensor ``[B, P_max, h, w]`` and the prompt counts ``P_i`` (rows past ``P_i`` are
        padding, all zero)."""
        prompts = check_prompt_lists(prompts, images.shape[0])
        if features is None:
            feat_gem, feat_ori = self.features(images, with_original=original)
            features = feat_ori if original else feat_gem
        feats = F.normalize(features[:, 1:], dim=-1)  # [B, hw, D]
        grid = self.tower.grid(*images.shape[-2:])
        size = tuple(output_size) if output_size else tuple(images.shape[-2:])
        text, counts = padded_text(self.text, prompts, self.templates, feats)
        return patch_logits_to_maps(feats @ text.transpose(1, 2), grid, size), counts

    def logits(
        self,
        images: Tensor,
        prompts: PromptLists,
        *,
        original: bool = False,
        output_size: tuple[int, int] | None = None,
        features: Tensor | None = None,
    ) -> list[Tensor]:
        """Cosine similarity between each patch and each prompt, upsampled bilinearly.

        Args:
            images: ``[B, 3, H, W]`` normalised.
            prompts: one list of prompt strings per image (lengths may differ), or one list for all images.
            original: use the unmodified model's tokens (upstream ``return_ori=True``; a baseline).
            output_size: ``(h, w)`` of the maps; default the input size.
            features: the tokens of :meth:`features` for these images (the GEM path, or the original path when
                ``original``), to reuse one forward for several calls.

        Returns:
            one ``[P_i, h, w]`` float tensor of cosines in [-1, 1] per image (views of one padded tensor).
        """
        maps, counts = self.padded_logits(
            images, prompts, original=original, output_size=output_size, features=features
        )
        return [m[:n] for m, n in zip(maps, counts)]

    def heatmaps(
        self,
        images: Tensor,
        prompts: PromptLists,
        *,
        original: bool = False,
        output_size: tuple[int, int] | None = None,
        features: Tensor | None = None,
    ) -> list[Tensor]:
        """Per-prompt heatmaps in [0, 1] (min-max of :meth:`logits` per map; constant maps give zeros).

        Same arguments and shapes as :meth:`logits`.
        """
        maps, counts = self.padded_logits(
            images, prompts, original=original, output_size=output_size, features=features
        )
        maps = min_max(maps)  # per map, so the padding rows change nothing
        return [m[:n] for m, n in zip(maps, counts)]

    def class_logits(
        self,
        images: Tensor,
        class_names: Sequence[str],
        *,
        original: bool = False,
        output_size: tuple[int, int] | None = None,
        features: Tensor | None = None,
    ) -> Tensor:
        """Patch–class cosines for a fixed vocabulary: ``[B, K, h, w]`` (for segmentation)."""
        maps, _ = self.padded_logits(
            images, [list(class_names)] * images.shape[0], original=original, output_size=output_size, features=features
        )
        return maps[:, : len(class_names)]
