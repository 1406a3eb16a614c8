"""MaskInversion (arXiv 2407.20034): one embedding per region mask, in CLIP's joint space, batched.

A learnable embedding per mask starts at the image's own embedding ``e0`` (``encode_image``) and is optimised
so that its LeGrad explainability map (last block by default) matches the mask under a soft Dice loss, plus
``alpha`` times a cosine regulariser towards ``e0``. Upstream: ``maskinversion/maskinversion.py``.

Upstream pushes one image copy per mask through the whole backbone and differentiates twice through hooked
blocks with weight gradients on. Here the trunk runs once per image, masks of several images are optimised
together, and the explainability map comes from :class:`~.legrad.LinearizedBlock` (closed form, linear in
the embedding), so each iteration costs a few matrix products per mask and no backbone work.

Results do not depend on the batch: the trunk runs one image at a time (``legrad.trace_blocks``), the image
embedding ``e0`` too (``[1, C] @ proj``; a ``[B, C]`` product rounds differently), and optimising the masks of
several images together is exact per mask (each image's loss term has its own gradient, the optimiser is
elementwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import MaskInversionParams
from ..vit import VisionTower, min_max
from .legrad import relevance_maps, trace_blocks

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass
class RegionEmbeddings:
    """MaskInversion's result for one image.

    Attributes:
        embeddings: ``[M, D]`` float32, not normalised (as upstream; normalise before matching text).
        loss: ``[M]`` soft-Dice loss of each mask at the last iteration.
        maps: ``[M, h, w]`` explainability maps of the last iteration (mask resolution) if asked for.
    """

    embeddings: Tensor
    loss: Tensor
    maps: Tensor | None = None


def soft_dice_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-mask soft Dice loss ``1 - (2 Σ p·m + 1) / (Σ p + Σ m + 1)``: ``[M, h, w]`` twice → ``[M]``."""
    p, m = pred.flatten(1), target.flatten(1)
    return 1 - (2 * (p * m).sum(-1) + 1) / (p.sum(-1) + m.sum(-1) + 1)


class MaskInversion:
    """Region embeddings for batches of images with any number of masks each.

    Args:
        model: an open_clip CLIP model with a ViT image tower (not modified).
        params: :class:`MaskInversionParams`.
    """

    def __init__(self, model: nn.Module, params: MaskInversionParams | None = None):
        params = params if params is not None else MaskInversionParams()
        self.tower = VisionTower(model.visual)
        params.check_model(self.tower.info(model))
        self.params = params

    def embed(self, images: Tensor, masks: Sequence[Tensor], *, return_maps: bool = False) -> list[RegionEmbeddings]:
        """Optimise one embedding per mask.

        Args:
            images: ``[B, 3, H, W]`` normalised, H and W multiples of the patch size.
            masks: one float tensor ``[M_b, h, w]`` per image, values in [0, 1] (binary masks as 0/1);
                ``M_b`` may be 0; ``h × w`` is the resolution the loss is computed at (upstream: the input size).
            return_maps: also return the last iteration's explainability maps.

        Returns:
            one :class:`RegionEmbeddings` per image.
        """
        batch = images.shape[0]
        masks = self._check_masks(masks, batch, images.device)
        counts = [m.shape[0] for m in masks]
        per_image, final_tokens, grid = trace_blocks(self.tower, images, self.params.layers)
        with torch.no_grad():
            # [B, D], the model's image embedding; per image: [B, C] @ proj rounds differently for B = 1 and B > 1
            e0 = self.tower.per_image(self.tower.pooled, final_tokens)
        init = torch.cat([e0[b].expand(n, -1) for b, n in enumerate(counts)]) if sum(counts) else e0[:0]
        e0_unit = F.normalize(init, dim=-1)
        emb = init.clone().requires_grad_(True)
        p = self.params
        optimizer = OPTIMIZERS[p.optimizer]([emb], lr=p.lr, weight_decay=p.wd)
        bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
        losses = [torch.zeros(n) for n in counts]
        maps: list[Tensor | None] = [None] * batch
        # with iterations=0 the loop still evaluates once (loss and maps of the initial embedding), no step
        for _ in range(max(p.iterations, 1)):
            t = F.normalize(emb, dim=-1)
            total = emb.new_zeros(())
            for b in range(batch):
                lo, hi = bounds[b], bounds[b + 1]
                if lo == hi:
                    continue
                expl = min_max(relevance_maps(per_image[b], t[lo:hi], grid, self.tower.patch_size))
                if expl.shape[-2:] != masks[b].shape[-2:]:
                    expl = F.interpolate(expl[None], size=masks[b].shape[-2:], mode="bilinear", align_corners=False)[0]
                dice = soft_dice_loss(expl, masks[b])
                reg = 1 - (e0_unit[lo:hi] * t[lo:hi]).sum(-1)
                # per image mean, as upstream optimises each image on its own
                total = total + dice.mean() + p.alpha * reg.mean()
                losses[b] = dice.detach()
                if return_maps:
                    maps[b] = expl.detach()
            if p.iterations:
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
        final = emb.detach()
        return [RegionEmbeddings(final[bounds[b] : bounds[b + 1]], losses[b], maps[b]) for b in range(batch)]

    @staticmethod
    def _check_masks(masks: Sequence[Tensor], batch: int, device: torch.device) -> list[Tensor]:
        if len(masks) != batch:
            raise ValueError(f"got {len(masks)} mask stacks for {batch} images; give one [M, h, w] tensor per image")
        out = []
        for i, m in enumerate(masks):
            m = torch.as_tensor(m)
            if m.ndim != 3:
                raise ValueError(f"masks for image {i} must be [M, h, w], got {list(m.shape)}")
            if m.numel() and (m.min() < 0 or m.max() > 1):
                raise ValueError(f"masks for image {i} must hold values in [0, 1]")
            out.append(m.to(device=device, dtype=torch.float32))
        return out
