"""Model loading in one place: open_clip names, pretrained tags, weight files and URIs.

Weights are only ever read safely: safetensors, or ``torch.load(weights_only=True)``.
The small test architectures in ``model_configs/`` are registered with open_clip on import.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import redact_text, redact_uri

from .registry import BUNDLED_WEIGHTS, bundled_weights

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Register clipmaps' own architectures (``clipmaps-tiny-vit``, ``clipmaps-tiny-rn``) with open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


register_model_configs()


@dataclass(frozen=True)
class LoadedModel:
    """A CLIP model ready for inference, and where its weights came from.

    Attributes:
        model: the open_clip ``CLIP``/``CustomTextCLIP`` in eval mode, parameters frozen.
        tokenizer: callable ``list[str] -> LongTensor [n, context_length]``.
        name: open_clip architecture name, e.g. ``"ViT-B-16"``.
        weights: the pretrained tag, the weight URI, or ``"random:seed=N"``; recorded in outputs.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    weights: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def list_models() -> list[str]:
    """Every open_clip architecture name known here (including clipmaps' test configs)."""
    return open_clip.list_models()


def list_pretrained() -> list[tuple[str, str]]:
    """``(architecture, pretrained tag)`` pairs: clipmaps' bundled weights (offline), then those open_clip can
    download where a hub is reachable."""
    return [*BUNDLED_WEIGHTS, *open_clip.list_pretrained()]


def load_model(
    name: str,
    *,
    pretrained: str | None = None,
    weights: str | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
    weights_sha256: str | None = None,
) -> LoadedModel:
    """Build an open_clip model and load its weights.

    Exactly one weight source must be given:

    * ``pretrained``: a pretrained tag: clipmaps' bundled weights (``BUNDLED_WEIGHTS``, e.g.
      ``("clipmaps-synth-vit", "synth-shapes-v1")``, read from the package) or an open_clip tag (``"openai"``,
      ``"laion2b_s34b_b88k"``…), downloaded by open_clip;
    * ``weights``: a local path or fsspec URI (``s3://bucket/ViT-B-16.safetensors``) of a state dict, read as
      safetensors or with ``torch.load(weights_only=True)``; URIs are downloaded once per node into the weights
      cache (``clipmaps.actors.weights_cache``) and checked against ``weights_sha256`` or a ``<uri>.sha256``
      sidecar;
    * ``seed``: seeded random initialisation (tests, demos, benchmarks).

    Returns a :class:`LoadedModel` in eval mode with ``requires_grad=False`` on every parameter, in fp32.
    """
    sources = [s for s in (pretrained, weights, seed) if s is not None]
    if len(sources) != 1:
        raise ValueError(
            f"load_model({name!r}) needs exactly one of pretrained=, weights= or seed= "
            f"(got pretrained={pretrained!r}, weights={weights!r}, seed={seed!r})"
        )
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; see clipmaps.actors.models.list_models() for the names on offer")

    bundled = bundled_weights(name, pretrained)
    if bundled is not None:
        model = open_clip.create_model(name, pretrained=None, device="cpu")
        _load_strict(model, read_state_dict(str(bundled), sha256=BUNDLED_WEIGHTS[(name, pretrained)][1]), str(bundled))
        model = model.to(device)
        source = pretrained
    elif pretrained is not None:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
        source = pretrained
    else:
        if seed is not None:
            torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, device="cpu")
        source = f"random:seed={seed}"
        if weights is not None:
            state = read_state_dict(weights, storage_options=storage_options, sha256=weights_sha256)
            source = redact_uri(weights)  # recorded in outputs and logs: never with credentials
            _load_strict(model, state, source)
        model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    logger.info("loaded %s (%s) on %s", name, source, device)
    return LoadedModel(model=model, tokenizer=open_clip.get_tokenizer(name), name=name, weights=source)


def read_state_dict(
    uri: str, *, storage_options: dict | None = None, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path or fsspec URI, safely.

    A URI (``s3://…``) is fetched through the per-node weights cache (``cached_weights``: one download per node,
    verified against ``sha256`` or a ``<uri>.sha256`` sidecar); a local path is read in place (and verified the
    same way when a digest is known). ``*.safetensors`` files are parsed by safetensors; anything else goes through
    ``torch.load`` with ``weights_only=True`` (no pickled code runs). A ``{"state_dict": …}`` wrapper is unwrapped.

    Raises:
        ConfigError: the bytes are neither safetensors nor a plain state dict (the message names the URI, redacted).
    """
    from safetensors.torch import load as load_safetensors

    from .weights_cache import cached_weights

    shown = redact_uri(uri)
    data = cached_weights(uri, sha256=sha256, storage_options=storage_options).read_bytes()
    if uri.split("?", 1)[0].endswith(".safetensors"):  # a presigned URL ends in its query
        try:
            return load_safetensors(data)
        except Exception as e:  # noqa: BLE001 - safetensors' own error type: a truncated or foreign file
            raise ConfigError(
                f"model.weights: {shown} is not a valid safetensors file ({type(e).__name__}: {str(e)[:200]})",
                stage="model",
            ) from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refuses anything but tensors and plain containers
        reason = redact_text(str(e), storage_options=storage_options, uris=[uri])[:300]
        raise ConfigError(
            f"model.weights: cannot read {shown}: not a safetensors file or a plain state dict ({reason})",
            stage="model",
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(
            f"model.weights: {shown} holds a {type(state).__name__}, expected a state dict", stage="model"
        )
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConfigError(
            f"model.weights: {uri} does not fit the architecture: {str(e)[:500]}", stage="model"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"model.weights: {uri} does not fit the architecture: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]} (is model.name right?)",
            stage="model",
        )


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state dict as safetensors (contiguous fp32 copies). Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))
    return path


def state_dict_sha256(model: nn.Module) -> str:
    """Hash of every tensor in sorted key order (fp32 bytes); equal hashes mean identical weights."""
    h = hashlib.sha256()
    for _, value in sorted(model.state_dict().items()):
        h.update(value.detach().contiguous().float().cpu().numpy().tobytes())
    return h.hexdigest()
