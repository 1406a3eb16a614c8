"""Parameters of the four methods, with their bounds, in one place (pydantic v2, no torch).

Each method has two classes, one deriving from the other, so that a bound is written once:

* ``<Method>Params``: the hyper-parameters the pure-torch method module takes (``GEM(model, tokenizer,
  GEMParams(depth=7))``), with the upstream defaults.
* ``<Method>Settings``: the method's section of the job spec (``methods.gem``): its params plus the input size, what
  to write and the actor pool. Everything but ``resources`` can change results (:data:`OPERATIONAL_FIELDS`).

Bounds that depend on the model (layer counts, patch size) are checked by :meth:`MethodParams.model_problems`
against a :class:`ModelInfo` read from the model's configuration without loading weights
(``clipmaps.actors.registry.model_info``), at spec time and again when a method module is built.

Imports pydantic and the standard library only: the driver, the CLI and the workers all read it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from clipmaps.schemas.storage import redact_uri

#: Template-set names ``clipmaps.actors.text.TEMPLATE_SETS`` resolves (its contents need open_clip, so not here).
TEMPLATE_SET_NAMES: tuple[str, ...] = ("photo", "raw", "ensemble85")
#: Settings fields that never change results (pool sizes, placement); every other field is fingerprinted.
OPERATIONAL_FIELDS = frozenset({"resources"})

Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Templates = str | tuple[Str, ...]
PromptSource = Literal["auto", "vocabulary", "manifest"]


class Problems(ValueError):
    """Several ``(relative path, reason)`` problems found by one validator; the spec loader expands them into one
    ``SpecError`` line each, with the path of the validated section prepended."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]):
        self.problems = problems
        super().__init__("; ".join(reason for _, reason in problems))


def check(problems: list[tuple[tuple[str, ...], str]]) -> None:
    if problems:
        raise Problems(problems)


def template_problems(templates: str | tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
    """Why ``templates`` is neither a template-set name nor a list of ``{}`` templates, as ``[(path, reason)]``
    (path ``("[i]",)`` for the i-th template); empty when it is fine. Every template must contain exactly one ``{}``
    (filled with ``str.format``) and no other braces."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SET_NAMES:
            return [((), f"unknown template set {templates!r}; use one of {', '.join(TEMPLATE_SET_NAMES)} or a list")]
        return []
    if len(templates) == 0:
        return [((), "the template list must not be empty")]
    problems = []
    for i, t in enumerate(templates):
        rest = t.replace("{}", "", 1)
        if t.count("{}") != 1 or "{" in rest or "}" in rest:
            problems.append(
                ((f"[{i}]",), f"template {t!r} must contain exactly one '{{}}' placeholder and no other braces")
            )
    return problems


@dataclass(frozen=True)
class ModelInfo:
    """What a model's configuration says about its image tower and its text context (read without weights).

    Attributes:
        name: open_clip architecture name.
        family: ``"vit"`` (CLIP ViT), ``"resnet"`` (CLIP ModifiedResNet), ``"siglip"`` (timm tower with an
            attention-pooling head), ``"coca"`` (CoCa's attentional pooler), or ``"timm"`` (another timm tower).
        layers: transformer blocks of the image tower (CLIP ViT, CoCa, SigLIP's timm trunk); ``None`` for ResNets
            and other timm towers.
        patch_size: patch size in pixels (ViT, CoCa, SigLIP); ``None`` where there is none.
        image_size: the pretraining input side in pixels.
        embed_dim: dimension of the joint embedding space.
        context_length: token positions of the text tower (start and end tokens included); longer text is refused,
            never cut (``clipmaps.actors.text.check_fits``).
    """

    name: str
    family: str
    layers: int | None = None
    patch_size: int | None = None
    image_size: int | None = None
    embed_dim: int | None = None
    context_length: int | None = None


class Section(BaseModel):
    """Base of every spec section: unknown keys refused, immutable, validated on assignment-free construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolSpec(Section):
    """The actor pool of one method (``map_batches(..., compute=ActorPoolStrategy(min_size, max_size))``).

    Attributes:
        batch_size: images per batch handed to an actor.
        num_gpus: GPUs reserved per actor (0 = CPU actors; 1, or a fraction below 1 to share one).
        num_cpus: CPUs reserved per actor. The small default lets all four pools start beside the decode tasks on a
            2-core machine (pools that reserve every CPU starve the read stage and the job hangs).
        min_actors, max_actors: pool size bounds (autoscaling between them).
        custom_resources: Ray custom resources each actor reserves, e.g. ``{accelerator_node: 1}``.
        torch_threads: torch CPU threads per actor; null = Ray's ``OMP_NUM_THREADS`` (``floor(num_cpus)``, at
            least 1). Measured: a CPU pool on a fraction of a CPU ran at 0.57x a bare loop with one thread.
        memory: host memory each actor reserves with Ray's scheduler (bytes, or a size such as ``"2GiB"``; Ray's
            ``memory`` resource); null reserves none. Set it on shared clusters so that Ray does not place more
            actors on a node than its memory holds; Ray Data's high-memory warning suggests a value from what the
            actors used (README, "What a run prints").
    """

    batch_size: Int = Field(8, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.25, ge=0)
    min_actors: Int = Field(1, ge=1)
    max_actors: Int = Field(1, ge=1)
    custom_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    torch_threads: Int | None = Field(None, ge=1)
    memory: ByteSize | None = Field(None, gt=0)

    @field_validator("num_gpus")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"a fraction of a GPU must be below 1 (Ray), got {v}")
        return v

    @field_validator("custom_resources")
    @classmethod
    def _not_builtin(cls, v: dict[str, float]) -> dict[str, float]:
        for name in v:
            if name in ("CPU", "GPU", "memory"):
                raise ValueError(f"{name!r}: use num_cpus / num_gpus / memory instead")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> PoolSpec:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors {self.min_actors} is more than max_actors {self.max_actors}")
        return self


class ModelSpec(Section):
    """The CLIP model and its weights: exactly one of ``pretrained``, ``weights`` and ``seed``.

    Attributes:
        name: open_clip architecture (``clipmaps models`` lists them and what runs on each), e.g. ``ViT-B-16``.
        pretrained: a pretrained tag: clipmaps' shipped weights (``synth-shapes-v1`` for ``clipmaps-synth-vit``) or
            an open_clip tag (``openai``…), downloaded by open_clip (needs hub access).
        weights: path or URI of a state dict (safetensors, or a plain ``torch.save`` state dict), downloaded once
            per node (``$CLIPMAPS_CACHE``) and verified against ``weights_sha256`` or a ``<uri>.sha256`` file.
        weights_sha256: expected sha256 (64 hex digits) of the ``weights`` file.
        seed: seeded random initialisation (demos and tests: the maps are noise).
        storage_options: fsspec options for reading ``weights``. Redacted wherever the spec is written.
        precision: ``fp32``, or ``bf16`` (autocast on the GPU; every pool must then reserve a GPU).
        device: ``auto`` (CUDA where the actor has a GPU, else CPU), ``cpu`` or ``cuda``.
        compile: run the methods' hot paths through ``torch.compile`` (each actor compiles on its first batches;
            operational, not fingerprinted: results move only by float rounding).
    """

    name: Str = Field("ViT-B-16", min_length=1)
    pretrained: Str | None = Field(None, min_length=1)
    weights: Str | None = Field(None, min_length=1)
    weights_sha256: Str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    seed: Int | None = Field(None, ge=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        problems = []
        given = [k for k in ("pretrained", "weights", "seed") if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none given" if not given else " and ".join(given) + " given"
            problems.append(((), f"give exactly one of pretrained, weights (a path or URI) or seed; {what}"))
        if self.weights_sha256 is not None and self.weights is None:
            problems.append((("weights_sha256",), "is only used with weights (a path or URI)"))
        if self.precision == "bf16" and self.device == "cpu":
            problems.append((("precision",), "bf16 is autocast on the GPU; it cannot be used with device: cpu"))
        check(problems)
        return self

    @property
    def info(self) -> ModelInfo:
        """The architecture's configuration (``clipmaps.actors.registry.model_info``; ``UnknownModel`` if none)."""
        from .registry import model_info

        return model_info(self.name)

    @property
    def weights_id(self) -> str:
        """Where the weights come from, as every output row records it: the pretrained tag, the weights URI
        (credentials redacted) or ``random:seed=N``."""
        if self.pretrained is not None:
            return self.pretrained
        if self.weights is not None:
            return redact_uri(self.weights)
        return f"random:seed={self.seed}"


class MethodParams(Section):
    """Base of the ``<Method>Params`` classes."""

    def model_problems(self, info: ModelInfo) -> list[tuple[str, str]]:
        """``[(field, reason)]`` for bounds that depend on the model's configuration; empty when all hold."""
        return []

    def check_model(self, info: ModelInfo) -> None:
        """Raise ``ValueError`` naming the first problem of :meth:`model_problems` (for the method modules)."""
        problems = self.model_problems(info)
        if problems:
            name, reason = problems[0]
            raise ValueError(f"{name}: {reason}")

    @field_validator("templates", check_fields=False)
    @classmethod
    def _templates(cls, v):
        if v is not None:
            check(template_problems(v))
        return v


def _layers_problem(name: str, value: int, low: int, high: int | None, what: str) -> list[tuple[str, str]]:
    if high is not None and not low <= value <= high:
        return [(name, f"{value} is out of range for {what}: must be in [{low}, {high}]")]
    return []


class GEMParams(MethodParams):
    """GEM hyper-parameters, upstream defaults (``gem/gem_wrapper.py``, ``create_gem_model``).

    Attributes:
        depth: the last ``depth - 1`` blocks get the self-self attention path (7 ⇒ 6 blocks); at most layers + 1.
        ss_attn_iter: refinement iterations of each branch before the assignment to v.
        ss_attn_temp: fixed *inverse* temperature multiplying the cosine logits (upstream's name); null uses the
            per-image ``mean_i ||ln_1(x)_i|| / sqrt(head_dim)`` as upstream.
        templates: prompt templates, a set name or a list; null = the vocabulary's in a job, GEM's single
            ``"a photo of a {}."`` in the method module.
    """

    depth: Int = Field(7, ge=2)
    ss_attn_iter: Int = Field(1, ge=0)
    ss_attn_temp: float | None = Field(None, gt=0)
    templates: Templates | None = None

    def model_problems(self, info: ModelInfo) -> list[tuple[str, str]]:
        layers = info.layers
        return _layers_problem("depth", self.depth, 2, None if layers is None else layers + 1, _tower(info))


class MaskCLIPParams(MethodParams):
    """MaskCLIP hyper-parameters, defaults of the original MaskCLIP configs.

    Attributes:
        templates: prompt templates; the original's prompt engineering uses the 85-template ensemble.
        ks_thresh: key-smoothing confidence threshold in [0, 1] (0 = off; MaskCLIP+ configs use 1.0).
        pd_thresh: prompt-denoising threshold in [0, 1] (0 = off; MaskCLIP+ configs use 0.5).
    """

    templates: Templates | None = "ensemble85"
    ks_thresh: float = Field(0.0, ge=0, le=1)
    pd_thresh: float = Field(0.0, ge=0, le=1)


class LeGradParams(MethodParams):
    """LeGrad hyper-parameters.

    Attributes:
        layers: how many of the last blocks contribute (upstream ``layer_index=-2`` ⇒ 2; the paper uses all).
        templates: prompt templates (upstream's README encodes the raw prompt: ``"{}"``).
    """

    layers: Int = Field(2, ge=1)
    templates: Templates | None = "raw"

    def model_problems(self, info: ModelInfo) -> list[tuple[str, str]]:
        return _layers_problem("layers", self.layers, 1, info.layers, _tower(info))


OptimizerName = Literal["adamw", "adam", "sgd"]
OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "adam", "sgd")


def _check_optimizer_name(name: str) -> None:
    """``ValueError`` naming the optimisers on offer (and the closest) unless ``name`` is one of them."""
    if name not in OPTIMIZER_NAMES:
        close = difflib.get_close_matches(name.lower(), OPTIMIZER_NAMES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint}; use one of {', '.join(OPTIMIZER_NAMES)}")


class OptimizerSettings(Section):
    """MaskInversion's optimiser with its own settings (upstream accepts any ``torch.optim`` class); fields left
    unset keep torch's defaults (AdamW/Adam: betas (0.9, 0.999), eps 1e-8, as upstream).

    Attributes:
        name: ``adamw``, ``adam`` or ``sgd``.
        betas: Adam(W)'s ``(beta1, beta2)``, each in [0, 1).
        eps: Adam(W)'s denominator term, > 0.
        weight_decay: >= 0; give it here or as ``wd``, not both.
        momentum: SGD's momentum, in [0, 1).
        nesterov: SGD's Nesterov momentum (needs momentum > 0).
    """

    name: Str
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] | None = None
    eps: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    nesterov: Bool | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        _check_optimizer_name(v)
        return v

    @model_validator(mode="after")
    def _fields_of_the_optimizer(self) -> OptimizerSettings:
        adam_only = [f for f in ("betas", "eps") if getattr(self, f) is not None]
        sgd_only = [f for f in ("momentum", "nesterov") if getattr(self, f) is not None]
        problems = []
        if self.name == "sgd" and adam_only:
            problems.append(((adam_only[0],), f"{self.name} takes no {adam_only[0]} (Adam/AdamW only)"))
        if self.name != "sgd" and sgd_only:
            problems.append(((sgd_only[0],), f"{self.name} takes no {sgd_only[0]} (SGD only)"))
        if self.nesterov and not self.momentum:
            problems.append((("nesterov",), "Nesterov momentum needs momentum > 0"))
        check(problems)
        return self

    def torch_kwargs(self) -> dict[str, Any]:
        """The fields that are set, as keyword arguments of the ``torch.optim`` class (``name`` excluded)."""
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}


class MaskInversionParams(MethodParams):
    """MaskInversion hyper-parameters, upstream defaults (``MaskInversion.__init__``).

    Attributes:
        iterations: optimisation steps.
        lr: learning rate (upstream's example uses 0.5; the class default is 0.1).
        alpha: weight of the regulariser ``1 - cos(e0, embedding)``.
        wd: weight decay passed to the optimiser.
        optimizer: ``"adamw"`` (upstream), ``"adam"`` or ``"sgd"``, or :class:`OptimizerSettings` with the
            optimiser's own fields (``{name: adamw, betas: [0.9, 0.999], eps: 1.0e-8}``); fingerprinted as given.
        layers: how many of the last blocks form the explainability map (upstream ``layer_index=-1`` ⇒ 1).
    """

    iterations: Int = Field(10, ge=0)
    lr: float = Field(0.1, gt=0)
    alpha: float = Field(0.0, ge=0)
    wd: float = Field(0.0, ge=0)
    optimizer: OptimizerName | OptimizerSettings = "adamw"
    layers: Int = Field(1, ge=1)

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_name(cls, v):
        if isinstance(v, str):
            _check_optimizer_name(v)
        elif isinstance(v, dict):  # validated here so an error names the field, not both union members
            try:
                return OptimizerSettings(**v)
            except ValidationError as e:
                reasons = "; ".join(
                    f"{'.'.join(str(x) for x in err['loc']) or 'optimizer'}: {err['msg'].removeprefix('Value error, ')}"
                    for err in e.errors()
                )
                raise ValueError(reasons) from None
        return v

    @model_validator(mode="after")
    def _decay_once(self) -> MaskInversionParams:
        if isinstance(self.optimizer, OptimizerSettings) and self.optimizer.weight_decay is not None and self.wd:
            raise ValueError(
                f"weight decay given twice (wd: {self.wd}, optimizer.weight_decay: {self.optimizer.weight_decay}); "
                "give it in one place"
            )
        return self

    def model_problems(self, info: ModelInfo) -> list[tuple[str, str]]:
        return _layers_problem("layers", self.layers, 1, info.layers, _tower(info))


def _tower(info: ModelInfo) -> str:
    return f"the {info.layers}-layer image tower of {info.name}"


# ------------------------------------------------------------------------------------------------ spec sections


class _Square:
    """Mixin: a square input whose side must be a multiple of the patch size."""

    def size_problems(self, info: ModelInfo) -> list[tuple[str, str]]:
        patch = info.patch_size
        if patch and self.size % patch:
            return [("size", f"{self.size} is not a multiple of the patch size {patch} of {info.name}")]
        return []


class GEMSettings(_Square, GEMParams):
    """``methods.gem``: label maps over the vocabulary and per-prompt heatmaps.

    Attributes:
        size: square input side in pixels (a multiple of the patch size).
        labels: write label maps (needs a vocabulary).
        heatmaps: write per-prompt heatmaps.
        prompts: heatmap prompts: ``manifest`` (each row's ``prompts``), ``vocabulary`` (every class name) or
            ``auto`` (the manifest's when it has a ``prompts`` column, else the vocabulary).
        original: also write the unmodified model's maps as method ``gem_original`` (upstream ``return_ori``).
        resources: the actor pool.
    """

    size: Int = Field(448, ge=1)
    labels: Bool = True
    heatmaps: Bool = True
    prompts: PromptSource = "auto"
    original: Bool = False
    resources: PoolSpec = Field(default_factory=PoolSpec)

    @model_validator(mode="after")
    def _writes_something(self) -> GEMSettings:
        if not (self.labels or self.heatmaps):
            raise ValueError("labels and heatmaps are both false: GEM has nothing to write")
        return self

    def model_problems(self, info: ModelInfo) -> list[tuple[str, str]]:
        return super().model_problems(info) + self.size_problems(info)


class MaskCLIPSettings(MaskCLIPParams):
    """``methods.maskclip``: label maps over the vocabulary (ViT and ResNet models).

    Attributes:
        size: short side of the input in pixels (aspect ratio kept), long side at most ``max_long_side``.
        normalize: ``imagenet`` (the original's mean/std, an upstream quirk) or ``clip``.
        labels: MaskCLIP writes only label maps, so this must stay true.
        resources: the actor pool.
    """

    size: Int = Field(512, ge=1)
    max_long_side: Int = Field(2048, ge=1)
    normalize: Literal["imagenet", "clip"] = "imagenet"
    labels: Bool = True
    resources: PoolSpec = Field(default_factory=PoolSpec)

    @property
    def heatmaps(self) -> bool:
        return False

    @model_validator(mode="after")
    def _consistent(self) -> MaskCLIPSettings:
        if self.max_long_side < self.size:
            raise ValueError(f"max_long_side {self.max_long_side} must be >= size {self.size}")
        if not self.labels:
            raise ValueError("MaskCLIP only writes label maps (labels: false); remove methods.maskclip instead")
        return self


class LeGradSettings(_Square, LeGradParams):
    """``methods.legrad``: per-prompt explainability heatmaps.

    Attributes:
        size: square input side in pixels (a multiple of the patch size).
        prompts: ``manifest``, ``vocabulary`` or ``auto`` (see :class:`GEMSettings`).
        resources: the actor pool.
    """

    size: Int = Field(448, ge=1)
    prompts: PromptSource = "auto"
    resources: PoolSpec = Field(default_factory=PoolSpec)

    @property
    def heatmaps(self) -> bool:
        return True

    @property
    def labels(self) -> bool:
        return False

    def model_problems(self, info: ModelInfo) -> list[tuple[str, str]]:
        return super().model_problems(info) + self.size_problems(info)


class MaskInversionSettings(_Square, MaskInversionParams):
    """``methods.maskinversion``: one embedding per region mask (the manifest needs ``masks``); writes ``regions/``.

    Attributes:
        size: square input side in pixels (a multiple of the patch size).
        resources: the actor pool.
    """

    size: Int = Field(448, ge=1)
    resources: PoolSpec = Field(default_factory=PoolSpec)

    @property
    def heatmaps(self) -> bool:
        return False

    @property
    def labels(self) -> bool:
        return False

    def model_problems(self, info: ModelInfo) -> list[tuple[str, str]]:
        return super().model_problems(info) + self.size_problems(info)


def params_of(settings: MethodParams, params_cls: type[MethodParams], **resolved) -> MethodParams:
    """The ``params_cls`` part of a settings object (its fields only), with ``resolved`` values overriding."""
    values = {name: getattr(settings, name) for name in params_cls.model_fields}
    values.update(resolved)
    return params_cls(**values)
