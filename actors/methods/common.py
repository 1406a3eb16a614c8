"""Pieces shared by the method modules: prompt-list checks, patch-logit upsampling, label maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PromptLists = Sequence[Sequence[str]] | Sequence[str]


def check_prompt_lists(prompts: PromptLists, batch: int) -> list[list[str]]:
    """Normalise prompts to one non-empty list per image.

    ``prompts`` is either one list of strings shared by all ``batch`` images or ``batch`` lists.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings (or one list per image), not a single string")
    prompts = list(prompts)
    if prompts and all(isinstance(p, str) for p in prompts):
        prompts = [prompts] * batch
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompt lists for {batch} images; give one list per image")
    out = []
    for i, plist in enumerate(prompts):
        if isinstance(plist, str) or not all(isinstance(p, str) for p in plist):
            raise ValueError(f"prompt list {i} must be a list of strings, got {plist!r}")
        if not plist:
            raise ValueError(f"prompt list {i} is empty; give at least one prompt per image")
        out.append(list(plist))
    return out


def prompt_rows(
    text,
    templates,
    prompts: PromptLists | None,
    text_embeddings: Sequence[Tensor] | None,
    batch: int,
    device: torch.device,
) -> tuple[Tensor, list[int]]:
    """Every prompt of every image as one row: ``(t [M, D] float32 on device, counts)``, ``counts[b]`` rows per image.

    Either ``prompts`` (one list per image, or one for all) encoded with ``text`` (a ``TextEncoder``) and
    ``templates``, each distinct name once per call; or ``text_embeddings``, one ``[P_b, D]`` tensor per image.

    Raises:
        ValueError: both or neither given, a count that is not ``batch``, an empty or non-2-D embedding set."""
    if (prompts is None) == (text_embeddings is None):
        raise ValueError("give either prompts or text_embeddings")
    if prompts is not None:
        lists = check_prompt_lists(prompts, batch)
        names = list(dict.fromkeys(n for plist in lists for n in plist))
        where = {n: i for i, n in enumerate(names)}
        table = text.encode(names, templates).to(device, torch.float32)
        rows = torch.tensor([where[n] for plist in lists for n in plist], device=device)
        return table[rows], [len(p) for p in lists]
    if len(text_embeddings) != batch:
        raise ValueError(f"got {len(text_embeddings)} text embedding sets for {batch} images")
    for e in text_embeddings:
        if e.ndim != 2 or e.shape[0] == 0:
            raise ValueError(f"text embeddings must be [P>0, D], got {list(e.shape)}")
    counts = [e.shape[0] for e in text_embeddings]
    t = torch.cat(list(text_embeddings)).to(device, torch.float32) if batch else torch.zeros(0, 1, device=device)
    return t, counts


def patch_logits_to_maps(logits: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Patch scores ``[B, gh*gw, P]`` (row-major patches) → maps ``[B, P, h, w]`` by bilinear upsampling
    (``align_corners=False``)."""
    gh, gw = grid
    # contiguous: the transposed view looks channels-last, and the upsampling kernel for that layout rounds
    # differently (and picks it or not depending on the batch size)
    maps = logits.transpose(1, 2).reshape(logits.shape[0], -1, gh, gw).contiguous()
    if (gh, gw) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps


#: Prompt lists are padded to at least this many columns: a one-column product is a matrix-vector product,
#: which the BLAS rounds differently from a matrix product (``actors/vit.py``).
MIN_PADDED_PROMPTS = 2


def padded_text(encoder, prompts: list[list[str]], templates, like: Tensor) -> tuple[Tensor, list[int]]:
    """Text embeddings of per-image prompt lists as one zero-padded tensor.

    Args:
        encoder: a :class:`~clipmaps.actors.text.TextEncoder` (each distinct prompt is encoded, or read from its
            cache, once for the whole batch).
        prompts: one non-empty list per image (:func:`check_prompt_lists`).
        templates: the templates to fill.
        like: a tensor whose device and dtype the result takes.

    Returns:
        ``(text [B, P_max, D], counts)``: row ``p < counts[b]`` of image ``b`` is its ``p``-th prompt's unit
        embedding, later rows are zeros; ``P_max = max(max(counts), MIN_PADDED_PROMPTS)``.
    """
    counts = [len(p) for p in prompts]
    names = list(dict.fromkeys(name for plist in prompts for name in plist))
    where = {name: i for i, name in enumerate(names)}
    table = encoder.encode(names, templates).to(like.device, like.dtype)
    table = torch.cat([table, table.new_zeros(1, table.shape[1])])  # the last row pads
    width = max(max(counts, default=0), MIN_PADDED_PROMPTS)
    rows = [[where[n] for n in plist] + [len(names)] * (width - len(plist)) for plist in prompts]
    index = torch.tensor(rows, dtype=torch.long, device=table.device)  # one gather builds every image's list
    return table[index], counts


@dataclass(frozen=True)
class BackgroundRule:
    """How segmentation logits become a label map with a background label.

    Label 0 is background/unlabelled; vocabulary class ``c`` (0-based, among the foreground classes) gets
    label ``c + 1``. A pixel is background when its best class is one of the ``background_names`` appended to
    the vocabulary (MaskCLIP's demo recipe), or when ``threshold`` is set and the best class's probability
    ``softmax(logit_scale * cosine)`` is below it. ``logit_scale=100`` is CLIP's trained scale; on cosines
    (not min-max-normalised maps) it gives probabilities that a threshold can meaningfully cut — unlike the
    GEM README's recipe, whose softmax over [0, 1] maps never exceeds e/(e+K-1).
    """

    num_background: int = 0
    threshold: float | None = None
    logit_scale: float = 100.0

    def validate(self) -> None:
        if self.num_background < 0:
            raise ValueError("num_background must be >= 0")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"background threshold must be in (0, 1), got {self.threshold}")


def label_map(logits: Tensor, rule: BackgroundRule = BackgroundRule()) -> tuple[Tensor, Tensor]:
    """Argmax label map with a background rule.

    Args:
        logits: ``[B, K, H, W]`` cosines; the last ``rule.num_background`` classes are background names.
        rule: :class:`BackgroundRule`.

    Returns:
        ``(labels, confidence)``: ``labels`` ``[B, H, W]`` int64 in ``[0, K - num_background]``
        (0 = background), ``confidence`` ``[B, H, W]`` float, the winning class's probability.
    """
    rule.validate()
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, K, H, W], got {list(logits.shape)}")
    k = logits.shape[1]
    if rule.num_background >= k:
        raise ValueError(f"{rule.num_background} background names leave no foreground class among {k}")
    probs = torch.softmax(logits.float() * rule.logit_scale, dim=1)
    confidence, best = probs.max(dim=1)
    labels = best + 1
    background = best >= k - rule.num_background
    if rule.threshold is not None:
        background |= confidence < rule.threshold
    labels[background] = 0
    return labels, confidence
