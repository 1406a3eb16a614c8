"""Method runners: turn a batch of decoded rows into encoded output columns for one method (pure torch, no Ray).

A runner owns one method object and knows which input columns it reads and which output columns it writes
(``schemas.batches``). :class:`~clipmaps.actors.actor.MethodActor` does the Ray-facing bookkeeping around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clipmaps.schemas import batches as cols
from clipmaps.schemas.encodings import encode_heatmap, encode_label_map

from .methods.common import BackgroundRule, label_map
from .methods.gem import GEM, GEMParams
from .methods.legrad import LeGrad, LeGradParams
from .methods.maskclip import MaskCLIP, MaskCLIPParams
from .methods.maskinversion import MaskInversion, MaskInversionParams
from .models import LoadedModel
from .text import TextEncoder, resolve_templates


@dataclass(frozen=True)
class Vocabulary:
    """Class names for label maps (and default prompts for heatmaps).

    Attributes:
        names: foreground class names; label ``i + 1`` in label maps.
        background: background names appended for scoring; their pixels get label 0.
        templates: prompt template set name or templates.
        threshold: optional background confidence threshold (see :class:`BackgroundRule`).
    """

    names: tuple[str, ...]
    background: tuple[str, ...] = ()
    templates: str | tuple[str, ...] = "photo"
    threshold: float | None = None

    @property
    def scored(self) -> list[str]:
        return [*self.names, *self.background]

    @property
    def rule(self) -> BackgroundRule:
        return BackgroundRule(num_background=len(self.background), threshold=self.threshold)


@dataclass(frozen=True)
class OutputOptions:
    """How results are encoded: heatmap encoding and size (None = the original image size), label-map budget."""

    heatmap_encoding: str = "png8"
    heatmap_size: tuple[int, int] | None = None
    write_expl_maps: bool = False
    labels: bool = True
    heatmaps: bool = True
    prompts: str = "auto"  # auto | vocabulary | manifest
    original: bool = False  # GEM: also write the unmodified model's maps as method "gem_original" (a baseline)
    #: Largest K·H·W of upsampled class logits held at once; larger label maps are computed at a reduced scale and
    #: resized with nearest neighbour.
    label_logits_budget: int = 1 << 26


@dataclass
class RunnerResult:
    """Output columns for the valid rows of a batch, keyed by column name, each a list aligned with those rows."""

    columns: dict[str, list] = field(default_factory=dict)


def _labels_at(logits: torch.Tensor, rule: BackgroundRule, height: int, width: int, budget: int) -> bytes:
    """``logits`` ``[K, h, w]`` → PNG label map at ``height × width`` (bilinear logits within the budget)."""
    k = logits.shape[0]
    scale = min(1.0, (budget / max(1, k * height * width)) ** 0.5)
    th, tw = max(1, round(height * scale)), max(1, round(width * scale))
    up = F.interpolate(logits[None].float(), size=(th, tw), mode="bilinear", align_corners=False)
    labels, _ = label_map(up, rule)
    labels = labels[0]
    if (th, tw) != (height, width):
        labels = F.interpolate(labels[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
    return encode_label_map(labels.cpu().numpy())


def _encode_maps(maps: torch.Tensor, size: tuple[int, int], encoding: str) -> list[bytes]:
    """``maps`` ``[P, h, w]`` → one encoded heatmap per prompt at ``size``."""
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    arr = maps.float().cpu().numpy()
    return [encode_heatmap(m, encoding) for m in arr]


#: The output name of GEM's baseline maps from the unmodified model (upstream ``return_ori``).
ORIGINAL_GEM = "gem_original"


class Runner:
    """Base class: one method, its inputs and outputs."""

    method: str = ""
    inputs: tuple[str, ...] = ()
    #: Whether bf16 autocast is allowed (``model.precision: bf16``); a method whose result drifts too far runs fp32.
    autocast_ok: bool = True

    def __init__(
        self, lm: LoadedModel, params, vocabulary: Vocabulary | None, options: OutputOptions, text: TextEncoder
    ):
        self.lm = lm
        self.params = params
        self.vocabulary = vocabulary
        self.options = options
        self.text = text

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def stack(self, values: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(values)).to(self.device)

    def heatmap_size(self, rows: dict, i: int) -> tuple[int, int]:
        return (
            tuple(self.options.heatmap_size)
            if self.options.heatmap_size
            else (int(rows[cols.HEIGHT][i]), int(rows[cols.WIDTH][i]))
        )

    def prompts_for(self, rows: dict, i: int) -> list[str]:
        own = rows.get(cols.PROMPTS)
        own = [str(p) for p in own[i]] if own is not None and cols.present(own[i]) and len(own[i]) else None
        mode = self.options.prompts
        if mode == "manifest" or (mode == "auto" and own):
            if not own:
                raise ValueError("the manifest row has no prompts and prompts: manifest was asked for")
            return own
        if self.vocabulary is None:
            raise ValueError("no prompts: the row has none and the job has no vocabulary")
        return list(self.vocabulary.names)

    def run(self, rows: dict) -> RunnerResult:  # pragma: no cover - interface
        raise NotImplementedError

    def output_columns(self) -> dict[str, object]:  # pragma: no cover - interface
        """Every column :meth:`run` writes with these options, with the value of a row the method did not produce
        (failed upstream or here). The actor emits all of them on every batch, even one where no row reached the
        method, so blocks from different batches share one schema: ``None`` in byte and list columns, an empty (or
        zero) array of the right shape in array columns, where Ray cannot mix ``None`` with tensors."""
        raise NotImplementedError

    @staticmethod
    def heatmap_outputs(name: str) -> dict[str, object]:
        return {
            cols.col(name, cols.HEATMAPS): None,
            cols.col(name, cols.HEATMAP_PROMPTS): None,
            cols.col(name, cols.HEATMAP_HW): np.zeros(2, np.int64),
        }

    def heatmap_columns(self, name: str, rows: dict, prompts: list[list[str]], maps: list[torch.Tensor]) -> dict:
        """Encoded heatmaps ``[P_i, h, w]`` per row → the heatmap output columns of ``name``."""
        sizes = [self.heatmap_size(rows, i) for i in range(len(maps))]
        return {
            cols.col(name, cols.HEATMAPS): [
                _encode_maps(m, size, self.options.heatmap_encoding) for m, size in zip(maps, sizes)
            ],
            cols.col(name, cols.HEATMAP_PROMPTS): prompts,
            cols.col(name, cols.HEATMAP_HW): [np.array(size, np.int64) for size in sizes],
        }


class GEMRunner(Runner):
    method = "gem"
    inputs = (cols.PIXELS_SQUARE,)

    def __init__(self, lm, params: GEMParams, vocabulary, options, text):
        super().__init__(lm, params, vocabulary, options, text)
        self.gem = GEM(lm.model, lm.tokenizer, params, text_encoder=text)

    def output_columns(self) -> dict[str, object]:
        columns: dict[str, object] = {}
        for name in (self.method, ORIGINAL_GEM) if self.options.original else (self.method,):
            if self.options.labels and self.vocabulary is not None:
                columns[cols.col(name, cols.LABELS)] = None
            if self.options.heatmaps:
                columns.update(self.heatmap_outputs(name))
        return columns

    def run(self, rows: dict) -> RunnerResult:
        x = self.stack(rows[cols.PIXELS_SQUARE])
        feat_gem, feat_ori = self.gem.features(x, with_original=self.options.original)  # one forward for all
        out = RunnerResult()
        self._outputs(rows, x, self.method, feat_gem, out)
        if self.options.original:
            self._outputs(rows, x, ORIGINAL_GEM, feat_ori, out)
        return out

    def _outputs(self, rows: dict, x: torch.Tensor, name: str, features: torch.Tensor, out: RunnerResult) -> None:
        n = x.shape[0]
        if self.options.labels and self.vocabulary is not None:
            logits = self.gem.class_logits(x, self.vocabulary.scored, features=features)
            out.columns[cols.col(name, cols.LABELS)] = [
                _labels_at(
                    logits[i],
                    self.vocabulary.rule,
                    int(rows[cols.HEIGHT][i]),
                    int(rows[cols.WIDTH][i]),
                    self.options.label_logits_budget,
                )
                for i in range(n)
            ]
        if self.options.heatmaps:
            prompts = [self.prompts_for(rows, i) for i in range(n)]
            out.columns.update(
                self.heatmap_columns(name, rows, prompts, self.gem.heatmaps(x, prompts, features=features))
            )


class MaskCLIPRunner(Runner):
    method = "maskclip"
    inputs = (cols.PIXELS_MASKCLIP,)

    def __init__(self, lm, params: MaskCLIPParams, vocabulary, options, text):
        if vocabulary is None:
            raise ValueError("MaskCLIP needs a vocabulary")
        super().__init__(lm, params, vocabulary, options, text)
        self.maskclip = MaskCLIP(lm.model, lm.tokenizer, params, text_encoder=text)

    def output_columns(self) -> dict[str, object]:
        return {cols.col(self.method, cols.LABELS): None}

    def run(self, rows: dict) -> RunnerResult:
        labels = []
        for i, pixels in enumerate(rows[cols.PIXELS_MASKCLIP]):  # keep-ratio inputs differ in size: one at a time
            x = torch.from_numpy(pixels)[None].to(self.device)
            logits = self.maskclip.class_logits(x, self.vocabulary.scored)[0]
            labels.append(
                _labels_at(
                    logits,
                    self.vocabulary.rule,
                    int(rows[cols.HEIGHT][i]),
                    int(rows[cols.WIDTH][i]),
                    self.options.label_logits_budget,
                )
            )
        return RunnerResult({cols.col(self.method, cols.LABELS): labels})


class LeGradRunner(Runner):
    method = "legrad"
    inputs = (cols.PIXELS_SQUARE,)

    def __init__(self, lm, params: LeGradParams, vocabulary, options, text):
        super().__init__(lm, params, vocabulary, options, text)
        self.legrad = LeGrad(lm.model, lm.tokenizer, params, text_encoder=text)

    def output_columns(self) -> dict[str, object]:
        return self.heatmap_outputs(self.method)

    def run(self, rows: dict) -> RunnerResult:
        x = self.stack(rows[cols.PIXELS_SQUARE])
        prompts = [self.prompts_for(rows, i) for i in range(x.shape[0])]
        return RunnerResult(self.heatmap_columns(self.method, rows, prompts, self.legrad.heatmaps(x, prompts)))


class MaskInversionRunner(Runner):
    method = "maskinversion"
    inputs = (cols.PIXELS_SQUARE, cols.MASKS_SQUARE)
    # measured on an H100 (ViT-B-16, 448 px, 10 Adam steps): bf16 embeddings reach only cosine 0.81 to fp32 ones,
    # as the optimisation amplifies rounding; MaskInversion always runs in fp32
    autocast_ok = False

    def __init__(self, lm, params: MaskInversionParams, vocabulary, options, text):
        super().__init__(lm, params, vocabulary, options, text)
        self.maskinversion = MaskInversion(lm.model, params)
        visual = lm.model.visual
        self.dim = int(visual.proj.shape[1]) if visual.proj is not None else int(visual.output_dim)

    def output_columns(self) -> dict[str, object]:
        columns: dict[str, object] = {
            cols.col(self.method, cols.EMBEDDINGS): np.zeros((0, self.dim), np.float32),
            cols.col(self.method, cols.LOSS): np.zeros((0,), np.float32),
        }
        if self.options.write_expl_maps:
            columns[cols.col(self.method, cols.EXPL_MAPS)] = None
        return columns

    def run(self, rows: dict) -> RunnerResult:
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
        return RunnerResult(out)


RUNNERS: dict[str, type[Runner]] = {r.method: r for r in (GEMRunner, MaskCLIPRunner, LeGradRunner, MaskInversionRunner)}
PARAMS = {"gem": GEMParams, "maskclip": MaskCLIPParams, "legrad": LeGradParams, "maskinversion": MaskInversionParams}


def build_params(method: str, values: dict):
    """Method parameters from plain values (templates given as a set name or a list)."""
    if method not in PARAMS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(PARAMS)}")
    values = dict(values)
    if "templates" in values:
        values["templates"] = resolve_templates(values["templates"])
    return PARAMS[method](**values)
