"""Image and mask preprocessing per method, with numpy and Pillow only (usable in CPU decode tasks).

* GEM, LeGrad, MaskInversion (upstream ``get_gem_img_transform`` / ``LePreprocess``): square bicubic resize to
  ``size × size`` (aspect ratio not kept), scale to [0, 1], normalise with OpenAI CLIP's mean/std.
* MaskCLIP (original mmseg pipeline): keep-ratio resize so the short side is ``size`` (512) and the long side
  at most ``max_long_side`` (2048), ImageNet mean/std (an upstream quirk kept as the default; ``mean``/``std``
  can be set to CLIP's). The original resizes with OpenCV's bilinear; Pillow's bilinear here antialiases when
  shrinking, a deliberate small difference.

Arrays are ``float32 [3, h, w]`` (channels first), masks ``float32 [h, w]`` in [0, 1]. Runs in the CPU decode stage
(``clipmaps.pipeline.decode``); training and evaluation use the same code so that their inputs match the pipeline's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
#: Mean and std per ``normalize`` name of :meth:`Preprocess.from_params`.
NORMALIZATIONS = {
    "clip": (OPENAI_MEAN, OPENAI_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    # SigLIP's (open_clip's INCEPTION_MEAN/STD): [0, 1] → [-1, 1]
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass(frozen=True)
class Preprocess:
    """How one method wants its input.

    Attributes:
        size: square side (``mode="square"``) or short side (``mode="short_side"``) in pixels.
        mode: ``"square"`` or ``"short_side"``.
        mean, std: per-channel normalisation of [0, 1] values.
        resample: ``"bicubic"`` or ``"bilinear"``.
        max_long_side: cap on the long side for ``short_side``.
    """

    size: int = 448
    mode: str = "square"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resample: str = "bicubic"
    max_long_side: int = 2048

    def __post_init__(self):
        if self.mode not in ("square", "short_side"):
            raise ValueError(f"preprocess mode must be 'square' or 'short_side', got {self.mode!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if self.size < 1 or self.max_long_side < self.size:
            raise ValueError(f"invalid sizes: size={self.size}, max_long_side={self.max_long_side}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Preprocess:
        """The preprocessing a method registry entry describes as data: ``mode``, ``size``, ``resample``,
        ``normalize`` (a :data:`NORMALIZATIONS` name: ``clip``, ``imagenet``, ``inception``) and, for
        ``short_side``, ``max_long_side``.

        Raises:
            ValueError: an unknown ``normalize``, mode, resampling or invalid sizes.
        """
        values = dict(params)
        normalize = values.pop("normalize", "clip")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got {normalize!r}")
        mean, std = NORMALIZATIONS[normalize]
        return cls(**values, mean=mean, std=std)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after resizing an image of ``width × height``."""
        if self.mode == "square":
            return self.size, self.size
        scale = min(self.size / min(width, height), self.max_long_side / max(width, height))
        return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))

    def image(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image → normalised ``float32 [3, h, w]``."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.target_size(*image.size)
        if size != image.size:
            image = image.resize(size, _RESAMPLE[self.resample])
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def mask(self, mask: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """Binary or soft mask ``[H, W]`` at the original image size → ``float32 [h, w]`` at the model input size,
        bilinear (soft edges in [0, 1]).

        Args:
            mask: bool/uint8/float array ``[H, W]``; uint8 is read as 0–255 (> 1 anywhere) or 0/1.
            image_size: ``(width, height)`` of the original image, which the mask must match.
        """
        if mask.ndim != 2:
            raise ValueError(f"a mask must be 2-D [H, W], got shape {mask.shape}")
        width, height = image_size
        if mask.shape != (height, width):
            raise ValueError(
                f"mask of size {mask.shape[1]}x{mask.shape[0]} does not match the image ({width}x{height})"
            )
        m = mask.astype(np.float32)
        if m.max(initial=0) > 1:
            m /= 255.0
        pil = Image.fromarray(m)  # float32 → mode "F"
        size = self.target_size(width, height)
        if size != (width, height):
            pil = pil.resize(size, Image.Resampling.BILINEAR)
        return np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0)


def default_preprocess(method: str) -> Preprocess:
    """``method``'s preprocessing with its default settings, as its method registry entry describes it (upstream's
    defaults: GEM, LeGrad, MaskInversion square 448 px; MaskCLIP short side 512, ImageNet mean/std)."""
    from clipmaps.actors.registry import REGISTRY

    entry = REGISTRY[method]
    return Preprocess.from_params(entry.preprocess(entry.settings()))
