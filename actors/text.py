"""Text embeddings with prompt templates, cached per (class name, template set).

A vocabulary of K class names becomes ``[K, D]`` unit vectors: every template is filled with the name,
encoded and L2-normalised; the template embeddings are averaged and normalised again (CLIP's prompt
ensembling; with one template this is just the normalised embedding). MaskCLIP's 85-template ensemble costs
85 text forwards per class, so results are cached and only names not seen before are encoded.

A name's embedding is a function of the name and the templates only: each name is encoded in its own text forward
(its templates, in fixed chunks of ``batch_size``), never batched with other names. Batched with others, the matrix
products run with a different batch dimension, and their rounding (CPU oneDNN/MKL, GPU cuBLAS kernel choice) moves the
embedding by ~1e-7, which is enough to flip 8-bit heatmap values; so which names happened to be missing from the
cache at the same time would change results.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: GEM's prompt (``gem/gem_wrapper.py``) and MaskCLIP's ``--no-prompt-eng`` prompt.
PHOTO_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)
#: The prompt as the user typed it (LeGrad's README encodes raw prompts).
RAW_TEMPLATE: tuple[str, ...] = ("{}",)
#: CLIP's 80 ImageNet templates plus MaskCLIP's five scene templates, in MaskCLIP's order.
ENSEMBLE_85: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES) + (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "photo": PHOTO_TEMPLATE,
    "raw": RAW_TEMPLATE,
    "ensemble85": ENSEMBLE_85,
}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template-set name (``photo``, ``raw``, ``ensemble85``) or a list of ``{}`` templates → tuple of templates."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set {templates!r}; use one of {sorted(TEMPLATE_SETS)} or a list")
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    if not out:
        raise ValueError("templates must not be empty")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}' placeholder")
    return out


class TextEncoder:
    """Encodes class names with templates into unit vectors, with an LRU cache.

    Args:
        model: an open_clip CLIP model (``encode_text`` is used).
        tokenizer: its tokenizer.
        max_cached: number of (name, templates) embeddings kept.
        batch_size: most prompts per text forward; one name's templates are encoded in chunks of this size, and
            names are never batched together (see the module docstring).
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_cached: int = 65536, batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.max_cached = max_cached
        self.batch_size = batch_size
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], Tensor] = OrderedDict()
        self.forwards = 0  # text prompts encoded so far (for tests and stats)

    @torch.no_grad()
    def encode(self, names: Sequence[str], templates: str | Sequence[str] = PHOTO_TEMPLATE) -> Tensor:
        """Embed ``names`` (K strings) → ``[K, D]`` float32 unit vectors on the model's device."""
        templates = resolve_templates(templates)
        names = list(names)
        if not names:
            raise ValueError("the prompt/class list is empty; give at least one name")
        for n in names:
            if not isinstance(n, str) or not n.strip():
                raise ValueError(f"class names and prompts must be non-empty strings, got {n!r}")
        missing = list(dict.fromkeys(n for n in names if (n, templates) not in self._cache))
        if missing:
            self._encode_missing(missing, templates)
        out = []
        for n in names:
            key = (n, templates)
            self._cache.move_to_end(key)
            out.append(self._cache[key])
        return torch.stack(out)

    def _encode_missing(self, names: list[str], templates: tuple[str, ...]) -> None:
        for n in names:
            self._cache[(n, templates)] = self._encode_one(n, templates)
            self.forwards += len(templates)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        logger.debug("encoded %d names x %d templates", len(names), len(templates))

    def _encode_one(self, name: str, templates: tuple[str, ...]) -> Tensor:
        """One name's ``[D]`` unit embedding, from forwards that hold this name's prompts only (fixed chunks)."""
        device = next(self.model.parameters()).device
        prompts = [t.format(name) for t in templates]
        chunks = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[i : i + self.batch_size]).to(device)
            chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return F.normalize(torch.cat(chunks).mean(dim=0), dim=-1)
