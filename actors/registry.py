"""The method registry: one entry per method, carrying everything the rest of clipmaps needs to know about it.

An entry (:class:`MethodEntry`) names the method's settings class (its section of the job spec, with one set of
bounds; :mod:`clipmaps.actors.params`), the in-flight columns it reads and writes (``schemas.batches``), the backbone
families it runs on, its preprocessing as data, whether it encodes text, its default pool resources and its
predictor (the per-method batch logic in :mod:`clipmaps.actors.predictors`, named as a string so that this module
never imports torch). The job spec, plan building, the actor, the sink, ``clipmaps models`` and the fingerprint all
read it; adding a method touches its entry, its module, its predictor and its tests. (Modelled on NeMo Curator's
``ProcessingStage``, one object per stage, and open_clip's ``pretrained.py``, preprocessing as data.)

:func:`model_info` reads an architecture's configuration (open_clip's ``model_configs/*.json`` or clipmaps' own)
without importing open_clip or torch, so ``--dry-run`` and spec validation check layer counts, patch sizes and
backbone families in milliseconds.

Imports pydantic and the standard library only.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipmaps.schemas import batches as cols

from .params import (
    GEMParams,
    GEMSettings,
    LeGradParams,
    LeGradSettings,
    MaskCLIPParams,
    MaskCLIPSettings,
    MaskInversionParams,
    MaskInversionSettings,
    MethodParams,
    ModelInfo,
    PoolSpec,
)

__all__ = [
    "BUNDLED_WEIGHTS",
    "FAMILIES",
    "FAMILY_NORMALIZATION",
    "bundled_weights",
    "ORIGINAL_GEM",
    "REGISTRY",
    "MethodEntry",
    "ModelInfo",
    "UnknownModel",
    "entry",
    "list_model_names",
    "model_info",
    "supported_methods",
]

#: Backbone families :func:`model_info` tells apart, and what each is.
FAMILIES: dict[str, str] = {
    "vit": "CLIP ViT (open_clip VisionTransformer: class token or pooled, plain softmax attention)",
    "resnet": "CLIP ModifiedResNet (RN50, RN101, RN50x4…; attention pooling)",
    "siglip": "SigLIP / SigLIP 2 (timm ViT with an attention-pooling head)",
    "coca": "CoCa (open_clip ViT with an attentional pooler and a text decoder)",
    "timm": "another timm image tower (ConvNeXt, EVA, ViTamin, MobileCLIP, PE…)",
}
#: Pixel normalisation (a ``clipmaps.pipeline.decode.preprocess.NORMALIZATIONS`` name) of the families not trained
#: with OpenAI CLIP's mean/std: SigLIP uses Inception's (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5) (open_clip's pretrained
#: configs; upstream LeGrad keeps the model's own transform).
FAMILY_NORMALIZATION: dict[str, str] = {"siglip": "inception"}
#: The output name of GEM's baseline maps from the unmodified model (upstream ``return_ori``).
ORIGINAL_GEM = "gem_original"

_BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
#: Blocks of timm's SigLIP trunks by the size in their name (``vit_<size>_patch16_siglip_256``; timm 1.0's
#: ``vision_transformer.py``), so the spec bounds LeGrad's and MaskInversion's ``layers`` without building one.
_SIGLIP_DEPTH = {"base": 12, "large": 24, "so400m": 27, "giantopt": 40}


@dataclass(frozen=True)
class MethodEntry:
    """Everything about one method (or, for GEM's baseline, one output produced by another method's pass).

    Attributes:
        name: the key in the job spec and the ``method`` column of outputs (``gem``).
        display: the name people use (``GEM``).
        paper: the paper, for docs and ``clipmaps models``.
        upstream: the upstream file the implementation follows.
        settings: the spec section class (``methods.<name>``); ``None`` for an output of another method.
        params: the hyper-parameter class the method module takes (a base class of ``settings``).
        families: backbone families (:data:`FAMILIES`) the method is defined for.
        why_not: the reason given when the model's family is not in ``families``.
        why_not_family: a more precise reason for some families (``{"siglip": "..."}``), else ``why_not``.
        inputs: in-flight columns the method reads (``schemas.batches``).
        square_input: takes the shared ``size × size`` input (else MaskCLIP's keep-ratio input).
        encodes_text: encodes class names or prompts (so its outputs carry a vocabulary id).
        predictor: ``"module:Class"`` of its predictor, imported by the actor only.
        default_templates: the template set a text method encodes with when neither it nor the vocabulary names one
            (its upstream prompt).
        region_outputs: writes region embeddings (``regions/``) rather than label maps and heatmaps.
        baseline: the output name of the unmodified model's maps, written beside the method's own when its settings
            set ``original`` (GEM's upstream ``return_ori``).
        output_options: the ``output.*`` fields its rows depend on (fingerprinted with it); heatmap methods add
            the heatmap encoding and size while they write heatmaps.
        default_resources: the pool a method section gets when it names none.
        parent: for an output produced inside another method's pass (GEM's baseline), that method.
        version: the version of the implementation's results, fingerprinted: bump it with any change that moves
            the method's outputs (even by one 8-bit step or one float ulp), so that an output written before is
            refused instead of mixed. 2: every output a function of its own image (batch-invariant trunk and text);
            3 (heatmap methods): a row's prompts deduplicated by token ids, too-long prompts refused per prompt.
    """

    name: str
    display: str
    paper: str
    upstream: str
    settings: type[MethodParams] | None
    params: type[MethodParams] | None
    families: frozenset[str]
    why_not: str
    inputs: tuple[str, ...]
    square_input: bool
    encodes_text: bool
    predictor: str | None
    default_templates: str | None = None
    region_outputs: bool = False
    baseline: str | None = None
    output_options: tuple[str, ...] = ()
    default_resources: PoolSpec = field(default_factory=PoolSpec)
    parent: str | None = None
    version: int = 2
    why_not_family: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ what it writes

    def output_kinds(
        self, settings: Any, *, vocabulary: bool, write_expl_maps: bool, label_confidence: bool = False
    ) -> tuple[str, ...]:
        """The in-flight output kinds (``schemas.batches`` names: ``labels``, ``heatmaps``…) the method writes
        with these settings; the actor emits ``col(name, kind)`` for each, on every batch."""
        if self.region_outputs:
            return (cols.EMBEDDINGS, cols.LOSS) + ((cols.EXPL_MAPS,) if write_expl_maps else ())
        kinds: tuple[str, ...] = ()
        if settings.labels and vocabulary:
            kinds += (cols.LABELS,) + ((cols.CONFIDENCE,) if label_confidence else ())
        if settings.heatmaps:
            kinds += cols.HEATMAP_KINDS
        return kinds

    def outputs(self, settings: Any) -> tuple[str, ...]:
        """Output names (the ``method`` column values) one enabled section produces: its own, plus its baseline's
        when its settings set ``original``."""
        if self.baseline is not None and settings.original:
            return (self.name, self.baseline)
        return (self.name,)

    def output_fields(self, settings: Any) -> tuple[str, ...]:
        """The ``output.*`` fields this method's rows depend on with these settings (fingerprinted with it)."""
        heatmap = ("heatmap_encoding", "heatmap_size") if settings.heatmaps else ()
        labels = ("label_confidence",) if getattr(settings, "labels", False) else ()
        return heatmap + labels + self.output_options

    # ------------------------------------------------------------------ preprocessing as data

    def preprocess(self, settings: Any, info: ModelInfo | None = None) -> dict[str, Any]:
        """How the decode stage resizes and normalises images for this method (plain values, fingerprinted).

        With the model's ``info``, the square input is normalised as the backbone family was trained
        (:data:`FAMILY_NORMALIZATION`); without it, with OpenAI CLIP's mean/std.
        """
        if self.square_input:
            normalize = FAMILY_NORMALIZATION.get(info.family, "clip") if info is not None else "clip"
            return {"mode": "square", "size": settings.size, "normalize": normalize, "resample": "bicubic"}
        return {
            "mode": "short_side",
            "size": settings.size,
            "max_long_side": settings.max_long_side,
            "normalize": settings.normalize,
            "resample": "bilinear",
        }

    # ------------------------------------------------------------------ the model

    def model_problems(self, settings: Any, info: ModelInfo) -> list[tuple[str, str]]:
        """``[(field, reason)]``: the backbone family is unsupported, or a model-dependent bound fails."""
        if info.family not in self.families:
            why = self.why_not_family.get(info.family, self.why_not)
            return [("", f"{self.display} cannot run on {info.name} ({FAMILIES[info.family]}): {why}")]
        return settings.model_problems(info)

    def load_predictor(self) -> Callable:
        """The predictor class (imports torch; workers only)."""
        module, _, name = self.predictor.partition(":")
        return getattr(importlib.import_module(module), name)


_VIT_ONLY = (
    "its paper and upstream code modify CLIP ViT attention blocks (class token, q/k/v of open_clip's "
    "VisionTransformer), which this backbone does not have"
)
_POOLED_GEM = {
    "siglip": "GEM (paper and gem-torch) rewrites the self-attention of CLIP ViT blocks and reads every token "
    "through ln_post and proj; a SigLIP tower has neither a class token nor a per-token projection (its embedding "
    "is an attention-pooling head ending in an MLP), and neither defines GEM for it",
    "coca": "GEM (paper and gem-torch) projects every token through ln_post and proj, which on CoCa apply only to "
    "the attention pooler's queries, not to patch tokens; neither defines GEM for it",
}
_POOLED_MASKCLIP = {
    "siglip": "MaskCLIP (paper and code) reads dense features off the value path of the layer that makes CLIP's "
    "embedding (ViT last block, ResNet attention pool); SigLIP's pooling head ends in an MLP on the pooled latent, "
    "so no per-patch embedding follows from it, and neither the paper nor its code define one",
    "coca": "MaskCLIP (paper and code) reads dense features off the value path of the layer that makes CLIP's "
    "embedding; CoCa's attentional pooler mixes tokens into learned queries before its normalisation and "
    "projection, and neither the paper nor its code define MaskCLIP for it",
}
_LEGRAD_FAMILIES = "; upstream LeGrad defines it for CLIP ViTs, SigLIP and CoCa (attention-pooling heads) only"

REGISTRY: dict[str, MethodEntry] = {
    e.name: e
    for e in (
        MethodEntry(
            name="maskclip",
            display="MaskCLIP",
            paper="Extract Free Dense Labels from CLIP (arXiv 2112.01071)",
            upstream="mmseg/models/decode_heads/maskclip_head.py, mmseg/models/backbones/vit.py",
            settings=MaskCLIPSettings,
            params=MaskCLIPParams,
            families=frozenset({"vit", "resnet"}),
            why_not="MaskCLIP is defined for CLIP's ViT (value path of the last block) and ModifiedResNet "
            "(attention pool as 1x1 convolutions)",
            why_not_family=_POOLED_MASKCLIP,
            inputs=(cols.PIXELS_MASKCLIP,),
            square_input=False,
            encodes_text=True,
            predictor="clipmaps.actors.predictors:MaskCLIPPredictor",
            version=3,
            default_templates="ensemble85",
        ),
        MethodEntry(
            name="gem",
            display="GEM",
            paper="Grounding Everything (arXiv 2312.00878)",
            upstream="gem/gem_utils.py, gem/gem_wrapper.py",
            settings=GEMSettings,
            params=GEMParams,
            families=frozenset({"vit"}),
            why_not=_VIT_ONLY,
            why_not_family=_POOLED_GEM,
            inputs=(cols.PIXELS_SQUARE,),
            square_input=True,
            encodes_text=True,
            predictor="clipmaps.actors.predictors:GEMPredictor",
            version=4,
            default_templates="photo",
            baseline=ORIGINAL_GEM,
        ),
        MethodEntry(
            name="legrad",
            display="LeGrad",
            paper="An Explainability Method for Vision Transformers via Feature Formation Sensitivity "
            "(arXiv 2404.03214)",
            upstream="legrad/wrapper.py, legrad/utils.py",
            settings=LeGradSettings,
            params=LeGradParams,
            families=frozenset({"vit", "siglip", "coca"}),
            why_not=_VIT_ONLY + _LEGRAD_FAMILIES,
            inputs=(cols.PIXELS_SQUARE,),
            square_input=True,
            encodes_text=True,
            predictor="clipmaps.actors.predictors:LeGradPredictor",
            version=4,
            default_templates="raw",
        ),
        MethodEntry(
            name="maskinversion",
            display="MaskInversion",
            paper="Visual Prompting via Mask Inversion: localized embeddings via optimization of explainability "
            "maps (arXiv 2407.20034)",
            upstream="maskinversion/maskinversion.py",
            settings=MaskInversionSettings,
            params=MaskInversionParams,
            families=frozenset({"vit", "siglip", "coca"}),
            why_not=_VIT_ONLY + _LEGRAD_FAMILIES,
            inputs=(cols.PIXELS_SQUARE, cols.MASKS_SQUARE),
            square_input=True,
            encodes_text=False,
            predictor="clipmaps.actors.predictors:MaskInversionPredictor",
            version=3,
            region_outputs=True,
            output_options=("write_expl_maps",),
        ),
        MethodEntry(
            name=ORIGINAL_GEM,
            display="GEM baseline (unmodified model)",
            paper="the raw CLIP patch-text map GEM reports beside its own (upstream return_ori)",
            upstream="gem/gem_wrapper.py (return_ori=True)",
            settings=None,
            params=None,
            families=frozenset({"vit"}),
            why_not=_VIT_ONLY,
            why_not_family=_POOLED_GEM,
            inputs=(cols.PIXELS_SQUARE,),
            square_input=True,
            encodes_text=True,
            predictor=None,
            parent="gem",
        ),
    )
}
#: Methods a job spec can enable, in pipeline order (GEM's baseline is enabled by ``methods.gem.original``).
METHODS: tuple[str, ...] = tuple(name for name, e in REGISTRY.items() if e.settings is not None)


def entry(name: str) -> MethodEntry:
    """The registry entry of ``name``; ``KeyError`` naming the methods on offer."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; methods: {', '.join(REGISTRY)}") from None


# ------------------------------------------------------------------------------------------------ models

#: Weights shipped inside the package, by (architecture, pretrained tag): file under ``weights/`` and its sha256.
#: ``load_model(name, pretrained=tag)`` reads these from disk instead of asking open_clip's hub.
BUNDLED_WEIGHTS: dict[tuple[str, str], tuple[str, str]] = {
    # `clipmaps train` with its defaults; model card: weights/clipmaps-synth-vit.md
    ("clipmaps-synth-vit", "synth-shapes-v1"): (
        "clipmaps-synth-vit-v1.safetensors",
        "0a63e24c4495ea8c57c6fa4a9a88e7aaf0c8354be38057f8673a1ab827fe3595",
    ),
}
WEIGHTS_DIR = Path(__file__).parent / "weights"


def bundled_weights(name: str, tag: str | None) -> Path | None:
    """The packaged weight file of ``(name, tag)``, or ``None`` when it is not one of clipmaps' own."""
    entry = BUNDLED_WEIGHTS.get((name, tag)) if tag is not None else None
    return WEIGHTS_DIR / entry[0] if entry else None


class UnknownModel(KeyError):
    """An architecture name neither open_clip nor clipmaps knows; ``str(e)`` suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0])


@functools.lru_cache(maxsize=1)
def _config_files() -> dict[str, Path]:
    """Architecture name → its JSON config: open_clip's (located without importing open_clip), then clipmaps'."""
    files: dict[str, Path] = {}
    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        for path in sorted((Path(location) / "model_configs").glob("*.json")):
            files[path.stem] = path
    for path in sorted(_BUNDLED_CONFIGS.glob("*.json")):
        files[path.stem] = path
    return files


def list_model_names() -> list[str]:
    """Every architecture name :func:`model_info` knows, sorted."""
    return sorted(_config_files())


@functools.lru_cache(maxsize=256)
def model_info(name: str) -> ModelInfo:
    """What the configuration of architecture ``name`` says (no weights, no torch).

    Raises:
        UnknownModel: ``name`` is not an open_clip or clipmaps architecture (with a "did you mean").
    """
    path = _config_files().get(name)
    if path is None:
        close = difflib.get_close_matches(name, list(_config_files()), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise UnknownModel(f"unknown model {name!r}{hint}; `clipmaps models` lists the architectures")
    cfg = json.loads(path.read_text())
    vision = cfg.get("vision_cfg", {})
    layers = vision.get("layers")
    patch_size = vision.get("patch_size")
    if vision.get("timm_model_name"):
        timm_name = str(vision["timm_model_name"]).lower()
        # SigLIP = a SigLIP trunk with its attention-pooling ("map") head, what LeGrad's gradient is taken through
        family = "siglip" if "siglip" in timm_name and vision.get("timm_pool") == "map" else "timm"
        layers = None
        # timm names carry the patch (vit_base_patch16_siglip_224): enough for the spec's size check
        found = re.search(r"patch(\d+)", timm_name)
        patch_size = int(found.group(1)) if family == "siglip" and found else None
        size = re.match(r"vit_([a-z0-9]+)_patch", timm_name)
        layers = _SIGLIP_DEPTH.get(size.group(1)) if family == "siglip" and size else None
    elif isinstance(layers, (list, tuple)):
        family, layers = "resnet", None
    elif "multimodal_cfg" in cfg and vision.get("attentional_pool"):
        # CoCa's attentional pooler; a CoCa config without one (coca_base) has a plain CLIP ViT image tower
        family = "coca"
    else:
        family = "vit"
    image_size = vision.get("image_size")
    return ModelInfo(
        name=name,
        family=family,
        layers=int(layers) if isinstance(layers, int) else None,
        patch_size=patch_size if family in ("vit", "coca", "siglip") else None,
        image_size=image_size[0] if isinstance(image_size, (list, tuple)) else image_size,
        embed_dim=cfg.get("embed_dim"),
        # open_clip's CLIPTextCfg default when a config does not say (every OpenAI-style text tower: 77)
        context_length=int(cfg.get("text_cfg", {}).get("context_length", 77)),
    )


def supported_methods(info: ModelInfo) -> list[str]:
    """Names of the methods (spec keys) that run on this model's backbone family."""
    return [m for m in METHODS if info.family in REGISTRY[m].families]
