"""``clipmaps eval OUTPUT_URI``: score a job's outputs against the ground truth of generated scenes.

The job is an ordinary pipeline run over scenes written by :func:`clipmaps.jobs.synth.scene_set.write_scene_set`
(``clipmaps demo`` uses it), which puts a ``truth.parquet`` (:data:`clipmaps.jobs.synth.truth.TRUTH`) beside the
manifest. The evaluation reads the job's Parquet outputs exactly as a
user would, so a transposed label map, a shifted heatmap or a region paired with the wrong mask shows up as a drop
in the scores, not only as a method problem.

Metrics, each beside baselines computed the same way:

* segmentation (label maps of ``gem``, ``maskclip``, and ``gem_original``, the raw patch–text similarity of the
  unmodified model): mIoU over background and the classes that occur, and foreground IoU; baselines: a uniformly
  random label map and a centre prior (a centred ellipse with the set's mean foreground share, labelled with the
  set's most frequent class);
* pointing game (heatmaps of ``gem``, ``legrad``, ``gem_original``): the share of (image, prompt) pairs whose
  heatmap maximum falls inside the named object, and the share landing on *another* object (binding errors);
  baselines: the image centre and a uniformly random point (its exact expectation, the object's area share);
* region → class top-1 (``maskinversion`` embeddings against the text embeddings of every class): baselines: the
  mask-pooled final patch features, the embedding of the object's box crop, the whole-image embedding, chance.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import filesystem

from .outputs import JobOutputs, read_image
from .synth.scenes import CLASSES
from .synth.truth import TRUTH_FILE, Truth, read_truth

logger = logging.getLogger(__name__)


class EvalError(ConfigError):
    """The output cannot be evaluated (no ground truth, no results); the message says what is missing. The CLI
    exits with 2."""

    default_stage = "eval"


@dataclass
class Row:
    """One line of the results table."""

    task: str
    method: str
    value: float
    count: int
    extra: dict[str, float] = field(default_factory=dict)
    baseline: bool = False


def load_truth(outputs: JobOutputs, truth_uri: str | None = None) -> dict[str, Truth]:
    """The ground truth of a job's scenes: ``truth_uri``, by default ``truth.parquet`` beside its manifest (read
    with the input's storage options)."""
    truth_uri = truth_uri or posixpath.join(posixpath.dirname(outputs.manifest_uri or ""), TRUTH_FILE)
    fs, path = filesystem(truth_uri, outputs.input_options)
    if not fs.exists(path):
        raise EvalError(
            f"no ground truth at {truth_uri}: evaluate outputs of generated scenes (clipmaps demo, or "
            "a job over a manifest written by clipmaps.jobs.synth.scene_set) or pass --truth"
        )
    return read_truth(fs, path)


def class_text(job: dict):
    """``(LoadedModel, float32 [18, D])``: the job's model and its L2-normalised text embedding of every class name,
    with the job vocabulary's templates."""
    from clipmaps.actors.text import TextEncoder

    from .query import job_model, job_spec, load_job_model

    spec = job_spec(job)
    lm = load_job_model(job_model(job))
    templates = spec.vocabulary.templates if spec.vocabulary is not None else "photo"
    return lm, TextEncoder(lm.model, lm.tokenizer).encode(list(CLASSES), templates).float().numpy()


# ------------------------------------------------------------------------------------------------ segmentation
class Confusion:
    """Pixel confusion over ``0..n-1`` (0 = background), plus one bin for predicted names outside ``CLASSES``."""

    def __init__(self, n: int = len(CLASSES) + 1):
        self.n = n
        self.matrix = np.zeros((n, n + 1), np.int64)
        self.fg = np.zeros(3, np.int64)  # intersection, prediction, truth
        self.object_hits = 0  # object pixels given their own class

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        if truth.shape != pred.shape:
            raise EvalError(f"label map of shape {pred.shape} against ground truth {truth.shape}")
        pred = np.where((pred >= 0) & (pred < self.n), pred, self.n)
        self.matrix += np.bincount(
            truth.ravel() * (self.n + 1) + pred.ravel(), minlength=self.n * (self.n + 1)
        ).reshape(self.n, self.n + 1)
        t, p = truth > 0, pred > 0
        self.fg += (int((t & p).sum()), int(p.sum()), int(t.sum()))
        self.object_hits += int((t & (pred == truth)).sum())

    def miou(self) -> float:
        inter = np.diag(self.matrix[:, : self.n])
        union = self.matrix.sum(1) + self.matrix[:, : self.n].sum(0) - inter
        present = self.matrix.sum(1) > 0  # classes in the ground truth
        return float((inter[present] / np.maximum(union[present], 1)).mean()) if present.any() else float("nan")

    def fg_iou(self) -> float:
        i, p, t = self.fg
        return float(i / max(p + t - i, 1))

    def object_accuracy(self) -> float:
        """Share of the truth's object pixels labelled with their own class (background rule left out)."""
        return float(self.object_hits / max(int(self.fg[2]), 1))

    def extra(self) -> dict[str, float]:
        return {"fg_iou": self.fg_iou(), "object_acc": self.object_accuracy()}


def vocabulary_lut(vocab: pa.Table) -> dict[str, np.ndarray]:
    """Per ``vocabulary_id``: label value → ``CLASSES`` label (0 background, -1 a name outside ``CLASSES``)."""
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in vocab.select(["vocabulary_id", "class_index", "name", "is_background"]).to_pylist():
        by_id[r["vocabulary_id"]].append(r)
    out: dict[str, np.ndarray] = {}
    for vid, rows in by_id.items():
        lut = np.full(max(r["class_index"] for r in rows) + 1, -1, np.int64)
        lut[0] = 0
        for r in rows:
            if r["is_background"]:
                lut[r["class_index"]] = 0
            elif r["name"] in CLASSES:
                lut[r["class_index"]] = CLASSES.index(r["name"]) + 1
        out[vid] = lut
    return out


def centre_prior(shape: tuple[int, int], share: float) -> np.ndarray:
    """``bool [H, W]``: a centred ellipse covering ``share`` of the image (the image's aspect ratio)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2
    return r2 <= share * 4 / np.pi


# ------------------------------------------------------------------------------------------------ pointing
def pointing(truth: Truth, prompt: str, heat: np.ndarray) -> tuple[bool, bool] | None:
    """``(hit, other)`` for a heatmap ``[h, w]`` of ``prompt``: its maximum inside the named object / inside another
    object. ``None`` when the prompt names no object of the image. Heatmaps at another size than the image are
    compared at the heatmap's size (the truth resized with nearest neighbour)."""
    if prompt not in truth.names:
        return None
    k = truth.names.index(prompt) + 1
    inst = _resize_nearest(truth.instances, heat.shape)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(inst[y, x] == k), bool(inst[y, x] not in (0, k))


def _resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    ys = ((np.arange(shape[0]) + 0.5) * a.shape[0] / shape[0]).astype(int)
    xs = ((np.arange(shape[1]) + 0.5) * a.shape[1] / shape[1]).astype(int)
    return a[ys][:, xs]


# ------------------------------------------------------------------------------------------------ the run
def evaluate(
    output_uri: str, *, truth_uri: str | None = None, storage_options: dict | None = None, seed: int = 0
) -> list[Row]:
    """Score every method the job at ``output_uri`` ran, with baselines; returns the table's rows.

    ``truth_uri`` defaults to ``truth.parquet`` beside the job's manifest. ``storage_options`` are the output's
    (:class:`~clipmaps.jobs.outputs.JobOutputs`). Raises :class:`EvalError` when the ground truth or the job's
    outputs are missing.
    """
    outputs = JobOutputs(output_uri, storage_options)
    if not outputs.job:
        raise EvalError(f"{output_uri} has no _job.json: run a job there first (clipmaps demo or clipmaps run)")
    truths = load_truth(outputs, truth_uri)
    tables = {name: outputs.table(name) for name in ("labels", "heatmaps", "regions", "vocabulary")}
    rows: list[Row] = []
    if tables["labels"] is not None and tables["vocabulary"] is not None:
        rows += segmentation_rows(tables["labels"], tables["vocabulary"], truths, seed)
    if tables["heatmaps"] is not None:
        rows += pointing_rows(tables["heatmaps"], truths)
    if tables["regions"] is not None:
        rows += region_rows(tables["regions"], truths, outputs)
    if not rows:
        raise EvalError(f"{output_uri} holds no label maps, heatmaps or regions to evaluate")
    return rows


def segmentation_rows(labels: pa.Table, vocab: pa.Table, truths: dict[str, Truth], seed: int) -> list[Row]:
    from clipmaps.schemas.encodings import decode_label_map

    luts = vocabulary_lut(vocab)
    per_method: dict[str, Confusion] = defaultdict(Confusion)
    counts: dict[str, int] = defaultdict(int)
    for r in labels.select(["image_id", "method", "label_map", "vocabulary_id"]).to_pylist():
        truth = truths.get(r["image_id"])
        if truth is None:
            continue
        lut = luts[r["vocabulary_id"]]
        pred = decode_label_map(r["label_map"]).astype(np.int64)
        per_method[r["method"]].add(truth.classes(), np.where(pred < len(lut), lut[np.minimum(pred, len(lut) - 1)], -1))
        counts[r["method"]] += 1
    if not per_method:
        return []
    rows = [Row("segmentation", m, c.miou(), counts[m], c.extra()) for m, c in sorted(per_method.items())]
    rows += _segmentation_baselines(truths, luts, seed)
    return rows


def _segmentation_baselines(truths: dict[str, Truth], luts: dict[str, np.ndarray], seed: int) -> list[Row]:
    rng = np.random.default_rng(seed)
    labels = sorted({int(v) for lut in luts.values() for v in lut})  # what a label map of this vocabulary can say
    classes = [t.classes() for t in truths.values()]
    share = float(np.mean([(c > 0).mean() for c in classes]))
    frequent = int(np.bincount(np.concatenate([c[c > 0] for c in classes]), minlength=2).argmax())
    random, centre = Confusion(), Confusion()
    for c in classes:
        random.add(c, rng.choice(labels, size=c.shape))
        centre.add(c, np.where(centre_prior(c.shape, share), frequent, 0))
    n = len(classes)
    return [
        Row("segmentation", "random map", random.miou(), n, random.extra(), True),
        Row("segmentation", "centre prior", centre.miou(), n, centre.extra(), True),
    ]


def pointing_rows(heatmaps: pa.Table, truths: dict[str, Truth]) -> list[Row]:
    from clipmaps.schemas.encodings import decode_heatmap

    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    pairs: dict[tuple[str, str], None] = {}
    for r in heatmaps.select(["image_id", "method", "prompt", "height", "width", "encoding", "heatmap"]).to_pylist():
        truth = truths.get(r["image_id"])
        if truth is None:
            continue
        heat = decode_heatmap(r["heatmap"], r["encoding"], r["height"], r["width"])
        result = pointing(truth, r["prompt"], heat)
        if result is not None:
            hits[r["method"]].append(result)
            pairs[(r["image_id"], r["prompt"])] = None
    if not hits:
        return []
    rows = [
        Row(
            "pointing",
            m,
            float(np.mean([h for h, _ in v])),
            len(v),
            {"other_object": float(np.mean([o for _, o in v]))},
        )
        for m, v in sorted(hits.items())
    ]
    centre, random, other_centre, other_random = [], [], [], []
    for image_id, prompt in pairs:
        truth = truths[image_id]
        k = truth.names.index(prompt) + 1
        h, w = truth.instances.shape
        at = truth.instances[h // 2, w // 2]
        centre.append(at == k)
        other_centre.append(at not in (0, k))
        random.append(float((truth.instances == k).mean()))  # a uniformly random point's exact hit rate
        other_random.append(float(((truth.instances != k) & (truth.instances > 0)).mean()))
    n = len(pairs)
    rows += [
        Row(
            "pointing", "image centre", float(np.mean(centre)), n, {"other_object": float(np.mean(other_centre))}, True
        ),
        Row(
            "pointing", "random point", float(np.mean(random)), n, {"other_object": float(np.mean(other_random))}, True
        ),
    ]
    return rows


def region_rows(regions: pa.Table, truths: dict[str, Truth], outputs: JobOutputs) -> list[Row]:
    """MaskInversion region → class top-1 accuracy, and the same for the feature baselines (model forward here)."""
    import torch

    lm, text = class_text(outputs.job)
    correct: dict[str, list[bool]] = defaultdict(list)
    own: dict[str, list[bool]] = defaultdict(list)
    wanted: dict[str, dict[str, int]] = defaultdict(dict)  # image → region id → class index
    for r in regions.select(["image_id", "region_id", "method", "embedding"]).to_pylist():
        truth = truths.get(r["image_id"])
        if truth is None or r["region_id"] not in truth.region_ids:
            continue
        k = truth.region_ids.index(r["region_id"])
        cls = CLASSES.index(truth.names[k])
        scores = text @ np.asarray(r["embedding"], np.float32)
        correct[r["method"]].append(int(np.argmax(scores)) == cls)
        own[r["method"]].append(_own_object(scores, truth, k))
        wanted[r["image_id"]][r["region_id"]] = k
    if not correct:
        return []
    rows = [
        Row("region top-1", m, float(np.mean(v)), len(v), {"own_object": float(np.mean(own[m]))})
        for m, v in sorted(correct.items())
    ]
    uris = outputs.image_uri_map()
    base: dict[str, list[bool]] = defaultdict(list)
    base_own: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for image_id, regions_k in wanted.items():
            truth = truths[image_id]
            image = _baseline_image(uris.get(image_id), outputs.input_options)
            if image is None:
                continue
            for name, emb in _baseline_embeddings(lm, image, truth, sorted(regions_k.values())).items():
                for k, e in zip(sorted(regions_k.values()), emb):
                    base[name].append(int(np.argmax(text @ e)) == CLASSES.index(truth.names[k]))
                    base_own[name].append(_own_object(text @ e, truth, k))
    rows += [
        Row(
            "region top-1",
            name,
            float(np.mean(v)),
            len(v),
            {"own_object": float(np.mean(base_own[name]))},
            baseline=True,
        )
        for name, v in base.items()
    ]
    chance_own = float(np.mean([1 / len(truths[i].names) for i, ks in wanted.items() for _ in ks]))
    rows.append(
        Row(
            "region top-1",
            "chance",
            1 / len(CLASSES),
            sum(map(len, correct.values())),
            {"own_object": chance_own},
            baseline=True,
        )
    )
    return rows


def _own_object(scores: np.ndarray, truth: Truth, k: int) -> bool:
    """Among the classes of the image's own objects, is object ``k``'s class the closest? (Tells a region from
    its neighbours; a whole-image embedding can get at most one object per image right.)"""
    present = [CLASSES.index(n) for n in truth.names]
    return present[int(np.argmax(scores[present]))] == CLASSES.index(truth.names[k])


def _baseline_image(uri: str | None, storage_options: dict):
    """The input image of the region baselines, or ``None`` when it cannot be read."""
    if uri is None:
        return None
    try:
        return read_image(uri, storage_options)
    except Exception as e:  # noqa: BLE001 - the image is reported by the job's errors; here it just drops out
        logger.warning("cannot read %s for the region baselines: %s", uri, e)
        return None


def _baseline_embeddings(lm, image, truth: Truth, objects: list[int]) -> dict[str, list[np.ndarray]]:
    """Per baseline, one L2-normalised embedding per object ``k``: mask-pooled final patch features, the box crop's
    image embedding, the whole image's embedding (one for all objects)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from clipmaps.actors.vit import VisionTower
    from clipmaps.pipeline.decode.preprocess import Preprocess

    size = lm.model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    pre = Preprocess(size=size)
    tower = VisionTower(lm.model.visual)
    x = torch.from_numpy(pre.image(image))[None]
    tokens, grid = tower.embed(x, antialias=True)
    tokens = tower.blocks_forward(tokens)
    patches = F.normalize(tower.project(tokens[0, 1:]), dim=-1).reshape(*grid, -1)  # [gh, gw, D]
    whole = F.normalize(tower.pooled(tokens), dim=-1)[0].numpy()
    out: dict[str, list[np.ndarray]] = {"mask-pooled patches": [], "box crop": [], "whole image": []}
    for k in objects:
        mask = (truth.instances == k + 1).astype(np.float32)
        weights = torch.from_numpy(np.array(Image.fromarray(mask).resize((grid[1], grid[0]), Image.BILINEAR)))
        pooled = (patches * weights[..., None]).sum((0, 1)) / weights.sum().clamp_min(1e-6)
        out["mask-pooled patches"].append(F.normalize(pooled, dim=-1).numpy())
        ys, xs = np.nonzero(mask)
        pad = max(2, int(0.1 * max(np.ptp(ys) + 1, np.ptp(xs) + 1)))
        box = (
            max(0, xs.min() - pad),
            max(0, ys.min() - pad),
            min(image.width, xs.max() + 1 + pad),
            min(image.height, ys.max() + 1 + pad),
        )
        crop = torch.from_numpy(pre.image(image.crop(box)))[None]
        out["box crop"].append(F.normalize(lm.model.encode_image(crop), dim=-1)[0].numpy())
        out["whole image"].append(whole)
    return out


# ------------------------------------------------------------------------------------------------ output
def format_table(rows: list[Row]) -> str:
    """The results as a fixed-width table: task, method or baseline, score, extra metric, count."""
    lines = [f"{'task':<14} {'method / baseline':<22} {'score':>7}  {'extra':<36} {'n':>5}"]
    for task in dict.fromkeys(r.task for r in rows):
        lines.append("-" * 90)
        for r in [r for r in rows if r.task == task]:
            extra = ", ".join(f"{k} {v:.3f}" for k, v in r.extra.items())
            name = f"({r.method})" if r.baseline else r.method
            lines.append(f"{task:<14} {name:<22} {r.value:>7.3f}  {extra:<36} {r.count:>5}")
    lines.append("-" * 90)
    lines.append(
        "segmentation: mIoU over the truth's classes and background; fg_iou: foreground IoU; object_acc: "
        "object pixels\ngiven their own class. pointing: heatmap maximum inside the named object; "
        "other_object: inside another one.\nregion top-1: the region's nearest class among all 18; "
        "own_object: among the image's own objects' classes.\n(Parentheses: baselines.)"
    )
    return "\n".join(lines)


def run_eval_cli(args: argparse.Namespace) -> int:
    """``clipmaps eval`` (arguments: :func:`clipmaps.jobs.commands.add_eval_parser`); returns the exit code."""
    try:
        rows = evaluate(args.output, truth_uri=args.truth, seed=args.seed)
    except ConfigError as e:  # EvalError, or an output without a readable manifest
        print(f"clipmaps eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0
