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

Text is never silently cut. open_clip's tokenizer truncates to the text tower's ``context_length`` and forces the end
token, so two prompts that differ only past the limit would get one embedding. :func:`prompt_tokens` counts a
prompt's tokens without truncation (start and end tokens included), :func:`check_fits` refuses a name whose longest
templated prompt does not fit (:class:`PromptTooLong`, naming the prompt, its token count and the limit), and
:meth:`TextEncoder.encode` applies it before any forward. :func:`text_key` is what decides whether two names are the
same text for the model: the token ids of every templated prompt, so case, inner whitespace and the tokenizer's
Unicode clean-up (ftfy, NFC) are covered by construction; :func:`dedupe` collapses a prompt list by it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn

from clipmaps.schemas.errors import ClipmapsError

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


def shorten(text: str, limit: int = 60) -> str:
    """``text`` in at most ``limit`` characters for messages: its start and its end around an ellipsis. Both ends,
    because long prompts often differ only at the end, and the message must tell them apart."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


class PromptTooLong(ClipmapsError, ValueError):
    """A prompt (a name filled into a template) has more tokens than the text tower's context holds.

    A ``ValueError`` too, so callers that already treat bad text as a value error (``clipmaps query``) report it.

    Attributes:
        prompt: the name as given.
        tokens: the templated prompt's token count (start and end tokens included).
        limit: the text tower's context length.
        template: the template that made it too long.
    """

    default_stage = "text"

    def __init__(self, prompt: str, tokens: int, limit: int, template: str = "{}"):
        self.prompt, self.tokens, self.limit, self.template = prompt, tokens, limit, template
        how = "" if template == "{}" else f" in template {template!r}"
        super().__init__(
            f"prompt {shorten(prompt)!r} is {tokens} tokens{how}; the text tower holds {limit} (it would be cut "
            "and lose its end)",
            error_type="PromptTooLong",
        )

    def __reduce__(self):  # Ray pickles exceptions across processes
        return PromptTooLong, (self.prompt, self.tokens, self.limit, self.template)


def context_length(tokenizer) -> int | None:
    """The number of token positions ``tokenizer`` fills (the text tower's context), or None if it does not say."""
    n = getattr(tokenizer, "context_length", None)
    return int(n) if n else None


def prompt_tokens(tokenizer, text: str) -> tuple[int, ...]:
    """The token ids of ``text`` before any truncation, start and end tokens included.

    open_clip's ``SimpleTokenizer`` (``encode``: its clean-up and BPE, no start/end, no truncation) and Hugging Face
    tokenizers (``HFTokenizer.tokenizer``, called without truncation) are read exactly. For another tokenizer the
    padded output of one call stands in: equality still works, but a count past the context cannot be seen.
    """
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):
        return (tokenizer.sot_token_id, *tokenizer.encode(text), tokenizer.eot_token_id)
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and callable(inner):
        clean = getattr(tokenizer, "clean_fn", None)
        ids = inner(clean(text) if clean else text, truncation=False)["input_ids"]
        return tuple(int(i) for i in ids)
    row = tokenizer([text])[0].tolist()
    while row and row[-1] == 0:  # padding
        row.pop()
    return tuple(row)


def check_fits(tokenizer, name: str, templates: Sequence[str], limit: int | None = None) -> None:
    """Raise :class:`PromptTooLong` if ``name`` filled into any of ``templates`` has more tokens than ``limit``
    (default: the tokenizer's context length). A name that fits raw may not fit in ``"a photo of a {}."``."""
    limit = limit or context_length(tokenizer)
    if not limit:
        return
    for t in templates:
        n = len(prompt_tokens(tokenizer, t.format(name)))
        if n > limit:
            raise PromptTooLong(name, n, limit, t)


def text_key(tokenizer, name: str, templates: Sequence[str] = RAW_TEMPLATE) -> tuple[tuple[int, ...], ...]:
    """What the model sees of ``name`` with ``templates``: the token ids of each templated prompt. Two names with
    equal keys get the same embedding, whatever their spelling (case, inner whitespace, Unicode form)."""
    return tuple(prompt_tokens(tokenizer, t.format(name)) for t in templates)


def dedupe(tokenizer, names: Sequence[str], templates: Sequence[str] = RAW_TEMPLATE) -> tuple[list[str], int]:
    """``names`` with later names that tokenize like an earlier one dropped (the first spelling is kept), and how
    many were dropped."""
    seen: set = set()
    out: list[str] = []
    for n in names:
        key = text_key(tokenizer, n, templates)
        if key not in seen:
            seen.add(key)
            out.append(n)
    return out, len(names) - len(out)


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
        """Embed ``names`` (K strings) → ``[K, D]`` float32 unit vectors on the model's device.

        Raises:
            PromptTooLong: a name does not fit the text tower's context with one of the templates (never cut).
            ValueError: an empty list, or a name that is not a non-empty string.
        """
        templates = resolve_templates(templates)
        names = list(names)
        if not names:
            raise ValueError("the prompt/class list is empty; give at least one name")
        for n in names:
            if not isinstance(n, str) or not n.strip():
                raise ValueError(f"class names and prompts must be non-empty strings, got {n!r}")
        missing = list(dict.fromkeys(n for n in names if (n, templates) not in self._cache))
        for n in missing:  # before any forward: a cut prompt would silently share another's embedding
            check_fits(self.tokenizer, n, templates)
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
