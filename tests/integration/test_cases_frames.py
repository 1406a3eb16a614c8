"""The annotation's frame against the decoded frame, through the real CLI: ``clipmaps manifest coco`` then
``clipmaps run`` (local Ray, the shipped ``clipmaps-synth-vit`` model, GEM + MaskInversion).

A phone photo stored 96x64 with EXIF orientation 6 (shown 64x96), annotated by a tool that ignores EXIF: COCO declares
the stored size and the polygon and RLE are in the stored pixels. The regions must cover the drawn object in the image
as decoded (``input.annotation_frame: auto``). A second image declares a size no orientation explains: its masks are
``mask`` error rows naming each region, both sizes and the tag, while it keeps its label map and heatmaps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image, ImageOps

from clipmaps.jobs.cli import main
from clipmaps.pipeline.sources import read_manifest_table
from clipmaps.schemas.encodings import rle_encode
from tests.helpers.data_images import find_box, jpeg_with_box

STORED_W, STORED_H = 96, 64
BOX = (16, 8, 48, 32)  # x0, y0, x1, y1 in the stored pixels (on the 8-pixel JPEG grid)

JOB = """input: {manifest: manifest.jsonl}
output: {uri: out, overwrite: true}
model: {name: clipmaps-synth-vit, pretrained: synth-shapes-v1}
vocabulary: {names: [red square, green square], background: [background]}
methods:
  gem: {size: 64}
  maskinversion: {size: 64, iterations: 3}
run: {max_error_fraction: 1.0}
"""


def make_case(work: Path) -> np.ndarray:
    """Write the two photos, ``coco.json`` and ``job.yaml`` into ``work``; returns the object's pixels in the
    decoded (oriented) photo, found by colour."""
    work.mkdir(parents=True)
    rotated = jpeg_with_box(work / "rotated.jpg", STORED_W, STORED_H, 6, BOX)
    jpeg_with_box(work / "wrong.jpg", STORED_W, STORED_H, 6, BOX)
    stored = np.zeros((STORED_H, STORED_W), bool)
    x0, y0, x1, y1 = BOX
    stored[y0:y1, x0:x1] = True
    polygon = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    coco = {
        "images": [
            {"id": 1, "file_name": "rotated.jpg", "width": STORED_W, "height": STORED_H},  # the stored frame
            {"id": 2, "file_name": "wrong.jpg", "width": 80, "height": 80},  # no orientation explains it
        ],
        "categories": [{"id": 1, "name": "box"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": polygon},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle_encode(stored)},
            {"id": 20, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": polygon},
        ],
    }
    (work / "coco.json").write_text(json.dumps(coco))
    (work / "job.yaml").write_text(JOB)
    return find_box(ImageOps.exif_transpose(Image.open(rotated)))


def read(work: Path, name: str) -> list[dict]:
    path = work / "out" / name
    return pads.dataset(str(path), format="parquet").to_table().to_pylist() if path.exists() else []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_rotated_photo_annotated_on_its_stored_frame(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    truth = make_case(work)
    ys, xs = np.nonzero(truth)
    want_bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
    assert truth.shape == (STORED_W, STORED_H) and int(truth.sum()) == 32 * 24  # shown 64 wide, 96 tall
    assert want_bbox == [32, 16, 24, 32]  # x 16…47 in the file is y 16…47 shown; y 8…31 is x 32…55

    # the run starts its own local Ray from ``work``: the manifest's URIs and the spec's paths are relative to it
    monkeypatch.chdir(work)
    assert main(["manifest", "coco", "coco.json", ".", "-o", "manifest.jsonl"]) == 0
    manifest = {r["image_id"]: r for r in read_manifest_table("manifest.jsonl").to_pylist()}
    assert (manifest["1"]["width"], manifest["1"]["height"]) == (96, 64)
    assert (manifest["2"]["width"], manifest["2"]["height"]) == (80, 80)
    assert main(["run", "job.yaml"]) == 0

    regions = {r["region_id"]: r for r in read(work, "regions")}
    assert sorted(regions) == ["10", "11"]
    for rid in ("10", "11"):  # the polygon (declared stored size) and the RLE (its own stored size)
        assert (regions[rid]["image_id"], regions[rid]["area"], list(regions[rid]["bbox"])) == (
            "1",
            int(truth.sum()),
            want_bbox,
        )
    errors = read(work, "errors")
    # the region's error, and MaskInversion's note that the image was left with no mask to embed
    assert sorted((e["image_id"], e["region_id"] or "", e["stage"], e["error_type"]) for e in errors) == [
        ("2", "", "model", "NoMasks"),
        ("2", "20", "mask", "MaskSizeMismatch"),
    ]
    (message,) = [e["message"] for e in errors if e["region_id"] == "20"]
    assert "declared size [H, W] = [80, 80]" in message and "[96, 64] as decoded" in message, message
    assert "[64, 96] as stored" in message and "EXIF orientation 6" in message, message
    # both images keep their label maps and heatmaps, at the decoded size
    labels = {r["image_id"]: (r["height"], r["width"]) for r in read(work, "labels")}
    assert labels == {"1": (96, 64), "2": (96, 64)}
    assert {r["image_id"] for r in read(work, "heatmaps")} == {"1", "2"}
    # the option is part of MaskInversion's fingerprint: another frame is refused, naming it
    capsys.readouterr()
    assert main(["run", "job.yaml", "--set", "input.annotation_frame=oriented", "--set", "output.overwrite=false"]) == 2
    refused = "".join(capsys.readouterr())
    assert 'methods.maskinversion.annotation_frame: "auto" → "oriented"' in refused, refused
