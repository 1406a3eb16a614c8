"""MaskCLIP (arXiv 2112.01071), the original algorithm (chongzhou96/MaskCLIP), ViT and ResNet backbones.

ViT: the trunk runs to the last block; there the attention is replaced by "each token attends to itself":
``v = x + out_proj(v_proj(ln_1(x)))``, then the block's own MLP on ``v``, ``ln_post`` and ``proj``. ResNet: the
attention pool's ``c_proj(v_proj(x))`` applied per pixel (no positional embedding, no mean token). Patch
features are L2-normalised and matched with unit text embeddings (cosine, no logit scale).

Optional MaskCLIP refinements from the original head (``refine_output``): prompt denoising
(``pd_thresh``: classes whose best pixel probability ``softmax(100·cos)`` stays below it are suppressed) and key
smoothing (``ks_thresh``: pixels whose best probability is below it take the key-affinity-weighted average of
all pixels' probabilities; with key smoothing on, outputs are probabilities rather than cosines).
Upstream quirks kept on purpose: the keys are L2-normalised along the token axis, not the channel axis.
Deliberate differences: the model's own LayerNorm epsilon (the original's mmseg config used 1e-6 for CLIP
weights trained with 1e-5), and inputs padded to a patch multiple are cropped back before resizing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from ..params import MaskCLIPParams
from ..text import ENSEMBLE_85, TextEncoder, resolve_templates
from ..vit import VisionTower


class MaskCLIP:
    """MaskCLIP dense class logits for batches of images over a vocabulary.

    Args:
        model: an open_clip CLIP model with a ViT or ModifiedResNet image tower (not modified).
        tokenizer: its tokenizer.
        params: :class:`MaskCLIPParams`.
        text_encoder: a shared :class:`TextEncoder` (one is made if not given).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        params: MaskCLIPParams | None = None,
        *,
        text_encoder: TextEncoder | None = None,
    ):
        params = params if params is not None else MaskCLIPParams()
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            self.tower: VisionTower | None = VisionTower(visual)
            self.stride = self.tower.patch_size
        elif isinstance(visual, ModifiedResNet):
            self.tower = None
            self.stride = 32
        else:
            raise TypeError(f"MaskCLIP supports ViT and ModifiedResNet image towers, got {type(visual).__name__}")
        self.visual = visual
        self.params = params
        # null templates (a job falls back to its vocabulary's) mean the method's own upstream default here
        self.templates = resolve_templates(params.templates if params.templates is not None else ENSEMBLE_85)
        self.text = text_encoder or TextEncoder(model, tokenizer)
        self._forward = self._patch_logits

    def compile(self, **options) -> None:
        """Run the image forward and the scoring through ``torch.compile`` (``options`` as ``torch.compile``'s)."""
        self._forward = torch.compile(self._patch_logits, **options)

    @torch.no_grad()
    def dense_features(self, images: Tensor, *, with_keys: bool = True) -> tuple[Tensor, Tensor | None]:
        """Per-patch joint-space features and keys.

        Args:
            images: ``[B, 3, H, W]`` normalised; ViT inputs must be multiples of the patch size.

        Returns:
            ``(features [B, D, gh, gw]`` not normalised, ``keys [B, gh*gw, Ck])`` (keys for key smoothing; None
            unless ``with_keys``).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        if self.tower is not None:
            return self._vit_features(images, with_keys)
        return self._resnet_features(images, with_keys)

    def _vit_features(self, images: Tensor, with_keys: bool) -> tuple[Tensor, Tensor | None]:
        t = self.tower
        x, (gh, gw) = t.embed(images, antialias=False)
        last = t.num_layers - 1
        x = t.blocks_forward(x, 0, last)
        block = t.blocks[last]
        attn = block.attn
        c = t.width
        y = block.ln_1(x)
        w_k, w_v = attn.in_proj_weight[c : 2 * c], attn.in_proj_weight[2 * c :]
        b_k, b_v = attn.in_proj_bias[c : 2 * c], attn.in_proj_bias[2 * c :]
        v = x + block.ls_1(t.out_proj(last, F.linear(y, w_v, b_v)))
        v = t.mlp_residual(last, v)
        feats = t.project(v[:, 1:])  # [B, hw, D]
        keys = t.out_proj(last, F.linear(y[:, 1:], w_k, b_k)) if with_keys else None  # [B, hw, C]
        b = images.shape[0]
        return feats.transpose(1, 2).reshape(b, -1, gh, gw), keys

    def _resnet_features(self, images: Tensor, with_keys: bool) -> tuple[Tensor, Tensor | None]:
        r = self.visual
        x = r.stem(images.to(r.conv1.weight.dtype))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        b, _, gh, gw = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, hw, C]
        pool = r.attnpool
        feats = pool.c_proj(pool.v_proj(tokens))
        keys = pool.k_proj(tokens) if with_keys else None
        return feats.transpose(1, 2).reshape(b, -1, gh, gw), keys

    @torch.no_grad()
    def patch_logits(self, images: Tensor, class_names: Sequence[str]) -> Tensor:
        """Patch–class scores ``[B, K, gh, gw]``: cosines, or probabilities if key smoothing is on.

        Args:
            images: ``[B, 3, H, W]`` normalised.
            class_names: the vocabulary (K names, background names included if any).
        """
        text = self.text.encode(class_names, self.templates)  # [K, D]
        # one forward for the batch; the vocabulary is the same for every image, so the products' shapes only grow
        # in rows with the batch, and rows round alike on the CPU (actors/vit.py)
        return self._forward(images, text)

    def _patch_logits(self, images: Tensor, text: Tensor) -> Tensor:
        feats, keys = self.dense_features(images, with_keys=self.params.ks_thresh > 0)
        feats = F.normalize(feats, dim=1)
        logits = torch.einsum("bdhw,kd->bkhw", feats, text.to(feats.dtype))
        return self._refine(logits, keys)

    def _refine(self, logits: Tensor, keys: Tensor) -> Tensor:
        p = self.params
        b, k, h, w = logits.shape
        if p.pd_thresh > 0:
            best = torch.softmax(logits * 100, dim=1).flatten(2).amax(dim=-1)  # [B, K]
            logits = logits.masked_fill((best < p.pd_thresh)[:, :, None, None], -100.0)
        if p.ks_thresh > 0:
            probs = torch.softmax(logits * 100, dim=1).flatten(2).transpose(1, 2)  # [B, hw, K]
            keys = F.normalize(keys, dim=1)  # along the token axis, as the original
            smoothed = keys @ keys.transpose(1, 2) @ probs
            low = probs.amax(dim=-1, keepdim=True) < p.ks_thresh
            logits = torch.where(low, smoothed, probs).transpose(1, 2).reshape(b, k, h, w)
        return logits

    def class_logits(
        self, images: Tensor, class_names: Sequence[str], *, output_size: tuple[int, int] | None = None
    ) -> Tensor:
        """Patch–class scores upsampled bilinearly to ``output_size`` (default: the input size): ``[B, K, h, w]``.

        ViT inputs whose size is not a multiple of the patch are zero-padded at the bottom/right (as the original
        does); the padded part of the score map is cropped away before resizing.
        """
        h, w = images.shape[-2:]
        s = self.stride
        ph, pw = (-h % s, -w % s) if self.tower is not None else (0, 0)
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph))
        logits = self.patch_logits(images, class_names)
        # as the original segmentor: first to the (padded) network input, then to the requested size
        logits = F.interpolate(logits, size=(h + ph, w + pw), mode="bilinear", align_corners=False)[..., :h, :w]
        size = tuple(output_size) if output_size else (h, w)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits
