"""Synthetic scenes with exact ground truth: coloured, textured shapes on a textured background.

One generator serves the tiny CLIP's training (``jobs.train``), the demo, the evaluation (``jobs.evaluate``) and the
tests; no photos are shipped. A scene is first drawn as a resolution-free :class:`SceneSpec` (positions and sizes
relative to the image), then rendered at any size, so the 64 px training images and the 320×240 demo images come
from the same distribution. Everything is a function of the seed.

Class names are ``"<colour> <shape>"`` (``CLASSES``, 18 of them); textures, sizes, rotations and the background are
nuisances that captions never mention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 170),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
TEXTURES = ("solid", "stripes", "dots")
BACKGROUND_CAPTIONS = ("background", "an empty background", "nothing")
TEMPLATES = ("{}", "a photo of {}", "an image of {}", "there is {}")


@dataclass(frozen=True)
class ObjectSpec:
    """One shape. ``cx``/``cy`` are fractions of the width/height, ``radius`` a fraction of ``min(w, h)``,
    ``angle`` in radians; ``texture`` is one of ``TEXTURES``."""

    colour: str
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    texture: str
    shade: float  # brightness jitter of the fill, multiplies the colour

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """A resolution-free scene: objects back to front and background parameters."""

    objects: tuple[ObjectSpec, ...]
    base: tuple[float, float, float]  # background mean colour (greyish, so it never reads as a class colour)
    gradient: tuple[float, float, float]
    pattern: str  # plain | stripes | checker
    pattern_period: float  # fraction of min(w, h)
    noise: float
    noise_seed: int


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: RGB PIL image, ``size=(w, h)``.
        masks: ``bool [M, H, W]``, the visible pixels of each object (occlusion applied), back to front.
        names: ``M`` class names such as ``"red circle"`` (index into ``CLASSES`` with ``class_index``).
        label_map: ``uint8 [H, W]``: 0 background, ``CLASSES.index(name) + 1`` on each object's visible pixels.
        caption: a caption naming every object, e.g. ``"a red circle and a blue square"``.
        spec: the :class:`SceneSpec` it was rendered from.
    """

    image: Image.Image
    masks: np.ndarray
    names: list[str]
    label_map: np.ndarray
    caption: str
    spec: SceneSpec


def class_index(name: str) -> int:
    """Index of ``name`` in ``CLASSES``; its label in label maps is this plus one."""
    return CLASSES.index(name)


def sample_spec(
    rng: np.random.Generator, *, objects: int | None = None, max_objects: int = 3, distinct: bool = True
) -> SceneSpec:
    """Draw a scene: ``objects`` shapes (default 1..``max_objects``), each of a different class when ``distinct``.

    Shapes are placed so every one keeps most of its area visible (a bounded number of tries, then the last draw
    stands). ``objects=0`` gives an empty background scene.
    """
    n = int(rng.integers(1, max_objects + 1)) if objects is None else objects
    classes = rng.choice(len(CLASSES), size=n, replace=not distinct)
    placed: list[ObjectSpec] = []
    for k in classes:
        colour, shape = CLASSES[k].split(" ")
        for _ in range(20):
            radius = float(rng.uniform(0.13, 0.27))
            obj = ObjectSpec(
                colour=colour,
                shape=shape,
                cx=float(rng.uniform(0.15, 0.85)),
                cy=float(rng.uniform(0.15, 0.85)),
                radius=radius,
                angle=float(rng.uniform(0, 2 * np.pi)),
                texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
                shade=float(rng.uniform(0.8, 1.1)),
            )
            if all(_apart(obj, other) for other in placed):
                break
        placed.append(obj)
    grey = float(rng.uniform(70, 190))
    base = tuple(float(grey + d) for d in rng.uniform(-18, 18, 3))
    return SceneSpec(
        objects=tuple(placed),
        base=base,  # type: ignore[arg-type]
        gradient=tuple(float(v) for v in rng.uniform(-35, 35, 3)),  # type: ignore[arg-type]
        pattern=("plain", "stripes", "checker")[int(rng.integers(3))],
        pattern_period=float(rng.uniform(0.05, 0.2)),
        noise=float(rng.uniform(2, 10)),
        noise_seed=int(rng.integers(2**31)),
    )


def _apart(a: ObjectSpec, b: ObjectSpec) -> bool:
    """Centres far enough apart (in units of the shorter side, assuming a square image) for little overlap."""
    return float(np.hypot(a.cx - b.cx, a.cy - b.cy)) > 0.8 * (a.radius + b.radius)


def render(spec: SceneSpec, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``spec`` at ``size=(w, h)``: returns ``(uint8 [H, W, 3] image, int16 [H, W] object index map)``, where
    the index map holds ``k + 1`` on the visible pixels of ``spec.objects[k]`` and 0 on the background. Pixels are
    sampled at their centres, so masks are exact for the image they come with."""
    w, h = size
    s = float(min(w, h))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    image = _background(spec, xx, yy, w, h, s)
    index = np.zeros((h, w), np.int16)
    for k, obj in enumerate(spec.objects):
        u, v = _local(obj, xx, yy, w, h, s)
        r = obj.radius * s
        inside = _inside(obj.shape, u, v, r)
        fill = np.asarray(COLOURS[obj.colour], np.float32) * obj.shade
        if obj.texture == "stripes":
            fill = fill * np.where((np.floor(u / max(r * 0.35, 1.0)) % 2 == 0), 1.0, 0.72)[..., None]
        elif obj.texture == "dots":
            period = max(r * 0.45, 1.5)
            dot = (np.mod(u, period) - period / 2) ** 2 + (np.mod(v, period) - period / 2) ** 2 < (period * 0.3) ** 2
            fill = fill * np.where(dot, 0.7, 1.0)[..., None]
        image = np.where(inside[..., None], np.broadcast_to(fill, image.shape), image)
        index[inside] = k + 1
    return np.clip(image, 0, 255).astype(np.uint8), index


def _background(spec: SceneSpec, xx, yy, w: int, h: int, s: float) -> np.ndarray:
    image = (
        np.asarray(spec.base, np.float32) + np.asarray(spec.gradient, np.float32) * ((xx / w + yy / h - 1.0)[..., None])
    )
    period = max(spec.pattern_period * s, 2.0)
    if spec.pattern == "stripes":
        image = image + 10.0 * np.where(np.floor((xx + yy) / period) % 2 == 0, 1.0, -1.0)[..., None]
    elif spec.pattern == "checker":
        image = image + 8.0 * np.where((np.floor(xx / period) + np.floor(yy / period)) % 2 == 0, 1.0, -1.0)[..., None]
    noise = np.random.default_rng(spec.noise_seed).normal(0, spec.noise, image.shape).astype(np.float32)
    return image + noise


def _local(obj: ObjectSpec, xx, yy, w: int, h: int, s: float):
    dx, dy = xx - obj.cx * w, yy - obj.cy * h
    c, n = np.cos(obj.angle), np.sin(obj.angle)
    return c * dx + n * dy, -n * dx + c * dy


_TRIANGLE_NORMALS = ((0.0, 1.0), (-0.8660254, -0.5), (0.8660254, -0.5))


def _inside(shape: str, u, v, r: float) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        half = 0.82 * r  # about the circle's area
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":  # equilateral, circumradius 1.2 r (about the circle's area)
        inside = np.ones(u.shape, bool)
        for nu, nv in _TRIANGLE_NORMALS:
            inside &= nu * u + nv * v <= 0.6 * r
        return inside
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def caption_for(names: list[str], rng: np.random.Generator | None = None) -> str:
    """A caption naming ``names`` in order, e.g. ``"a red circle and a blue square"``; a random template when
    ``rng`` is given, else the plain ``"a …"`` form. No names → a background caption."""
    if not names:
        return BACKGROUND_CAPTIONS[int(rng.integers(len(BACKGROUND_CAPTIONS)))] if rng is not None else "background"
    phrase = " and ".join(f"a {n}" for n in names)
    if rng is None:
        return phrase
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(phrase) + ("." if rng.random() < 0.5 else "")


def render_scene(spec: SceneSpec, size: tuple[int, int] = (320, 240)) -> Scene:
    """Render ``spec`` with its masks, label map and caption. Objects hidden entirely by others are left out."""
    pixels, index = render(spec, size)
    masks, names = [], []
    label_map = np.zeros(index.shape, np.uint8)
    for k, obj in enumerate(spec.objects):
        mask = index == k + 1
        if mask.any():
            masks.append(mask)
            names.append(obj.name)
            label_map[mask] = class_index(obj.name) + 1
    stacked = np.stack(masks) if masks else np.zeros((0, *index.shape), bool)
    return Scene(
        image=Image.fromarray(pixels),
        masks=stacked,
        names=names,
        label_map=label_map,
        caption=caption_for(names),
        spec=spec,
    )


def make_scene(seed: int, *, size: tuple[int, int] = (320, 240), objects: int = 3) -> Scene:
    """Scene number ``seed``: ``objects`` shapes of distinct classes at ``size=(w, h)``. Deterministic."""
    return render_scene(sample_spec(np.random.default_rng(seed), objects=objects), size)
