"""MaskInversion (arXiv 2407.20034): one embedding per region mask, in CLIP's joint space, batched.

A learnable embedding per mask starts at the image's own embedding ``e0`` (``encode_image``) and is optimised
so that its LeGrad explainability map (last block by default) matches the mask under a soft Dice loss, plus
``alpha`` times a cosine regulariser towards ``e0``. Upstream: ``maskinversion/maskinversion.py``.

Upstream pushes one image copy per mask through the whole backbone and differentiates twice through hooked
blocks with weight gradients on. Here the trunk runs once per image, masks of several images are optimised
together, and the explainability map comes from :class:`~.legrad.LinearizedBlock` (closed form, linear in
the embedding), so each iteration costs a few matrix products per mask and no backbone work.

One computation per batch: the trunk runs once over the batch, and the masks of all images are one ``[M, D]``
embedding tensor with one Adam state, each iteration one set of batched products for every mask (the index of
each mask's image picks its image's linearised blocks). Optimising them together is exact per mask: each mask's
loss term (weighted ``1 / M_b`` as upstream averages per image) has its own gradient and the optimiser is
elementwise; on the CPU the products round a row the same way whatever else shares them (``actors/vit.py``).
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
from .optim import make_optimizer


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
        self._objective = self._compute_objective

    def compile(self, **options) -> None:
        """Run each iteration's maps and loss (forward and backward) through ``torch.compile`` (``options`` as its)."""
        self._objective = torch.compile(self._compute_objective, **options)

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
        targets, counts = self._check_masks(masks, batch, images.device)
        if sum(counts) == 0:
            empty = images.new_zeros(0, self.tower.visual.output_dim)
            return [RegionEmbeddings(empty, empty[:, 0]) for _ in range(batch)]
        p = self.params
        blocks, final_tokens, grid = trace_blocks(self.tower, images, p.layers)
        with torch.no_grad():
            e0 = self.tower.pooled(final_tokens)  # [B, D], the model's image embedding
        device = images.device
        image = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(counts, device=device))
        with torch.no_grad():
            blocks = [b.for_rows(image) for b in blocks]  # gathered per mask once, not every iteration
        # each image's masks weigh 1 / M_b: upstream optimises one image per call, its loss the mean over its masks
        weight = torch.tensor([1.0 / n for n in counts for _ in range(n)], device=device)
        init = e0[image]  # [M, D]
        e0_unit = F.normalize(init, dim=-1)
        emb = init.clone().requires_grad_(True)
        optimizer = make_optimizer([emb], p.optimizer, lr=p.lr, weight_decay=p.wd)
        loss = expl = None
        # with iterations=0 the loop still evaluates once (loss and maps of the initial embedding), no step
        for _ in range(max(p.iterations, 1)):
            loss, expl = self._step(emb, e0_unit, image, weight, targets, blocks, grid, optimizer)
        final = emb.detach()
        split = [torch.split(x, counts) for x in (final, loss)]
        maps: list[Tensor | None] = [None] * batch
        if return_maps:
            for (_, _, spans), e in zip(targets, expl):
                for b, (lo, hi) in spans.items():
                    maps[b] = e[lo:hi]
        return [RegionEmbeddings(split[0][b], split[1][b], maps[b]) for b in range(batch)]

    def _step(self, emb, e0_unit, image, weight, targets, blocks, grid, optimizer) -> tuple[Tensor, list[Tensor]]:
        """One iteration for all masks: the Dice loss ``[M]`` and the maps ``[M_g, h, w]`` of each mask-size group
        (see :meth:`_check_masks`) for the current embeddings, then one optimiser step."""
        objective, dice, maps = self._objective(emb, e0_unit, image, weight, targets, blocks, grid)
        if self.params.iterations:
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
        return dice.detach(), [m.detach() for m in maps]

    def _compute_objective(self, emb, e0_unit, image, weight, targets, blocks, grid):
        """``(objective, dice [M], maps per group)``: the loss to minimise and its parts (the hot path)."""
        t = F.normalize(emb, dim=-1)
        expl = min_max(relevance_maps(blocks, t, grid, self.tower.patch_size))  # [M, S, S], blocks aligned per mask
        dice, maps = None, []
        for rows, target, _ in targets:
            e = expl if rows is None else expl[rows]
            if e.shape[-2:] != target.shape[-2:]:
                e = F.interpolate(e[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            d = soft_dice_loss(e, target)
            dice = d if rows is None else (torch.zeros_like(weight) if dice is None else dice).index_copy(0, rows, d)
            maps.append(e)
        reg = 1 - (e0_unit * t).sum(-1)
        return (weight * (dice + self.params.alpha * reg)).sum(), dice, maps

    @staticmethod
    def _check_masks(masks: Sequence[Tensor], batch: int, device: torch.device) -> tuple[list, list[int]]:
        """The masks grouped by size, ``(rows or None, [M_g, h, w] float32 on device, {image: (lo, hi)})`` per
        group (``rows`` indexes the group's masks among all ``M``; None when there is one group), and the counts."""
        if len(masks) != batch:
            raise ValueError(f"got {len(masks)} mask stacks for {batch} images; give one [M, h, w] tensor per image")
        masks = [torch.as_tensor(m) for m in masks]
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(masks):
            if m.ndim != 3:
                raise ValueError(f"masks for image {i} must be [M, h, w], got {list(m.shape)}")
            if m.shape[0]:
                groups.setdefault(tuple(m.shape[-2:]), []).append(i)
        counts = [m.shape[0] for m in masks]
        starts = torch.tensor([0, *counts]).cumsum(0).tolist()
        out = []
        for members in groups.values():
            target = torch.cat([masks[i] for i in members]).to(device=device, dtype=torch.float32)
            if bool((target.min() < 0) | (target.max() > 1)):
                bad = next(i for i in members if masks[i].min() < 0 or masks[i].max() > 1)
                raise ValueError(f"masks for image {bad} must hold values in [0, 1]")
            rows = None
            if len(groups) > 1:
                rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members]).to(device)
            spans, lo = {}, 0
            for i in members:
                spans[i] = (lo, lo + counts[i])
                lo += counts[i]
            out.append((rows, target, spans))
        return out, counts
