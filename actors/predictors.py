"""Predictors: the per-method batch logic between decoded rows and encoded output columns (pure torch, no Ray).

A predictor owns one method object (``actors/methods``), built from the method's settings in the job spec, and
turns a batch of decoded rows into the method's output columns (``schemas.batches``): PNG label maps, encoded
heatmaps, region embeddings. Which columns it writes, and their fill values, come from the method registry
(``clipmaps.actors.registry``). :class:`~clipmaps.actors.actor.MethodActor` does the Ray-facing bookkeeping around
it. (segment-anything calls this layer a predictor: the model plus batching and caching.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clipmaps.schemas import batches as cols
from clipmaps.schemas.encodings import encode_heatmap, encode_label_map

from .methods.common import BackgroundRule, label_map
from .methods.gem import GEM
from .methods.legrad import LeGrad
from .methods.maskclip import MaskCLIP
from .methods.maskinversion import MaskInversion
from .methods.pooled import PooledLeGrad, pooled_family
from .methods.pooled_maskinversion import PooledMaskInversion
from .models import LoadedModel
from .params import params_of
from .registry import ORIGINAL_GEM, REGISTRY
from .text import PromptTooLong, TextEncoder, check_fits, text_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Vocabulary:
    """Class names for label maps (and default prompts for heatmaps), resolved at plan time.

    Attributes:
        names: foreground class names; label ``i + 1`` in label maps.
        background: background names appended for scoring; their pixels get label 0.
        threshold: optional background confidence threshold (see :class:`BackgroundRule`).
    """

    names: tuple[str, ...]
    background: tuple[str, ...] = ()
    threshold: float | None = None

    @property
    def scored(self) -> list[str]:
        return [*self.names, *self.background]

    @property
    def rule(self) -> BackgroundRule:
        return BackgroundRule(num_background=len(self.background), threshold=self.threshold)


@dataclass(frozen=True)
class OutputOptions:
    """How results are encoded (the job's ``output`` section) and where prompts come from.

    Attributes:
        heatmap_encoding: ``png8`` or ``float16``.
        heatmap_size: ``(h, w)`` of every heatmap, or None for each image's own size.
        write_expl_maps: MaskInversion also writes its final explainability maps.
        prompt_source: ``manifest``, ``vocabulary`` or ``auto`` (each row's own, else the vocabulary's), as
            ``JobSpec.prompt_source`` resolves it at plan time; None for a method without heatmaps.
        label_logits_budget: largest K·H·W of upsampled class logits held at once; larger label maps are computed
            at a reduced scale and resized with nearest neighbour.
        label_confidence: label methods also write ``{method}__confidence``, the winning class's probability per
            pixel as an 8-bit PNG.
    """

    heatmap_encoding: str = "png8"
    heatmap_size: tuple[int, int] | None = None
    write_expl_maps: bool = False
    prompt_source: str | None = None
    label_logits_budget: int = 1 << 26
    label_confidence: bool = False


@dataclass
class Prediction:
    """Output columns for the rows of a batch, keyed by column name, each a list aligned with those rows."""

    columns: dict[str, list] = field(default_factory=dict)


@dataclass
class RowPrompts:
    """One row's heatmap prompts after the text checks.

    Attributes:
        prompts: the prompts that get a heatmap, in the row's order, each text once (first spelling kept).
        errors: one ``{prompt, error_type, message}`` per prompt refused (too long for the text tower).
        collapsed: how many prompts were dropped as token-identical to an earlier one of the row.
    """

    prompts: list[str]
    errors: list[dict] = field(default_factory=list)
    collapsed: int = 0


def _labels_batch(
    logits: torch.Tensor, rule: BackgroundRule, sizes: list[tuple[int, int]], budget: int
) -> tuple[list[bytes], list[bytes]]:
    """``logits`` ``[B, K, h, w]`` → one PNG label map per image at its ``sizes[b]`` ``(height, width)``, and one
    8-bit PNG of the winning class's probability (``round(255·p)``): bilinear logits within the budget (K·H·W values;
    above it at a reduced scale, labels and confidences resized with nearest neighbour), images of equal size in one
    computation."""
    out: list[bytes | None] = [None] * len(sizes)
    conf_out: list[bytes | None] = [None] * len(sizes)
    groups: dict[tuple[int, int], list[int]] = {}
    for b, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(b)
    k = logits.shape[1]
    for (height, width), members in groups.items():
        scale = min(1.0, (budget / max(1, k * height * width)) ** 0.5)
        th, tw = max(1, round(height * scale)), max(1, round(width * scale))
        sub = logits if len(members) == len(sizes) else logits[members]
        up = F.interpolate(sub.float(), size=(th, tw), mode="bilinear", align_corners=False)
        labels, confidence = label_map(up, rule)
        if (th, tw) != (height, width):
            labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
            confidence = F.interpolate(confidence[:, None], size=(height, width), mode="nearest")[:, 0]
        arr = labels.cpu().numpy()
        conf = torch.round(confidence.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
        for j, b in enumerate(members):
            out[b] = encode_label_map(arr[j])
            conf_out[b] = encode_label_map(conf[j])
    return out, conf_out


def _encode_maps(maps: torch.Tensor, size: tuple[int, int], encoding: str) -> list[bytes]:
    """``maps`` ``[P, h, w]`` → one encoded heatmap per prompt at ``size``."""
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    arr = maps.float().cpu().numpy()
    return [encode_heatmap(m, encoding) for m in arr]


class Predictor:
    """Base class: one method on whole batches.

    Args:
        lm: the loaded model.
        settings: the method's settings from the job spec (``clipmaps.actors.params.<Method>Settings``).
        templates: the resolved prompt templates (a set name or list), for methods that encode text.
        vocabulary: the job's vocabulary, or None.
        options: output encoding and the resolved prompt source.
        text: the shared text encoder (cached embeddings).
    """

    method: str = ""
    #: Whether bf16 autocast is allowed (``model.precision: bf16``); a method whose result drifts too far runs fp32.
    autocast_ok: bool = True

    def __init__(
        self,
        lm: LoadedModel,
        settings,
        *,
        templates=None,
        vocabulary: Vocabulary | None,
        options: OutputOptions,
        text: TextEncoder,
    ):
        self.lm = lm
        self.entry = REGISTRY[self.method]
        self.settings = settings
        resolved = {"templates": templates} if "templates" in self.entry.params.model_fields else {}
        self.params = params_of(settings, self.entry.params, **resolved)
        self.vocabulary = vocabulary
        self.options = options
        self.text = text

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def output_columns(self) -> tuple[str, ...]:
        """Every column :meth:`run` writes with these settings, as the registry declares them (their types and fill
        values are declared in ``schemas.batches.COLUMNS``)."""
        kinds = self.entry.output_kinds(
            self.settings,
            vocabulary=self.vocabulary is not None,
            write_expl_maps=self.options.write_expl_maps,
            label_confidence=self.options.label_confidence,
        )
        if cols.HEATMAPS in kinds:  # the per-prompt errors and the collapsed count travel with the maps
            kinds = (*kinds, *cols.PROMPT_KINDS)
        return tuple(cols.col(name, k) for name in self.entry.outputs(self.settings) for k in kinds)

    def stack(self, values: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(values)).to(self.device)

    def heatmap_size(self, rows: dict, i: int) -> tuple[int, int]:
        if self.options.heatmap_size:
            return tuple(self.options.heatmap_size)
        return int(rows[cols.HEIGHT][i]), int(rows[cols.WIDTH][i])

    def prompts_for(self, rows: dict, i: int) -> list[str]:
        """Row ``i``'s heatmap prompts: its own (``prompts`` column) or the vocabulary's names, by the resolved
        prompt source (``auto``: its own when it has some)."""
        source = self.options.prompt_source
        if source != "vocabulary":
            own = rows.get(cols.PROMPTS)
            own = [str(p) for p in own[i]] if own is not None and cols.present(own[i]) and len(own[i]) else None
            if own:
                return own
            if source == "manifest" or self.vocabulary is None:
                raise ValueError("the manifest row has no prompts, and this method takes its prompts from the manifest")
        if self.vocabulary is None:
            raise ValueError("no prompts: the job has no vocabulary")
        return list(self.vocabulary.names)

    #: The templates the method fills prompts into (set by each heatmap predictor from its method object).
    templates: tuple[str, ...] = ("{}",)

    def checked_prompts(self, rows: dict, i: int) -> RowPrompts:
        """Row ``i``'s prompts (:meth:`prompts_for`) after the text checks, so that no heatmap is written from cut
        text and none twice for one (image, method, prompt): a prompt too long for the text tower with one of the
        method's templates becomes an error entry (the row's other prompts go on), and a prompt whose token ids
        equal an earlier one's (the same text to the model, whatever its case, spacing or Unicode form) is dropped.
        """
        tokenizer = self.lm.tokenizer
        out = RowPrompts([])
        seen: set = set()
        for prompt in self.prompts_for(rows, i):
            try:
                check_fits(tokenizer, prompt, self.templates)
            except PromptTooLong as e:
                out.errors.append({"prompt": prompt, "error_type": e.error_type, "message": e.message})
                continue
            key = text_key(tokenizer, prompt, self.templates)
            if key in seen:
                out.collapsed += 1
                continue
            seen.add(key)
            out.prompts.append(prompt)
        return out

    def run(self, rows: dict) -> Prediction:  # pragma: no cover - interface
        raise NotImplementedError

    #: The attribute holding the method object (``actors/methods``), for :meth:`compile`.
    method_attr: str = ""

    def compile(self, **options) -> None:
        """Run the method's hot paths through ``torch.compile`` (``model.compile: true``); ``options`` go to
        ``torch.compile``. Compilation happens on the first batches (and once more when the batch size first
        changes, after which shapes are dynamic)."""
        method = getattr(self, self.method_attr, None) if self.method_attr else None
        if method is None or not hasattr(method, "compile"):
            logger.warning("%s: model.compile is set but this method has no compiled path; it runs eager", self.method)
            return
        method.compile(**options)

    def heatmap_columns(self, name: str, rows: dict, checked: list[RowPrompts], maps: list[torch.Tensor]) -> dict:
        """Heatmaps ``[P_i, h, w]`` per row → the encoded heatmap output columns of output ``name``, with each row's
        refused prompts and collapsed count."""
        sizes = [self.heatmap_size(rows, i) for i in range(len(maps))]
        return {
            cols.col(name, cols.HEATMAPS): [
                _encode_maps(m, size, self.options.heatmap_encoding) if len(m) else [] for m, size in zip(maps, sizes)
            ],
            cols.col(name, cols.HEATMAP_PROMPTS): [c.prompts for c in checked],
            cols.col(name, cols.HEATMAP_HW): [np.array(size, np.int64) for size in sizes],
            cols.col(name, cols.PROMPT_ERRORS): [c.errors for c in checked],
            cols.col(name, cols.PROMPTS_COLLAPSED): [c.collapsed for c in checked],
        }


def _maps_for(fn, x: torch.Tensor, checked: list[RowPrompts], **per_row) -> list[torch.Tensor]:
    """``fn(x, prompts, **per_row)`` on the rows that kept a prompt; a row whose every prompt was refused gets an
    empty ``[0, h, w]`` (the methods take at least one prompt per image). ``per_row`` tensors are subset alike."""
    keep = [i for i, c in enumerate(checked) if c.prompts]
    out: list[torch.Tensor] = [x.new_zeros((0, 1, 1)) for _ in checked]
    if keep:
        index = torch.tensor(keep, device=x.device)
        sub = {k: (v.index_select(0, index) if v is not None else None) for k, v in per_row.items()}
        maps = fn(x.index_select(0, index), [checked[i].prompts for i in keep], **sub)
        for i, m in zip(keep, maps):
            out[i] = m
    return out


class GEMPredictor(Predictor):
    method = "gem"
    method_attr = "gem"

    def __init__(self, lm, settings, **kwargs):
        super().__init__(lm, settings, **kwargs)
        self.gem = GEM(lm.model, lm.tokenizer, self.params, text_encoder=self.text)
        self.templates = self.gem.templates

    def run(self, rows: dict) -> Prediction:
        x = self.stack(rows[cols.PIXELS_SQUARE])
        original = self.settings.original
        feat_gem, feat_ori = self.gem.features(x, with_original=original)  # one forward for all outputs
        out = Prediction()
        self._outputs(rows, x, self.method, feat_gem, out)
        if original:
            self._outputs(rows, x, ORIGINAL_GEM, feat_ori, out)
        return out

    def _outputs(self, rows: dict, x: torch.Tensor, name: str, features: torch.Tensor, out: Prediction) -> None:
        n = x.shape[0]
        if self.settings.labels and self.vocabulary is not None:
            logits = self.gem.class_logits(x, self.vocabulary.scored, features=features)
            sizes = [(int(rows[cols.HEIGHT][i]), int(rows[cols.WIDTH][i])) for i in range(n)]
            labels, confidence = _labels_batch(logits, self.vocabulary.rule, sizes, self.options.label_logits_budget)
            out.columns[cols.col(name, cols.LABELS)] = labels
            if self.options.label_confidence:
                out.columns[cols.col(name, cols.CONFIDENCE)] = confidence
        if self.settings.heatmaps:
            checked = [self.checked_prompts(rows, i) for i in range(n)]
            maps = _maps_for(self.gem.heatmaps, x, checked, features=features)
            out.columns.update(self.heatmap_columns(name, rows, checked, maps))


class MaskCLIPPredictor(Predictor):
    method = "maskclip"
    method_attr = "maskclip"

    def __init__(self, lm, settings, **kwargs):
        super().__init__(lm, settings, **kwargs)
        if self.vocabulary is None:
            raise ValueError("MaskCLIP needs a vocabulary")
        self.maskclip = MaskCLIP(lm.model, lm.tokenizer, self.params, text_encoder=self.text)

    def run(self, rows: dict) -> Prediction:
        # keep-ratio inputs differ in size: one call per group of equal size (usually one or two per batch)
        groups: dict[tuple, list[int]] = {}
        for i, pixels in enumerate(rows[cols.PIXELS_MASKCLIP]):
            groups.setdefault(tuple(pixels.shape), []).append(i)
        labels: list[bytes | None] = [None] * len(rows[cols.PIXELS_MASKCLIP])
        confidences: list[bytes | None] = [None] * len(labels)
        for members in groups.values():
            x = self.stack([rows[cols.PIXELS_MASKCLIP][i] for i in members])
            logits = self.maskclip.class_logits(x, self.vocabulary.scored)
            sizes = [(int(rows[cols.HEIGHT][i]), int(rows[cols.WIDTH][i])) for i in members]
            encoded, confidence = _labels_batch(logits, self.vocabulary.rule, sizes, self.options.label_logits_budget)
            for i, png, conf in zip(members, encoded, confidence, strict=True):
                labels[i], confidences[i] = png, conf
        out = {cols.col(self.method, cols.LABELS): labels}
        if self.options.label_confidence:
            out[cols.col(self.method, cols.CONFIDENCE)] = confidences
        return Prediction(out)


class LeGradPredictor(Predictor):
    method = "legrad"
    method_attr = "legrad"

    def __init__(self, lm, settings, **kwargs):
        super().__init__(lm, settings, **kwargs)
        if pooled_family(lm.model) is not None:  # SigLIP / CoCa: LeGrad through the attention-pooling head
            self.legrad = PooledLeGrad(lm.model, lm.tokenizer, self.params, text_encoder=self.text)
        else:
            self.legrad = LeGrad(lm.model, lm.tokenizer, self.params, text_encoder=self.text)
        self.templates = self.legrad.templates

    def run(self, rows: dict) -> Prediction:
        x = self.stack(rows[cols.PIXELS_SQUARE])
        checked = [self.checked_prompts(rows, i) for i in range(x.shape[0])]
        return Prediction(self.heatmap_columns(self.method, rows, checked, _maps_for(self.legrad.heatmaps, x, checked)))


class MaskInversionPredictor(Predictor):
    method = "maskinversion"
    method_attr = "maskinversion"
    # measured on an H100 (ViT-B-16, 448 px, 10 Adam steps): bf16 embeddings reach only cosine 0.81 to fp32 ones,
    # as the optimisation amplifies rounding; MaskInversion always runs in fp32
    autocast_ok = False

    def __init__(self, lm, settings, **kwargs):
        super().__init__(lm, settings, **kwargs)
        if pooled_family(lm.model) is not None:
            self.maskinversion = PooledMaskInversion(lm.model, self.params, tokenizer=lm.tokenizer)
        else:
            self.maskinversion = MaskInversion(lm.model, self.params)

    def run(self, rows: dict) -> Prediction:
        x = self.stack(rows[cols.PIXELS_SQUARE])
        masks = [torch.from_numpy(np.asarray(m, dtype=np.float32)).to(self.device) for m in rows[cols.MASKS_SQUARE]]
        results = self.maskinversion.embed(x, masks, return_maps=self.options.write_expl_maps)
        out = {
            cols.col(self.method, cols.EMBEDDINGS): [
                F.normalize(r.embeddings.float(), dim=-1).cpu().numpy() for r in results
            ],
            cols.col(self.method, cols.LOSS): [r.loss.float().cpu().numpy() for r in results],
        }
        if self.options.write_expl_maps:
            out[cols.col(self.method, cols.EXPL_MAPS)] = [
                [encode_heatmap(m, "png8") for m in r.maps.float().cpu().numpy()] for r in results
            ]
        return Prediction(out)
