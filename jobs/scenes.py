"""Synthetic sample scenes with exact ground truth: coloured shapes on a textured background.

Used by the demo and tests (no photos are shipped). Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")


@dataclass
class Scene:
    """An image with one binary mask and one caption per object.

    Attributes:
        image: RGB PIL image.
        masks: ``bool [M, H, W]``.
        names: ``M`` captions such as ``"red circle"``.
    """

    image: Image.Image
    masks: np.ndarray
    names: list[str]


def make_scene(seed: int, *, size: tuple[int, int] = (320, 240), objects: int = 3) -> Scene:
    """Draw ``objects`` non-overlapping-ish shapes of distinct colours on a noisy gradient, ``size=(w, h)``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(90, 170, 3)
    background = base + 40 * np.stack([xx / w, yy / h, 1 - xx / w], -1) + rng.normal(0, 6, (h, w, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colours = rng.choice(list(COLOURS), size=objects, replace=False)
    masks, names = [], []
    for i, colour in enumerate(colours):
        shape = SHAPES[rng.integers(len(SHAPES))]
        r = int(rng.uniform(0.12, 0.2) * min(w, h))
        cx = int((i + 0.5) * w / objects + rng.uniform(-0.05, 0.05) * w)
        cy = int(rng.uniform(0.3, 0.7) * h)
        box = (cx - r, cy - r, cx + r, cy + r)
        mask_img = Image.new("L", (w, h), 0)
        mdraw = ImageDraw.Draw(mask_img)
        for d, fill in ((draw, COLOURS[colour]), (mdraw, 255)):
            if shape == "circle":
                d.ellipse(box, fill=fill)
            elif shape == "square":
                d.rectangle(box, fill=fill)
            else:
                d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        masks.append(np.asarray(mask_img) > 127)
        names.append(f"{colour} {shape}")
    return Scene(image=image, masks=np.stack(masks), names=names)
