"""MaskInversion on SigLIP and CoCa backbones.

Upstream ``maskinversion-torch`` 1.1 subclasses LeGrad's wrapper, so on these families the explainability map it
optimises is LeGrad's attention-pool map (:mod:`.pooled`, last block by default, SigLIP's empty-text correction
on). The embedding starts at the model's own image embedding: un-normalised on SigLIP, L2-normalised on CoCa
(CoCa's ``encode_image`` normalises by default). Upstream couples the masks of one call (SigLIP: every mask ends
with the same embedding; CoCa: an error for more than one mask); here each mask is optimised on its own, which is
upstream's result for one call per mask.

The trunk runs once per image; each iteration costs one ``t @ K`` product per mask and layer (the map is linear in
the embedding up to the ReLU, :mod:`.pooled`), no backbone work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import MaskInversionParams
from .maskinversion import RegionEmbeddings, soft_dice_loss
from .optim import make_optimizer
from .pooled import PooledTower, empty_text_embedding, final_maps, layer_sum, trace_images


class PooledMaskInversion:
    """Region embeddings on SigLIP and CoCa models; same call shape as
    :class:`clipmaps.actors.methods.maskinversion.MaskInversion`.

    Args:
        model: an open_clip SigLIP or CoCa model (not modified).
        params: :class:`MaskInversionParams`.
        tokenizer: SigLIP only: encodes the correction's empty text (or give ``empty_embedding``).
        empty_embedding: SigLIP's correction embedding ``[D]``.
        correction: SigLIP's empty-text correction (upstream default: on).

    Raises:
        TypeError: the model is not SigLIP or CoCa.
        ValueError: ``params.layers`` exceeds the trunk's depth; SigLIP with the correction and neither a tokenizer
            nor an empty embedding.
    """

    def __init__(
        self,
        model: nn.Module,
        params: MaskInversionParams | None = None,
        *,
        tokenizer=None,
        empty_embedding: Tensor | None = None,
        correction: bool = True,
    ):
        params = params if params is not None else MaskInversionParams()
        self.tower = PooledTower(model.visual)
        params.check_model(self.tower.info(getattr(model, "name", type(model).__name__)))
        self.params = params
        self.empty = None
        if self.tower.family == "siglip" and correction:
            if empty_embedding is None and tokenizer is None:
                raise ValueError("SigLIP's empty-text correction needs the tokenizer or an empty_embedding")
            self.empty = empty_embedding if empty_embedding is not None else empty_text_embedding(model, tokenizer)

    def embed(self, images: Tensor, masks: Sequence[Tensor], *, return_maps: bool = False) -> list[RegionEmbeddings]:
        """Optimise one embedding per mask.

        Args:
            images: ``[B, 3, H, W]`` normalised, H and W multiples of the patch size.
            masks: one float tensor ``[M_b, h, w]`` per image, values in [0, 1]; ``M_b`` may be 0.
            return_maps: also return the last iteration's explainability maps (computed before the last step).

        Returns:
            one :class:`RegionEmbeddings` per image (embeddings ``[M_b, D]`` float32, not normalised).
        """
        batch = images.shape[0]
        masks = _check_masks(masks, batch, images.device)
        counts = [m.shape[0] for m in masks]
        traced = trace_images(self.tower, images, self.params.layers, self.empty)
        with torch.no_grad():
            e0 = torch.cat([self.tower.image_embedding(t.final) for t in traced]) if traced else None
        init = torch.cat([e0[b].expand(n, -1) for b, n in enumerate(counts)]) if sum(counts) else images.new_zeros(0, 1)
        e0_unit = F.normalize(init, dim=-1)
        emb = init.clone().float().requires_grad_(True)
        p = self.params
        optimizer = make_optimizer([emb], p.optimizer, lr=p.lr, weight_decay=p.wd)
        bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
        losses = [torch.zeros(n) for n in counts]
        maps: list[Tensor | None] = [None] * batch
        family, patch = self.tower.family, self.tower.patch_size
        size = tuple(images.shape[-2:])
        for _ in range(max(p.iterations, 1)):  # iterations=0: one evaluation of the initial embedding, no step
            t = F.normalize(emb, dim=-1)
            total = emb.new_zeros(())
            for b in range(batch):
                lo, hi = bounds[b], bounds[b + 1]
                if lo == hi:
                    continue
                expl = final_maps(layer_sum(traced[b], t[lo:hi], family, patch), family, size, normalize=True)
                if expl.shape[-2:] != masks[b].shape[-2:]:
                    expl = F.interpolate(expl[None], size=masks[b].shape[-2:], mode="bilinear", align_corners=False)[0]
                dice = soft_dice_loss(expl, masks[b])
                reg = 1 - (e0_unit[lo:hi] * t[lo:hi]).sum(-1)
                # each mask is its own upstream call: per-mask losses add, so one step is exact per mask
                total = total + dice.sum() + p.alpha * reg.sum()
                losses[b] = dice.detach()
                if return_maps:
                    maps[b] = expl.detach()
            if p.iterations and emb.numel():
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
        final = emb.detach()
        return [RegionEmbeddings(final[bounds[b] : bounds[b + 1]], losses[b], maps[b]) for b in range(batch)]


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
