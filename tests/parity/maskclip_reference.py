"""Reference re-implementation of the ORIGINAL MaskCLIP (chongzhou96/MaskCLIP @ 245d31f, mmseg fork).

There is no installable MaskCLIP package, so this module re-implements the original algorithm on top
of an open_clip (2.24, LND resblocks) model's own modules, following these original files:

* ``mmseg/models/backbones/vit.py`` -- ``VisionTransformer`` with ``return_qkv=True`` on the last
  layer (``TransformerEncoderLayer.forward``), ``final_norm``, ``resize_pos_embed``;
* ``mmseg/models/backbones/resnet.py`` -- ``ResNetClip`` (deep stem, avg-down, 'clip' style
  bottleneck == CLIP's ModifiedResNet trunk, so open_clip's ``stem``/``layer1..4`` are used as is);
* ``mmseg/models/decode_heads/maskclip_head.py`` -- ``MaskClipHead.forward / cls_seg / refine_output``;
* ``mmseg/models/segmentors/encoder_decoder.py`` -- ``encode_decode`` + ``whole_inference`` +
  ``inference`` + ``simple_test`` (resize to the network input, resize to ``ori_shape``, softmax,
  argmax);
* ``tools/maskclip_utils/prompt_engineering.py`` -- 85-template text ensembling.

Deliberate deviations (documented in the fixtures manifest):
* LayerNorm eps: the original config uses ``LN eps=1e-6``; by default we use each LayerNorm's own eps
  (open_clip: 1e-5).  ``ln_eps=1e-6`` reproduces the original value.
* Text embeddings are computed in fp32 on CPU with open_clip's tokenizer (original: OpenAI ``clip``,
  fp16 on GPU).
* Input normalisation is the caller's business (the original pipeline used ImageNet mean/std).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# 'tools/maskclip_utils/prompt_engineering.py' uses the 80 CLIP ImageNet templates followed by five
# scene templates.  open_clip ships the 80 (same strings, same order, verified against the original
# list); the five extra ones are appended here.
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
SINGLE_TEMPLATE = ("a photo of a {}.",)  # the original's --no-prompt-eng setting


def maskclip_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] + list(SCENE_TEMPLATES)


# ----------------------------------------------------------------------------------------------
# text side
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def class_text_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Per class: encode every template, unit-normalise each, average, unit-normalise -> [K, D]."""
    rows = []
    for name in classnames:
        tokens = tokenizer([tpl.format(name) for tpl in templates]).to(next(model.parameters()).device)
        emb = model.encode_text(tokens).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows, dim=0)


# ----------------------------------------------------------------------------------------------
# ViT backbone (value-embedding trick on the last block)
# ----------------------------------------------------------------------------------------------
def _layer_norm(mod: nn.LayerNorm, x: torch.Tensor, eps: float | None) -> torch.Tensor:
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps if eps is None else eps)


def resize_pos_embed_nonaa(pos: torch.Tensor, grid_hw, old_hw) -> torch.Tensor:
    """mmseg ``resize_pos_embed``: keep the CLS position, bicubic (align_corners=False, NO antialias)
    resize of the patch positions from ``old_hw`` to ``grid_hw``.  ``pos``: [1+h*w, C] -> [1+H*W, C]."""
    c = pos.shape[-1]
    cls_pos = pos[:1]
    grid = pos[-old_hw[0] * old_hw[1] :].reshape(1, old_hw[0], old_hw[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False)
    grid = grid.flatten(2).transpose(1, 2)[0]
    return torch.cat([cls_pos, grid], dim=0)


def _plain_block(blk, x: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Standard pre-norm CLIP block on batch-first x [B, N, C] (open_clip 2.24 MHA is sequence-first)."""
    y = _layer_norm(blk.ln_1, x, eps).transpose(0, 1)
    attn = blk.attn(y, y, y, need_weights=False)[0].transpose(0, 1)
    x = x + blk.ls_1(attn)
    x = x + blk.ls_2(blk.mlp(_layer_norm(blk.ln_2, x, eps)))
    return x


@torch.no_grad()
def vit_dense_features(visual, image: torch.Tensor, ln_eps: float | None = None):
    """Original MaskCLIP ViT backbone output for the decode head.

    Returns ``v`` [B, C_width, gh, gw] (value path after ln_post, CLS dropped), ``k`` [B, gh*gw, C_width]
    (out_proj-ed keys of the last block, CLS dropped) and the grid (gh, gw).
    """
    b, _, h, w = image.shape
    ph, pw = visual.conv1.kernel_size
    # PatchEmbed(padding='corner'): zero-pad bottom/right up to a multiple of the patch size
    pad_h, pad_w = (-h) % ph, (-w) % pw
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    x = visual.conv1(image)
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls_tok = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(b, -1, -1)
    x = torch.cat([cls_tok, x], dim=1)
    pos = visual.positional_embedding
    if x.shape[1] != pos.shape[0]:
        pos = resize_pos_embed_nonaa(pos, (gh, gw), tuple(visual.grid_size))
    x = x + pos.to(x.dtype)
    x = _layer_norm(visual.ln_pre, x, ln_eps)  # pre_norm=True (ln0)

    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:-1]:
        x = _plain_block(blk, x, ln_eps)

    last = blocks[-1]
    attn = last.attn
    y = _layer_norm(last.ln_1, x, ln_eps)
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
    _q, k, v = qkv.chunk(3, dim=-1)
    # the original pushes q, k and v each through out_proj (incl. bias); q is unused by the head
    k = F.linear(k, attn.out_proj.weight, attn.out_proj.bias)
    v = F.linear(v, attn.out_proj.weight, attn.out_proj.bias)
    v = v + x  # residual with the block INPUT
    v = v + last.mlp(_layer_norm(last.ln_2, v, ln_eps))  # FFN(norm2(v), identity=v)
    v = _layer_norm(visual.ln_post, v, ln_eps)  # final_norm (ln1) applied to v
    # (the block's normal output x is computed by the original too but not used by the dense head)

    v = v[:, 1:].reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
    k = k[:, 1:]
    return v, k, (int(gh), int(gw))


def vit_head_features(visual, v: torch.Tensor) -> torch.Tensor:
    """MaskClipHead(vit=True).proj: 1x1 conv with weight proj^T, no bias -> [B, D, gh, gw]."""
    weight = visual.proj.t()[:, :, None, None]
    return F.conv2d(v, weight)


# ----------------------------------------------------------------------------------------------
# ResNet backbone (ResNetClip == ModifiedResNet trunk) + attnpool-as-1x1-convs head
# ----------------------------------------------------------------------------------------------
def _as_conv(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    return F.conv2d(x, lin.weight[:, :, None, None], lin.bias)


@torch.no_grad()
def resnet_dense_features(visual, image: torch.Tensor):
    """Returns head features ``feat`` = c_proj(v_proj(x)) [B, D, gh, gw] and keys ``k`` = k_proj(x)
    flattened [B, gh*gw, C] -- no positional embedding, no mean token, no attention."""
    x = visual.stem(image)
    x = visual.layer1(x)
    x = visual.layer2(x)
    x = visual.layer3(x)
    x = visual.layer4(x)
    gh, gw = x.shape[-2:]
    pool = visual.attnpool
    k = _as_conv(x, pool.k_proj).flatten(2).transpose(-2, -1)
    v = _as_conv(x, pool.v_proj)
    feat = _as_conv(v, pool.c_proj)
    return feat, k, (int(gh), int(gw))


# ----------------------------------------------------------------------------------------------
# head: cosine classifier, refinement; segmentor: resize, softmax, argmax
# ----------------------------------------------------------------------------------------------
def cosine_logits(feat: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``cls_seg``: per-pixel L2 normalisation (no eps) then 1x1 conv with the [K, D] text rows."""
    feat = feat / feat.norm(dim=1, keepdim=True)
    return F.conv2d(feat, text_emb[:, :, None, None].to(feat.dtype))


def refine_output(logits: torch.Tensor, k: torch.Tensor | None, pd_thresh: float = 0.0, ks_thresh: float = 0.0):
    """``MaskClipHead.refine_output`` semantics, written out-of-place.

    * prompt denoising (pd_thresh>0): classes whose softmax(100*logits over classes) never reaches
      pd_thresh at any pixel are set to -100 (all pixels).
    * key smoothing (k given and ks_thresh>0): the map becomes p = softmax(100*out over classes); k is
      L2-normalised along dim=1 of [B, HW, C] (F.normalize's default dim -> the TOKEN axis, as in the
      original); W = k k^T [B, HW, HW]; pixels whose max_c p < ks_thresh get (W @ p) (no
      renormalisation), the others keep p.
    """
    out = logits
    b, c, h, w = out.shape
    if pd_thresh > 0:
        probs = F.softmax(out * 100, dim=1)
        max_conf = probs.reshape(b, c, -1).max(dim=-1)[0]  # [B, K]
        dropped = (max_conf < pd_thresh)[:, :, None, None].expand(b, c, h, w)
        out = torch.where(dropped, torch.full_like(out, -100.0), out)
    if k is not None and ks_thresh > 0:
        probs = F.softmax(out * 100, dim=1).reshape(b, c, -1).transpose(-2, -1)  # [B, HW, K]
        kn = F.normalize(k, p=2, dim=1)
        weight = kn @ kn.transpose(-2, -1)
        smoothed = weight @ probs
        replace = probs.max(dim=-1, keepdim=True)[0] < ks_thresh
        probs = torch.where(replace, smoothed, probs)
        out = probs.transpose(-2, -1).reshape(b, c, h, w)
    return out


def segmentor_postprocess(logits: torch.Tensor, input_hw, ori_hw):
    """EncoderDecoder: bilinear (align_corners=False) to the network input size (``encode_decode``),
    bilinear to ``ori_shape`` (``whole_inference`` with rescale=True), softmax over classes
    (``inference``), argmax (``simple_test``).  Returns (probs [B,K,oh,ow], seg [B,oh,ow])."""
    x = F.interpolate(logits, size=tuple(input_hw), mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=tuple(ori_hw), mode="bilinear", align_corners=False)
    probs = F.softmax(x, dim=1)
    return probs, probs.argmax(dim=1)
