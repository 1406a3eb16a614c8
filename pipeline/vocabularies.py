"""Built-in vocabularies (the common benchmark class lists) and helpers for user vocabularies.

The presets are the foreground classes of the usual open-vocabulary segmentation benchmarks, in the benchmarks'
label order (preset class ``c`` gets label ``c + 1`` in label maps; 0 is background), as MaskCLIP's
``available_datasets()`` offers them:

========================  =====  ===================================================================
preset                    count  benchmark
========================  =====  ===================================================================
``voc20``                 20     PASCAL VOC 2012 (without its ``background`` class)
``context59``             59     PASCAL Context, the 59 most frequent classes
``coco80``                80     COCO "things" (detection/instance categories)
``cocostuff171``          171    COCO-Stuff: the 80 things, then the 91 stuff classes
``ade150``                150    ADE20K SceneParsing (the first name of each class's synonym list)
========================  =====  ===================================================================

The names are CLIP prompts, so identifiers are written as words: VOC's ``pottedplant`` is ``potted plant``,
COCO-Stuff's ``wall-brick`` is ``brick wall`` and its ``*-other``/``*-stuff`` suffixes are dropped
(``sky-other`` is ``sky``). Order and count are the benchmarks'.

Imports only the standard library (the driver side loads it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence

VOC20: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip

CONTEXT59: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "potted plant",
    "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table",
    "track", "train", "tree", "truck", "tv monitor", "wall", "water", "window", "wood",
)  # fmt: skip

COCO80: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

#: COCO-Stuff's 91 stuff classes, in label order (official names in comments where they differ).
COCO_STUFF91: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge",
    "building",  # building-other
    "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling",  # ceiling-other
    "ceiling tile",  # ceiling-tile
    "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk",  # desk-stuff
    "dirt",
    "door",  # door-stuff
    "fence",
    "marble floor",  # floor-marble
    "floor",  # floor-other
    "stone floor",  # floor-stone
    "tile floor",  # floor-tile
    "wood floor",  # floor-wood
    "flower", "fog",
    "food",  # food-other
    "fruit",
    "furniture",  # furniture-other
    "grass", "gravel",
    "ground",  # ground-other
    "hill", "house", "leaves", "light", "mat", "metal",
    "mirror",  # mirror-stuff
    "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant",  # plant-other
    "plastic", "platform",
    "playing field",  # playingfield
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky",  # sky-other
    "skyscraper", "snow",
    "solid",  # solid-other
    "stairs", "stone", "straw",
    "structural",  # structural-other
    "table", "tent",
    "textile",  # textile-other
    "towel", "tree", "vegetable",
    "brick wall",  # wall-brick
    "concrete wall",  # wall-concrete
    "wall",  # wall-other
    "panel wall",  # wall-panel
    "stone wall",  # wall-stone
    "tile wall",  # wall-tile
    "wood wall",  # wall-wood
    "water",  # water-other
    "waterdrops",
    "window blind",  # window-blind
    "window",  # window-other
    "wood",
)  # fmt: skip

COCO_STUFF171: tuple[str, ...] = COCO80 + COCO_STUFF91

ADE150: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

#: Preset name → class names (foreground only, label order).
PRESETS: dict[str, tuple[str, ...]] = {
    "voc20": VOC20,
    "context59": CONTEXT59,
    "coco80": COCO80,
    "cocostuff171": COCO_STUFF171,
    "ade150": ADE150,
}

#: Label maps are PNG uint8 or uint16; label 0 is background, so at most 65535 foreground classes.
MAX_CLASSES = 65535

#: Template-set names the actors resolve (``clipmaps.actors.text.TEMPLATE_SETS``; not imported here: it needs torch).
TEMPLATE_SET_NAMES: tuple[str, ...] = ("photo", "raw", "ensemble85")


def preset(name: str) -> tuple[str, ...]:
    """The class names of a built-in vocabulary; ``KeyError`` naming the presets on offer if unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown vocabulary preset {name!r}; presets: {', '.join(PRESETS)}") from None


def parse_vocabulary_file(text: str) -> list[str]:
    """Class names from the text of a vocabulary file: one name per line, surrounding whitespace stripped,
    blank lines and lines starting with ``#`` skipped. Validate the result with :func:`check_names`."""
    names = []
    for line in text.splitlines():
        name = line.strip()
        if name and not name.startswith("#"):
            names.append(name)
    return names


def check_names(names: Sequence[str]) -> tuple[int | None, str] | None:
    """Why ``names`` is not a usable name list, as ``(index or None, reason)``; ``None`` when it is fine.

    The list must be non-empty and hold at most :data:`MAX_CLASSES` names; every name must be a non-empty string
    without surrounding whitespace, and no name may appear twice.
    """
    if len(names) == 0:
        return None, "must not be empty"
    if len(names) > MAX_CLASSES:
        return None, f"{len(names)} names; label maps hold at most {MAX_CLASSES}"
    first: dict[str, int] = {}
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            return i, f"must be a non-empty string, got {n!r}"
        if n != n.strip():
            return i, f"{n!r} has leading or trailing whitespace"
        if n in first:
            return i, f"duplicate name {n!r} (also at [{first[n]}])"
        first[n] = i
    return None


def _short(text: str, limit: int = 60) -> str:
    # start and end (as clipmaps.actors.text.shorten): long names often differ only at the end
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def text_problems(
    lists: Mapping[str, Sequence[str]],
    templates: Sequence[str],
    tokens: Callable[[str], Sequence[int]],
    limit: int,
    *,
    model: str = "the model",
) -> list[tuple[str, int, str]]:
    """What the text tower cannot represent or tell apart in a vocabulary, as ``(list key, index, reason)``.

    Args:
        lists: the vocabulary's name lists by field (``{"names": […], "background": […]}``), checked together: a
            background name that is a class name to the tokenizer is a duplicate too.
        templates: every template a method fills these names into.
        tokens: the tokenizer's ids for one text, untruncated, start and end tokens included
            (``clipmaps.actors.text.prompt_tokens``; passed in so that this module needs no torch).
        limit: the text tower's context length (``ModelInfo.context_length``).
        model: the model's name, for messages.

    A name is too long when any template filled with it has more than ``limit`` tokens (open_clip's tokenizer would
    cut it and force the end token); two names are duplicates when their token ids are equal (the tokenizer lowers
    case, collapses whitespace and normalises Unicode, so ``Red  Square`` is ``red square``). Names are only ever
    refused, never changed: their label numbers are the user's.
    """
    problems: list[tuple[str, int, str]] = []
    first: dict[tuple[int, ...], tuple[str, int, str]] = {}
    for key, names in lists.items():
        for i, name in enumerate(names):
            for t in templates:
                n = len(tokens(t.format(name)))
                if n > limit:
                    how = "" if t == "{}" else f" in template {t!r}"
                    problems.append(
                        (key, i, f"{_short(name)!r} is {n} tokens{how}; the text tower of {model} holds {limit} "
                         "(it would be cut, and names that differ only past the limit would be one class): shorten it")
                    )  # fmt: skip
                    break
            ids = tuple(tokens(name))
            if ids in first:
                k0, i0, n0 = first[ids]
                problems.append(
                    (key, i, f"{name!r} is the same text to the model as {n0!r} ({k0}[{i0}]): the tokenizer ignores "
                     "case, repeated whitespace and Unicode form, so both would get one embedding")
                )  # fmt: skip
            else:
                first[ids] = (key, i, name)
    return problems


def template_error(templates: str | Sequence[str]) -> tuple[int | None, str] | None:
    """Why ``templates`` is neither a template-set name nor a list of templates, as ``(index or None, reason)``;
    ``None`` when it is fine. Every template must contain exactly one ``{}`` (it is filled with ``str.format``)
    and no other braces."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SET_NAMES:
            return None, f"unknown template set {templates!r}; use one of {', '.join(TEMPLATE_SET_NAMES)} or a list"
        return None
    if len(templates) == 0:
        return None, "the template list must not be empty"
    for i, t in enumerate(templates):
        if not isinstance(t, str):
            return i, f"a template must be a string, got {t!r}"
        rest = t.replace("{}", "", 1)
        if t.count("{}") != 1 or "{" in rest or "}" in rest:
            return i, f"template {t!r} must contain exactly one '{{}}' placeholder and no other braces"
    return None


def vocabulary_id(
    names: Sequence[str], background: Sequence[str] = (), templates: str | Sequence[str] = "photo"
) -> str:
    """A short stable id (16 hex digits of a sha256) of a vocabulary: its class names, background names and
    templates (a set name or the list), in order. Equal ids mean the same label numbering and text embeddings."""
    payload = {
        "names": list(names),
        "background": list(background),
        "templates": templates if isinstance(templates, str) else list(templates),
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
