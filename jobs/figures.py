"""``clipmaps figures OUTPUT_URI``: one JPEG per method from a finished job over generated scenes (the README's
pictures). Rows are scenes; columns are the input and what the method wrote for it.

* ``gem.jpg`` / ``maskclip.jpg``: the label map over the image (class colours as in ``clipmaps report``), and for GEM
  the heatmap of each object's name;
* ``legrad.jpg``: the heatmap of each object's name;
* ``maskinversion.jpg``: each region outlined and captioned with the class its embedding is closest to (green when
  right, red when wrong).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .outputs import JobOutputs, read_image

logger = logging.getLogger(__name__)

TILE = 200  # long side of one tile in pixels


def _tile(arr: np.ndarray) -> Image.Image:
    img = Image.fromarray(arr)
    scale = TILE / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)


def _grid(rows: list[list[Image.Image]], captions: list[str]) -> Image.Image:
    """Tiles in rows, with a caption strip above the first row."""
    w = max(sum(t.width + 4 for t in r) for r in rows)
    h = sum(max(t.height for t in r) + 4 for r in rows) + 18
    out = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for cap, t in zip(captions, rows[0]):
        draw.text((x + 3, 3), cap, fill=(0, 0, 0))
        x += t.width + 4
    y = 18
    for r in rows:
        x = 0
        for t in r:
            out.paste(t, (x, y))
            x += t.width + 4
        y += max(t.height for t in r) + 4
    return out


def make_figures(output_uri: str, folder: str | Path, *, images: int = 3) -> list[Path]:
    """Write ``<method>.jpg`` for every method the job at ``output_uri`` ran, over its first ``images`` scenes."""
    from clipmaps.schemas.encodings import decode_heatmap, decode_label_map

    from .report import heat_overlay, label_overlay

    outputs = JobOutputs(output_uri)
    tables = {n: outputs.table(n) for n in ("labels", "heatmaps", "regions")}
    uris = outputs.image_uri_map()
    ids = sorted(uris)[:images]
    base = {i: np.asarray(read_image(uris[i], outputs.input_options)) for i in ids}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    labels = tables["labels"].to_pylist() if tables["labels"] is not None else []
    heatmaps = tables["heatmaps"].to_pylist() if tables["heatmaps"] is not None else []
    for method in ("gem", "maskclip", "legrad"):
        rows, captions = [], ["image"]
        for i in ids:
            row = [_tile(base[i])]
            lm = [r for r in labels if r["image_id"] == i and r["method"] == method]
            if lm:
                row.append(_tile(label_overlay(base[i], decode_label_map(lm[0]["label_map"]))))
                if len(captions) < 2:
                    captions.append("label map")
            for r in [r for r in heatmaps if r["image_id"] == i and r["method"] == method]:
                heat = decode_heatmap(r["heatmap"], r["encoding"], r["height"], r["width"])
                tile = _tile(heat_overlay(base[i], heat))
                ImageDraw.Draw(tile).text((4, tile.height - 14), r["prompt"], fill=(255, 255, 255))
                row.append(tile)
            if len(row) > 1:
                rows.append(row)
        if rows:
            captions += ["heatmap per prompt"] * (max(map(len, rows)) - len(captions))
            written.append(folder / f"{method}.jpg")
            _grid(rows, captions).save(written[-1], quality=88)
    if tables["regions"] is not None:
        written.append(folder / "maskinversion.jpg")
        _regions_figure(outputs, tables["regions"], base, written[-1])
    return written


def _regions_figure(outputs: JobOutputs, regions, base: dict[str, np.ndarray], path: Path) -> None:
    from .evaluate import class_text, load_truth
    from .synth.scenes import CLASSES

    _, text = class_text(outputs.job)
    truths = load_truth(outputs)
    rows = []
    for image_id, pixels in base.items():
        truth = truths[image_id]
        canvas = Image.fromarray(pixels.copy())
        draw = ImageDraw.Draw(canvas)
        for r in regions.to_pylist():
            if r["image_id"] != image_id or r["region_id"] not in truth.region_ids:
                continue
            k = truth.region_ids.index(r["region_id"])
            guess = CLASSES[int(np.argmax(text @ np.asarray(r["embedding"], np.float32)))]
            colour = (40, 200, 60) if guess == truth.names[k] else (220, 30, 30)
            ys, xs = np.nonzero(truth.instances == k + 1)
            draw.rectangle((xs.min(), ys.min(), xs.max(), ys.max()), outline=colour, width=3)
            draw.text((xs.min() + 2, max(0, ys.min() - 12)), guess, fill=colour)
        rows.append([_tile(pixels), _tile(np.asarray(canvas))])
    _grid(rows, ["image", "region -> nearest class"]).save(path, quality=88)


def run_figures_cli(args: argparse.Namespace) -> int:
    """``clipmaps figures`` (arguments: :func:`clipmaps.jobs.commands.add_figures_parser`); returns the exit code."""
    for path in make_figures(args.output, args.out, images=args.images):
        print(path)
    return 0
