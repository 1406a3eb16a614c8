"""``clipmaps report``: a static HTML report of a job's outputs, for looking at results without a notebook.

One folder (``index.html`` and ``assets/``) that opens from disk in any browser: no server, no CDN, no external
request; the images are files next to the page. It shows

* run metadata from ``_job.json`` (status, counts, timings, versions, model, methods and their parameters
  hashes, vocabulary, input and output) and the row count of every dataset;
* a sample of images (``--sample N``, drawn with ``--seed`` from the manifest's image ids, or from the
  datasets' when the manifest cannot be read; or, with ``--select``, the images with errors, of a class, of the
  worst regions or of the least confident label maps first: :mod:`clipmaps.jobs.report_select`), each with its
  label maps per method (overlays, with the classes present and their pixel shares), its heatmaps per prompt and
  method (overlays), its region masks
  (decoded from the manifest's RLE, polygons or mask PNGs, outlined, with the ``regions/`` bounding box and
  MaskInversion loss) and its error rows;
* the legend of class colours of each vocabulary (``vocabulary/``) and the per-class pixel shares of the label
  maps of the sampled images, per method;
* error counts by stage and reason (``errors/``, the whole dataset), with example messages.

A script on the page checks after load that every image rendered and writes the result into
``#img-check`` (``data-broken`` = the number of images that did not), which the tests read with a headless
browser. Imports no torch.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import html
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image, ImageDraw

from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import filesystem, join_uri, redact_text, redact_uri, remove

from .outputs import DATASET_NAMES, JobOutputs, is_local, parse_storage_options, read_image
from .report_select import select_images

logger = logging.getLogger(__name__)

THUMB = 320  # long side of the images on the page, in pixels
OVERLAY_ALPHA = 0.55


class ReportError(ConfigError):
    """The output cannot be reported on (nothing there, unreadable…); the CLI exits with 2."""

    default_stage = "report"


# ---------------------------------------------------------------------------------------------- colours
def class_colour(index: int) -> tuple[int, int, int]:
    """A stable, distinct colour for label ``index`` (0 = background: dark grey)."""
    if index == 0:
        return (40, 40, 40)
    h = (index * 0.618033988749895) % 1.0
    s = (0.95, 0.7, 0.85)[index % 3]
    v = (0.95, 0.8, 0.65)[(index // 3) % 3]
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def palette(n: int) -> np.ndarray:
    """``uint8 [n, 3]`` colours of labels ``0 … n-1``."""
    return np.array([class_colour(i) for i in range(n)], dtype=np.uint8)


#: Anchors of the heatmap colour scale (dark blue → purple → orange → light yellow, like "inferno").
_HEAT_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``float [H, W]`` in [0, 1] → ``uint8 [H, W, 3]``."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, len(_HEAT_ANCHORS) - 1)
    t = (v - lo)[..., None]
    return (_HEAT_ANCHORS[lo] * (1 - t) + _HEAT_ANCHORS[hi] * t).astype(np.uint8)


def hex_colour(rgb: Sequence[int]) -> str:
    r, g, b = (int(c) for c in rgb[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


# ---------------------------------------------------------------------------------------------- reading
def open_dataset(outputs: JobOutputs, name: str) -> pads.Dataset | None:
    """The dataset ``name``, or ``None`` when it is missing or cannot be read (the report shows what there is)."""
    try:
        return outputs.dataset(name)
    except Exception as e:  # noqa: BLE001 - a dataset that cannot be read is reported as such
        logger.warning(
            "cannot read %s: %s", outputs.shown(name), redact_text(str(e), storage_options=outputs.storage_options)
        )
        return None


def rows_for(ds: pads.Dataset | None, image_ids: Sequence[str], columns: Sequence[str] | None = None) -> list[dict]:
    """The rows of ``ds`` whose ``image_id`` is one of ``image_ids`` (filter pushed into the scan)."""
    if ds is None or not image_ids:
        return []
    cols = [c for c in columns if c in ds.schema.names] if columns else None
    return ds.to_table(columns=cols, filter=pc.field("image_id").isin(list(image_ids))).to_pylist()


def distinct_ids(ds: pads.Dataset | None) -> set[str]:
    out: set[str] = set()
    if ds is None:
        return out
    for batch in ds.to_batches(columns=["image_id"], batch_size=262_144):
        out.update(v for v in pc.unique(batch.column(0)).to_pylist() if v is not None)
    return out


def count_rows(ds: pads.Dataset | None) -> int | None:
    return None if ds is None else ds.count_rows()


def error_summary(ds: pads.Dataset | None, examples: int = 3) -> tuple[list[dict], int]:
    """Error rows by ``(stage, error_type)``: counts, methods, distinct images and a few example messages."""
    if ds is None:
        return [], 0
    counts: Counter = Counter()
    methods: dict[tuple, Counter] = defaultdict(Counter)
    images: dict[tuple, set] = defaultdict(set)
    samples: dict[tuple, list] = defaultdict(list)
    total = 0
    cols = ["image_id", "method", "region_id", "stage", "error_type", "message"]
    for batch in ds.to_batches(columns=[c for c in cols if c in ds.schema.names], batch_size=65_536):
        for r in batch.to_pylist():
            key = (r.get("stage"), r.get("error_type"))
            counts[key] += 1
            total += 1
            methods[key][r.get("method") or "(before any method)"] += 1
            if len(images[key]) < 100_000:
                images[key].add(r.get("image_id"))
            if len(samples[key]) < examples:
                samples[key].append(r)
    out = [
        {
            "stage": k[0],
            "error_type": k[1],
            "rows": n,
            "images": len(images[k]),
            "methods": dict(methods[k]),
            "examples": samples[k],
        }
        for k, n in counts.most_common()
    ]
    return out, total


def vocabularies(ds: pads.Dataset | None) -> dict[str, dict]:
    """``vocabulary_id → {"classes": {label: name}, "background": [names], "templates": [...]}``."""
    out: dict[str, dict] = {}
    if ds is None:
        return out
    for r in ds.to_table().to_pylist():
        v = out.setdefault(r["vocabulary_id"], {"classes": {}, "background": [], "templates": r.get("templates")})
        if r["is_background"]:
            if r["name"] not in v["background"]:
                v["background"].append(r["name"])
        else:
            v["classes"][int(r["class_index"])] = r["name"]
    return out


# ---------------------------------------------------------------------------------------------- images
@dataclass
class Asset:
    """An image written under ``assets/``, and its caption."""

    file: str
    caption: str
    width: int
    height: int
    extra: str = ""


@dataclass
class Card:
    """Everything shown for one sampled image."""

    image_id: str
    image_uri: str | None
    size: tuple[int, int] | None = None  # (width, height) of the original
    image: Asset | None = None
    problem: str | None = None
    labels: list[Asset] = field(default_factory=list)
    heatmaps: dict[str, list[Asset]] = field(default_factory=dict)
    regions: Asset | None = None
    region_rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


class AssetWriter:
    """Writes PNG/JPEG files into ``assets/`` with short, safe, unique names."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def save(self, img: Image.Image, stem: str, fmt: str = "JPEG") -> str:
        key = hashlib.sha1(stem.encode("utf-8")).hexdigest()[:16]
        name = f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}"
        if fmt == "JPEG":
            img.convert("RGB").save(self.folder / name, format="JPEG", quality=88)
        else:
            img.save(self.folder / name, format="PNG", optimize=False)
        self.count += 1
        return f"assets/{name}"


def thumb_size(width: int, height: int, long_side: int = THUMB) -> tuple[int, int]:
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def blend(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    a = alpha if np.isscalar(alpha) else np.asarray(alpha, np.float32)[..., None]
    return (base.astype(np.float32) * (1 - a) + colour.astype(np.float32) * a).clip(0, 255).astype(np.uint8)


def label_overlay(base: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Colour ``labels`` (``[h, w]`` at the base's size) over ``base``; background (0) stays as it is, dimmed."""
    pal = palette(int(labels.max()) + 1 if labels.size else 1)
    colours = pal[labels]
    fg = labels > 0
    out = blend(base, colours, np.where(fg, OVERLAY_ALPHA, 0.35).astype(np.float32))
    return out


def heat_overlay(base: np.ndarray, heat: np.ndarray) -> np.ndarray:
    return blend(base, heat_colours(heat), 0.5 + 0.3 * np.clip(heat, 0, 1))


def resize_array(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """``arr`` ``[H, W]`` → ``size`` ``(w, h)``."""
    if arr.shape[1] == size[0] and arr.shape[0] == size[1]:
        return arr
    if nearest:
        ys = (np.arange(size[1]) * arr.shape[0] / size[1]).astype(np.int64)
        xs = (np.arange(size[0]) * arr.shape[1] / size[0]).astype(np.int64)
        return arr[ys][:, xs]
    return np.asarray(Image.fromarray(arr.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class ReportData:
    job: dict
    output_uri: str
    counts: dict[str, int | None]
    cards: list[Card]
    population: int
    population_source: str
    vocabularies: dict[str, dict]
    used_vocabularies: dict[str, set]  # vocabulary_id -> methods
    shares: dict[tuple[str, str], Counter]  # (method, vocabulary_id) -> label -> pixels
    errors: list[dict]
    error_rows: int
    selection: str = "drawn at random"
    seconds: float = 0.0


def build_report(
    output_uri: str,
    out_dir: str | None = None,
    *,
    sample: int = 12,
    seed: int = 0,
    select: str = "random",
    storage_options: dict | None = None,
    input_storage_options: dict | None = None,
    max_heatmaps: int = 24,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Write the report folder; return where (``OUTPUT_URI/report`` by default).

    Args:
        output_uri: the job's output URI (local path or fsspec URI).
        out_dir: folder (or URI) for the report; default ``OUTPUT_URI/report``.
        sample: number of images shown.
        seed: seed of the sample.
        select: which images (:mod:`clipmaps.jobs.report_select`: ``random``, ``errors``, ``class:NAME``,
            ``high-loss``, ``low-confidence``).
        storage_options: fsspec options for the output URI.
        input_storage_options: fsspec options for the manifest and images (default: ``_job.json``'s
            ``input.storage_options`` without redacted values, updated with ``storage_options``).
        max_heatmaps: heatmaps shown per image at most (prompts × methods).
    """
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    so = dict(storage_options or {})
    outputs = JobOutputs(output_uri, so, input_storage_options=input_storage_options)
    if not outputs.exists():
        raise ReportError(f"{redact_uri(output_uri)} does not exist")
    job = outputs.job
    in_so = outputs.input_options
    datasets = {n: open_dataset(outputs, n) for n in DATASET_NAMES}
    if not job and all(d is None for d in datasets.values()):
        raise ReportError(f"{redact_uri(output_uri)} holds no clipmaps output (no _job.json, no datasets)")
    counts = {n: count_rows(d) for n, d in datasets.items()}

    # the population of images and the sample
    manifest_uri = outputs.manifest_uri
    ids: list[str] = []
    population_source = "manifest"
    if manifest_uri:
        try:
            ids = [v for v in outputs.manifest(["image_id"])["image_id"].to_pylist() if v]
        except Exception as e:  # noqa: BLE001 - fall back on the datasets' ids
            detail = redact_text(str(e), storage_options=outputs.input_options, uris=[manifest_uri])
            logger.warning("cannot read the manifest %s: %s", redact_uri(manifest_uri), detail)
    if not ids:
        population_source = "datasets"
        found: set[str] = set()
        for n in ("labels", "heatmaps", "regions", "errors"):
            found |= distinct_ids(datasets[n])
        ids = list(found)
    ids = sorted(set(ids))
    vocabs = vocabularies(datasets["vocabulary"])
    chosen, how = select_images(select, ids=ids, datasets=datasets, vocabularies=vocabs, sample=sample, seed=seed)
    say(f"report: {len(chosen)} of {len(ids)} images ({population_source}), {how}")

    manifest_rows: dict[str, dict] = {}
    if manifest_uri and chosen:
        try:
            t = outputs.manifest(["image_id", "image_uri", "masks"], image_ids=chosen)
            manifest_rows = {r["image_id"]: r for r in t.to_pylist()}
        except Exception as e:  # noqa: BLE001
            logger.warning("cannot read the manifest rows: %s", e)
    by_image: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for n, cols in (
        ("labels", None),
        ("heatmaps", None),
        ("errors", None),
        ("regions", ["image_id", "region_id", "method", "area", "bbox", "loss"]),
    ):
        for r in rows_for(datasets[n], chosen, cols):
            by_image[r["image_id"]][n].append(r)

    tmp = Path(tempfile.mkdtemp(prefix="clipmaps-report-"))
    try:
        assets = AssetWriter(tmp / "assets")
        shares: dict[tuple[str, str], Counter] = defaultdict(Counter)
        used: dict[str, set] = defaultdict(set)
        cards = []
        for i, image_id in enumerate(chosen):
            cards.append(
                make_card(
                    image_id,
                    manifest_rows.get(image_id),
                    by_image[image_id],
                    assets,
                    in_so,
                    shares,
                    used,
                    vocabs,
                    max_heatmaps,
                )
            )
            if (i + 1) % 10 == 0:
                say(f"  {i + 1}/{len(chosen)} images drawn")
        errors, error_rows = error_summary(datasets["errors"])
        data = ReportData(
            job=job,
            output_uri=output_uri,
            counts=counts,
            cards=cards,
            population=len(ids),
            population_source=population_source,
            selection=how,
            vocabularies=vocabs,
            used_vocabularies=used,
            shares=shares,
            errors=errors,
            error_rows=error_rows,
        )
        data.seconds = time.perf_counter() - t0
        (tmp / "index.html").write_text(render(data), encoding="utf-8")
        dest = out_dir or join_uri(output_uri, "report")
        publish(tmp, dest, so)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def publish(tmp: Path, dest: str, storage_options: dict) -> None:
    """Copy the built folder to ``dest`` (local folder or URI), replacing a previous report there."""
    fs, path = filesystem(dest, storage_options)
    if is_local(fs):
        path = os.path.abspath(path)
        if os.path.isdir(os.path.join(path, "assets")):
            shutil.rmtree(os.path.join(path, "assets"))
        os.makedirs(path, exist_ok=True)
        shutil.copytree(tmp / "assets", os.path.join(path, "assets"))
        shutil.copyfile(tmp / "index.html", os.path.join(path, "index.html"))
        return
    remove(fs, join_uri(path, "assets"), recursive=True)  # literal: the folder may be named like a glob pattern
    fs.put(str(tmp / "assets") + "/", join_uri(path, "assets") + "/", recursive=True)
    fs.put_file(str(tmp / "index.html"), join_uri(path, "index.html"))


def _decode_masks(masks: list | None, height: int, width: int, storage_options: dict) -> list[tuple[str, Any]]:
    """The manifest's masks of one image → ``[(region_id, bool [H, W] or an error message)]``."""
    import fsspec

    from clipmaps.pipeline.decode import decode_mask

    out = []
    for k, m in enumerate(masks or []):
        rid = str(m.get("region_id") or k) if m else str(k)
        try:
            fetched = None
            if m and m.get("uri") and not m.get("rle") and not m.get("polygon"):
                with fsspec.open(m["uri"], "rb", **storage_options) as f:
                    fetched = f.read()
            out.append((rid, decode_mask(m, height, width, fetched=fetched)))
        except Exception as e:  # noqa: BLE001 - shown on the card, so without secrets
            text = f"{type(e).__name__}: {getattr(e, 'message', e)}"
            out.append((rid, redact_text(text, storage_options=storage_options, uris=[m.get("uri") if m else None])))
    return out


def make_card(
    image_id: str,
    manifest_row: dict | None,
    rows: dict[str, list],
    assets: AssetWriter,
    storage_options: dict,
    shares: dict,
    used: dict,
    vocabs: dict,
    max_heatmaps: int,
) -> Card:
    """Draw one image's panels into ``assets`` and accumulate its label pixel counts into ``shares``."""
    uri = (manifest_row or {}).get("image_uri")
    card = Card(image_id=image_id, image_uri=uri, errors=rows.get("errors", []))
    img = None
    if uri:
        try:
            img = read_image(uri, storage_options)
        except Exception as e:  # noqa: BLE001 - shown on the card
            detail = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            card.problem = f"image not readable: {redact_text(detail, storage_options=storage_options, uris=[uri])}"
    else:
        card.problem = "no image URI (the manifest could not be read or does not list this image)"
    size = img.size if img is not None else None
    for r in rows.get("labels", []) + rows.get("heatmaps", []):
        size = size or (int(r["width"]), int(r["height"]))
    if size is None:
        return card
    card.size = size
    tw, th = thumb_size(*size)
    if img is not None:
        base = np.asarray(img.resize((tw, th), Image.Resampling.BILINEAR), dtype=np.uint8)
        card.image = Asset(assets.save(Image.fromarray(base), f"{image_id}|image", "JPEG"), "image", tw, th)
    else:
        base = np.full((th, tw, 3), 128, np.uint8)

    from clipmaps.schemas.encodings import decode_heatmap, decode_label_map

    for r in sorted(rows.get("labels", []), key=lambda r: r["method"]):
        try:
            lm = decode_label_map(r["label_map"])
        except Exception as e:  # noqa: BLE001
            card.errors.append(
                {
                    "stage": "report",
                    "error_type": type(e).__name__,
                    "method": r["method"],
                    "message": f"label map not decodable: {e}",
                }
            )
            continue
        counts = np.bincount(lm.ravel().astype(np.int64))
        key = (r["method"], r["vocabulary_id"])
        for label, n in enumerate(counts):
            if n:
                shares[key][label] += int(n)
        used[r["vocabulary_id"]].add(r["method"])
        small = resize_array(lm, (tw, th), nearest=True)
        over = label_overlay(base, small)
        names = (vocabs.get(r["vocabulary_id"]) or {}).get("classes", {})
        total = max(1, int(counts.sum()))
        top = sorted(((n, label) for label, n in enumerate(counts) if n), reverse=True)[:6]
        extra = "".join(
            f'<span class="chip"><i style="background:{hex_colour(class_colour(label))}"></i>'
            f"{html.escape(names.get(label, 'background' if label == 0 else f'label {label}'))} "
            f"{100 * n / total:.1f}%</span>"
            for n, label in top
        )
        card.labels.append(
            Asset(
                assets.save(Image.fromarray(over), f"{image_id}|labels|{r['method']}"),
                f"{r['method']} label map",
                tw,
                th,
                extra,
            )
        )
    heat_rows = sorted(rows.get("heatmaps", []), key=lambda r: (r["method"], r["prompt"]))
    for r in heat_rows[:max_heatmaps]:
        try:
            h = decode_heatmap(r["heatmap"], r["encoding"], int(r["height"]), int(r["width"]))
        except Exception as e:  # noqa: BLE001
            card.errors.append(
                {
                    "stage": "report",
                    "error_type": type(e).__name__,
                    "method": r["method"],
                    "message": f"heatmap not decodable: {e}",
                }
            )
            continue
        if r["encoding"] != "png8":  # float16 maps may have any range: show them min-max normalised
            lo, hi = float(np.nanmin(h)), float(np.nanmax(h))
            h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
        over = heat_overlay(base, resize_array(h.astype(np.float32), (tw, th), nearest=False))
        card.heatmaps.setdefault(r["method"], []).append(
            Asset(
                assets.save(Image.fromarray(over), f"{image_id}|heat|{r['method']}|{r['prompt']}"), r["prompt"], tw, th
            )
        )
    if len(heat_rows) > max_heatmaps:
        card.heatmaps.setdefault("…", [])
    card.region_rows = sorted(rows.get("regions", []), key=lambda r: str(r["region_id"]))
    masks = (manifest_row or {}).get("masks")
    if masks or card.region_rows:
        card.regions = draw_regions(base, size, masks, card.region_rows, storage_options, assets, image_id, card)
    return card


def draw_regions(
    base: np.ndarray,
    size: tuple[int, int],
    masks: list | None,
    region_rows: list[dict],
    storage_options: dict,
    assets: AssetWriter,
    image_id: str,
    card: Card,
) -> Asset:
    """Region masks (from the manifest) filled and outlined, with the ``regions/`` boxes and ids."""
    width, height = size
    th, tw = base.shape[:2]
    sx, sy = tw / width, th / height
    out = base.copy()
    decoded = _decode_masks(masks, height, width, storage_options) if masks else []
    colours = {}
    for k, (rid, m) in enumerate(decoded):
        colour = np.array(class_colour(k + 1), np.uint8)
        colours[rid] = colour
        if isinstance(m, str):
            card.errors.append({"stage": "report", "error_type": "mask", "region_id": rid, "message": m})
            continue
        small = resize_array(m.astype(np.uint8), (tw, th), nearest=True).astype(bool)
        out = blend(out, np.broadcast_to(colour, out.shape), np.where(small, 0.45, 0.0).astype(np.float32))
        edge = small & ~(np.roll(small, 1, 0) & np.roll(small, -1, 0) & np.roll(small, 1, 1) & np.roll(small, -1, 1))
        out[edge] = colour
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for k, r in enumerate(region_rows):
        colour = tuple(int(c) for c in colours.get(str(r["region_id"]), class_colour(len(decoded) + k + 1)))
        x, y, w, h = (int(v) for v in r["bbox"])
        box = [x * sx, y * sy, max(x * sx, (x + w) * sx - 1), max(y * sy, (y + h) * sy - 1)]
        draw.rectangle(box, outline=colour, width=2)
        label = str(r["region_id"])
        tx, ty = box[0] + 2, max(0, box[1] - 11)
        draw.rectangle([tx - 1, ty, tx + 6 * len(label) + 1, ty + 10], fill=(0, 0, 0))
        draw.text((tx, ty - 1), label, fill=colour)
    caption = f"{len(decoded)} masks (manifest), {len(region_rows)} regions/ rows"
    return Asset(assets.save(pil, f"{image_id}|regions"), caption, tw, th)


# ---------------------------------------------------------------------------------------------- HTML
CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f5f5f7}
header{background:#1d2b3a;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header .sub{opacity:.8}main{padding:8px 28px 40px}section{margin:22px 0}
h2{font-size:18px;border-bottom:2px solid #d0d4da;padding-bottom:4px}h3{font-size:15px;margin:10px 0 6px}
table{border-collapse:collapse;background:#fff;margin:6px 0}td,th{border:1px solid #dde;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.kv{display:grid;grid-template-columns:max-content auto;gap:2px 14px}
.card{background:#fff;border:1px solid #d8dbe0;border-radius:8px;padding:12px;margin:14px 0}
.card h3{margin-top:0}figure{margin:0;display:inline-block;vertical-align:top}figure img{display:block;
border-radius:4px;background:#ddd}figcaption{font-size:12px;color:#444;max-width:320px;margin-top:3px}
.chip{display:inline-block;margin:2px 6px 0 0;font-size:12px;white-space:nowrap}.chip i,.sw{display:inline-block;
width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px;border:1px solid #0003}
.bar{background:#4a78c2;height:10px;display:inline-block;vertical-align:middle}
.problem{color:#a12;font-weight:600}.muted{color:#666}pre{background:#fff;border:1px solid #dde;padding:8px;
overflow:auto;max-height:420px}details>summary{cursor:pointer;font-weight:600;margin:6px 0}
#img-check{font-size:12px;color:#666}
"""

SCRIPT = """
(function(){
  function check(){
    var imgs = Array.prototype.slice.call(document.images);
    var broken = imgs.filter(function(i){ return !(i.complete && i.naturalWidth > 0); });
    var el = document.getElementById('img-check');
    el.setAttribute('data-total', String(imgs.length));
    el.setAttribute('data-broken', String(broken.length));
    el.setAttribute('data-loaded', 'true');
    el.textContent = imgs.length + ' images, ' + broken.length + ' not rendered' +
      (broken.length ? ': ' + broken.map(function(i){ return i.getAttribute('src'); }).join(' ') : '');
    document.body.setAttribute('data-loaded', 'true');
  }
  if (document.readyState === 'complete') { check(); } else { window.addEventListener('load', check); }
})();
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    return '<div class="kv">' + "".join(f"<b>{_e(k)}</b><span>{v}</span>" for k, v in rows) + "</div>"


def _img(a: Asset) -> str:
    return (
        f'<figure><img src="{_e(a.file)}" width="{a.width}" height="{a.height}" alt="{_e(a.caption)}">'
        f"<figcaption>{_e(a.caption)}{('<br>' + a.extra) if a.extra else ''}</figcaption></figure>"
    )


def render(d: ReportData) -> str:
    job = d.job
    spec = job.get("spec") or {}
    model = spec.get("model") or {}
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>clipmaps report — {_e(redact_uri(d.output_uri))}</title><style>{CSS}</style></head><body>",
        f"<header><h1>clipmaps report</h1><div class='sub'>{_e(redact_uri(d.output_uri))} · status "
        f"{_e(job.get('status', 'unknown'))} · generated {_e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}"
        f"</div></header><main>",
    ]
    out.append(render_run(d, spec, model))
    out.append(render_errors(d))
    out.append(render_legend(d))
    out.append(render_shares(d))
    out.append(render_cards(d))
    out.append(
        f'<p id="img-check" data-loaded="false">checking images…</p>'
        f"<p class='muted'>report written in {d.seconds:.1f} s by clipmaps</p></main>"
        f"<script>{SCRIPT}</script></body></html>"
    )
    return "\n".join(out)


def _input_of(spec: dict) -> str:
    """A recorded spec's ``input.uri`` (``input.manifest`` in older ``_job.json`` files) for the page, redacted: the
    pattern as written, or a list's first entry and how many more; ``-`` when there is none."""
    from clipmaps.pipeline.uris import describe

    section = spec.get("input") or {}
    value = section.get("uri") or section.get("manifest")
    return describe(value) if value else "-"


def render_run(d: ReportData, spec: dict, model: dict) -> str:
    job = d.job
    weights = (
        model.get("pretrained")
        or model.get("weights")
        or (f"random:seed={model.get('seed')}" if model.get("seed") is not None else None)
    )
    rows = [
        ("output", _e(redact_uri(d.output_uri))),
        ("status", _e(job.get("status", "no _job.json"))),
        ("ok", _e(job.get("ok"))),
        ("input", _e(_input_of(spec))),
        ("model", _e(f"{model.get('name', '-')} ({weights or '-'}), precision {model.get('precision', '-')}")),
    ]
    voc = spec.get("vocabulary") or {}
    if voc:
        src = voc.get("preset") or voc.get("file") or f"{len(voc.get('names') or [])} names"
        rows.append(
            (
                "vocabulary",
                _e(
                    f"{src}; background {voc.get('background') or []}; templates "
                    f"{voc.get('templates')}; threshold {voc.get('threshold')}"
                ),
            )
        )
    for attempt in job.get("attempts") or []:
        rows.append(
            (
                "attempt",
                _e(
                    f"{attempt.get('started_at')} → {attempt.get('finished_at')}: "
                    f"{attempt.get('processed_images')} images, {attempt.get('execute_s')} s"
                ),
            )
        )
    html_ = ["<section><h2>Run</h2>", _kv(rows)]
    counts = job.get("counts") or {}
    timings = job.get("timings") or {}
    html_.append('<div class="grid"><table><tr><th colspan="2">counts and timings (_job.json)</th></tr>')
    html_ += [f"<tr><td>{_e(k)}</td><td class='num'>{_e(v)}</td></tr>" for k, v in {**counts, **timings}.items()]
    html_.append('</table><table><tr><th colspan="2">datasets now (rows)</th></tr>')
    html_ += [f"<tr><td>{_e(k)}/</td><td class='num'>{'-' if v is None else v}</td></tr>" for k, v in d.counts.items()]
    versions = job.get("versions") or {}
    html_.append('</table><table><tr><th colspan="2">versions</th></tr>')
    html_ += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in versions.items()]
    html_.append("</table></div>")
    methods = spec.get("methods") or {}
    params = (job.get("fingerprint") or {}).get("params") or {}
    if methods:
        html_.append("<h3>Methods</h3><table><tr><th>method</th><th>params_hash</th><th>parameters</th></tr>")
        for name, m in methods.items():
            shown_params = {k: v for k, v in (m or {}).items() if k != "resources"}
            html_.append(
                f"<tr><td>{_e(name)}</td><td><code>{_e(params.get(name, '-'))}</code></td>"
                f"<td><code>{_e(json.dumps(shown_params, sort_keys=True))}</code></td></tr>"
            )
        html_.append("</table>")
    if job:
        html_.append("<details><summary>_job.json</summary><pre>" + _e(json.dumps(job, indent=2)) + "</pre></details>")
    html_.append("</section>")
    return "\n".join(html_)


def render_legend(d: ReportData) -> str:
    if not d.vocabularies:
        return "<section><h2>Class colours</h2><p class='muted'>no vocabulary/ dataset</p></section>"
    parts = ["<section><h2>Class colours</h2>"]
    ids = sorted(d.vocabularies, key=lambda v: (v not in d.used_vocabularies, v))
    for vid in ids:
        v = d.vocabularies[vid]
        methods = ", ".join(sorted(d.used_vocabularies.get(vid, ()))) or "no label maps in the sample"
        parts.append(
            f"<h3>vocabulary <code>{_e(vid)}</code> <span class='muted'>({_e(methods)}; templates "
            f"{_e(v.get('templates'))})</span></h3><div>"
        )
        parts.append(
            f'<span class="chip"><i style="background:{hex_colour(class_colour(0))}"></i>0 background '
            f"({_e(', '.join(v['background']) or 'none')})</span>"
        )
        parts += [
            f'<span class="chip"><i style="background:{hex_colour(class_colour(k))}"></i>{k} {_e(n)}</span>'
            for k, n in sorted(v["classes"].items())
        ]
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def render_shares(d: ReportData) -> str:
    parts = [
        f"<section><h2>Per-class pixel shares</h2><p class='muted'>over the label maps of the "
        f"{len(d.cards)} sampled images</p>"
    ]
    if not d.shares:
        parts.append("<p class='muted'>no label maps in the sample</p>")
    parts.append('<div class="grid">')
    for (method, vid), counts in sorted(d.shares.items()):
        names = (d.vocabularies.get(vid) or {}).get("classes", {})
        total = max(1, sum(counts.values()))
        parts.append(
            f"<table><tr><th colspan='3'>{_e(method)} <span class='muted'>(vocabulary {_e(vid)})</span>"
            "</th></tr><tr><th>class</th><th>share</th><th></th></tr>"
        )
        for label, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            name = "background" if label == 0 else names.get(label, f"label {label}")
            pct = 100 * n / total
            parts.append(
                f'<tr><td><i class="sw" style="background:{hex_colour(class_colour(label))}"></i>{label} '
                f"{_e(name)}</td><td class='num'>{pct:.2f}%</td><td><span class='bar' style='width:"
                f"{max(1, round(pct * 2))}px'></span></td></tr>"
            )
        parts.append("</table>")
    parts.append("</div></section>")
    return "\n".join(parts)


def render_errors(d: ReportData) -> str:
    parts = [
        f"<section><h2>Errors</h2><p>{d.error_rows} error rows in errors/"
        f"{'' if d.counts.get('errors') is not None else ' (no errors/ dataset)'}</p>"
    ]
    if d.errors:
        parts.append(
            "<table><tr><th>stage</th><th>reason</th><th>rows</th><th>images</th><th>methods</th><th>examples</th></tr>"
        )
        for e in d.errors:
            ex = "<br>".join(
                f"<code>{_e(x.get('image_id'))}</code>"
                f"{(' / ' + _e(x.get('region_id'))) if x.get('region_id') else ''}: {_e(x.get('message'))}"
                for x in e["examples"]
            )
            methods = ", ".join(f"{_e(m)} ({n})" for m, n in sorted(e["methods"].items()))
            parts.append(
                f"<tr><td>{_e(e['stage'])}</td><td>{_e(e['error_type'])}</td><td class='num'>{e['rows']}"
                f"</td><td class='num'>{e['images']}</td><td>{methods}</td><td>{ex}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</section>")
    return "\n".join(parts)


def render_cards(d: ReportData) -> str:
    parts = [
        f"<section><h2>Sample of images</h2><p class='muted'>{len(d.cards)} of {d.population} images "
        f"(ids from the {_e(d.population_source)}), {_e(d.selection)}</p>"
    ]
    for c in d.cards:
        size = f"{c.size[0]}×{c.size[1]}" if c.size else "size unknown"
        parts.append(
            f"<div class='card' id='img-{_e(c.image_id)}'><h3>{_e(c.image_id)} <span class='muted'>"
            f"{size} · {_e(redact_uri(c.image_uri) if c.image_uri else 'no URI')}</span></h3>"
        )
        if c.problem:
            parts.append(f"<p class='problem'>{_e(c.problem)}</p>")
        row = (
            ([_img(c.image)] if c.image else [])
            + [_img(a) for a in c.labels]
            + ([_img(c.regions)] if c.regions else [])
        )
        if row:
            parts.append('<div class="grid">' + "".join(row) + "</div>")
        for method, maps in c.heatmaps.items():
            if method == "…":
                parts.append("<p class='muted'>more heatmaps not shown (--max-heatmaps)</p>")
                continue
            parts.append(
                f"<details open><summary>{_e(method)} heatmaps ({len(maps)})</summary>"
                '<div class="grid">' + "".join(_img(a) for a in maps) + "</div></details>"
            )
        if c.region_rows:
            parts.append(
                "<details><summary>regions/ rows</summary><table><tr><th>region_id</th><th>area</th>"
                "<th>bbox</th><th>loss</th></tr>"
                + "".join(
                    f"<tr><td>{_e(r['region_id'])}</td><td class='num'>{_e(r['area'])}</td><td>"
                    f"{_e(list(r['bbox']))}</td><td class='num'>{r['loss']:.3f}</td></tr>"
                    for r in c.region_rows
                )
                + "</table></details>"
            )
        if c.errors:
            parts.append(
                "<table><tr><th>stage</th><th>reason</th><th>method</th><th>region</th><th>message</th>"
                "</tr>"
                + "".join(
                    f"<tr><td>{_e(e.get('stage'))}</td><td>{_e(e.get('error_type'))}</td>"
                    f"<td>{_e(e.get('method'))}</td><td>{_e(e.get('region_id'))}</td>"
                    f"<td>{_e(e.get('message'))}</td></tr>"
                    for e in c.errors
                )
                + "</table>"
            )
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- CLI
def run_report_cli(args: argparse.Namespace) -> int:
    """``clipmaps report`` (arguments: :func:`clipmaps.jobs.commands.add_report_parser`); returns the exit code."""
    from .cli import printer

    so: dict = {}
    try:
        so = parse_storage_options(args.storage_option)
        dest = build_report(
            args.output_uri,
            args.output,
            sample=args.sample,
            seed=args.seed,
            select=args.select,
            storage_options=so,
            max_heatmaps=args.max_heatmaps,
            progress=printer(args),
        )
    except (ConfigError, OSError, ValueError) as e:  # ReportError, SelectionError
        uris = [args.output_uri, args.output]
        print(f"clipmaps report: error: {redact_text(str(e), storage_options=so, uris=uris)}", file=sys.stderr)
        return 2
    page = join_uri(dest, "index.html")
    fs, _ = filesystem(dest, so)
    shown_page = Path(page).resolve().as_uri() if is_local(fs) else redact_uri(page)
    printer(args)(f"clipmaps report: {shown_page}")
    return 0


__all__ = ["ReportError", "build_report", "class_colour", "run_report_cli"]
