"""``clipmaps report``: a static HTML report, checked in a real headless browser (Debian's chromium).

The output is written here with the real schemas (no pipeline run): three sample scenes with RLE, polygon and
PNG masks, label maps of two methods, png8 and float16 heatmaps, regions, error rows, the vocabulary and a
``_job.json``, plus one image whose file is missing. Chromium loads the page from disk, the page's script
reports every ``<img>`` that did not render, and the screenshot must not be blank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipmaps.jobs.cli import main
from clipmaps.jobs.report import build_report, class_colour
from clipmaps.jobs.synth.scenes import make_scene
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.datasets import ERRORS, HEATMAPS, LABELS, VOCABULARY
from clipmaps.schemas.encodings import encode_heatmap, encode_label_map, mask_bbox, rle_encode
from tests.helpers.outputs import regions_table, unit

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ensure_chromium() -> str:
    """The chromium executable; installed with apt-get (Debian's ``chromium``) when missing. Skips the test
    with the reason when it cannot be had (no apt-get, not root, the install failed)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip(
            "chromium is not installed and apt-get is not available to install it "
            "(install a chromium browser to run the report's browser test)"
        )
    if os.geteuid() != 0:
        pytest.skip(
            "chromium is not installed and installing it with apt-get needs root "
            "(run: sudo apt-get install -y chromium)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = ""
    for cmd in (
        ["apt-get", "install", "-y", "-qq", "chromium"],
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "chromium"],
    ):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        log = (r.stdout + r.stderr)[-800:]
        if cmd[1] == "install" and r.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip(f"chromium is not installed and `apt-get install -y chromium` failed: {log}")


VOCAB = [
    "red circle",
    "red square",
    "green circle",
    "green square",
    "blue triangle",
    "yellow circle",
    "purple square",
    "orange triangle",
]


def label_map_for(scene, names: list[str]) -> np.ndarray:
    labels = np.zeros(scene.masks.shape[1:], np.uint8)
    for name, m in zip(scene.names, scene.masks):
        labels[m] = names.index(name) + 1 if name in names else len(names)
    return labels


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    images, out = root / "input", root / "output"
    images.mkdir()
    rows, labels, heatmaps, regions, errors = [], [], [], [], []
    prov = {"model": "clipmaps-tiny-vit", "weights": "random:seed=0"}
    for i in range(3):
        scene = make_scene(i)
        names = sorted(set(VOCAB) | set(scene.names))
        path = images / f"scene-{i}.jpg"
        scene.image.save(path, quality=90)
        masks = []
        for k, (name, m) in enumerate(zip(scene.names, scene.masks)):
            rid = name.replace(" ", "-")
            if i == 1 and k == 0:  # a polygon: the mask's bounding box
                x, y, w, h = mask_bbox(m)
                masks.append({"region_id": rid, "polygon": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            elif i == 1 and k == 1:  # a PNG mask file
                Image.fromarray(m.astype(np.uint8) * 255).save(images / f"scene-{i}-{rid}.png")
                masks.append({"region_id": rid, "uri": str(images / f"scene-{i}-{rid}.png")})
            else:
                masks.append({"region_id": rid, "rle": rle_encode(m)})
            regions.append((f"scene-{i}", rid, m))
        rows.append({"image_id": f"scene-{i}", "image_uri": str(path), "masks": masks, "prompts": scene.names})
        lm = label_map_for(scene, names)
        h, w = lm.shape
        for method, vid in (("gem", "voc-photo"), ("maskclip", "voc-85")):
            labels.append(
                {
                    "image_id": f"scene-{i}",
                    "method": method,
                    **prov,
                    "params_hash": f"{method}-hash",
                    "height": h,
                    "width": w,
                    "label_map": encode_label_map(lm),
                    "vocabulary_id": vid,
                }
            )
        yy, xx = np.mgrid[0:h, 0:w]
        for p, (name, m) in enumerate(zip(scene.names, scene.masks)):
            heat = np.clip(0.2 + 0.8 * m + 0.1 * np.sin(xx / 9.0 + p), 0, 1).astype(np.float32)
            heatmaps.append(
                {
                    "image_id": f"scene-{i}",
                    "prompt": name,
                    "method": "gem",
                    **prov,
                    "params_hash": "gem-hash",
                    "height": h,
                    "width": w,
                    "encoding": "png8",
                    "heatmap": encode_heatmap(heat, "png8"),
                }
            )
            heatmaps.append(
                {
                    "image_id": f"scene-{i}",
                    "prompt": name,
                    "method": "legrad",
                    **prov,
                    "params_hash": "legrad-hash",
                    "height": h,
                    "width": w,
                    "encoding": "float16",
                    "heatmap": encode_heatmap(3 * heat - 1, "float16"),
                }
            )
    rows.append({"image_id": "missing", "image_uri": str(images / "missing.jpg")})
    errors.append(
        {
            "image_id": "missing",
            "uri": str(images / "missing.jpg"),
            "method": None,
            "region_id": None,
            "stage": "read",
            "error_type": "FileNotFoundError",
            "message": "missing.jpg: not found",
        }
    )
    errors.append(
        {
            "image_id": "scene-2",
            "uri": str(images / "scene-2.jpg"),
            "method": "maskinversion",
            "region_id": "x",
            "stage": "mask",
            "error_type": "EmptyMask",
            "message": "the mask has no pixels inside the image",
        }
    )
    manifest = images / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    for name in ("labels", "heatmaps", "regions", "errors", "vocabulary"):
        (out / name).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(labels, schema=LABELS), out / "labels" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(heatmaps, schema=HEATMAPS), out / "heatmaps" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS), out / "errors" / "part-0.parquet")
    vecs = unit(np.random.default_rng(0).standard_normal((len(regions), 32)))
    reg = regions_table(vecs, [r[0] for r in regions], [r[1] for r in regions])
    bbox = pa.FixedSizeListArray.from_arrays(
        pa.array(np.array([mask_bbox(r[2]) for r in regions]).reshape(-1), pa.int32()), 4
    )
    reg = reg.set_column(reg.schema.get_field_index("bbox"), reg.schema.field("bbox"), bbox)
    pq.write_table(reg, out / "regions" / "part-0.parquet")
    vocab = []
    for vid, templates in (("voc-photo", ["photo"]), ("voc-85", ["ensemble85"])):
        names = sorted(set(VOCAB) | {n for i in range(3) for n in make_scene(i).names})
        vocab.append(
            {
                "vocabulary_id": vid,
                "class_index": 0,
                "name": "background",
                "is_background": True,
                "templates": templates,
            }
        )
        vocab += [
            {"vocabulary_id": vid, "class_index": k + 1, "name": n, "is_background": False, "templates": templates}
            for k, n in enumerate(names)
        ]
        vocab += [
            {"vocabulary_id": vid, "class_index": 0, "name": n, "is_background": True, "templates": templates}
            for n in ("ground", "sky")
        ]
    pq.write_table(pa.Table.from_pylist(vocab, schema=VOCABULARY), out / "vocabulary" / "voc.parquet")

    from tests.helpers.specs import JOB_SPEC

    spec = load_spec(JOB_SPEC, overrides=[f"input.manifest={manifest}", f"output.uri={out}"])
    (out / "_job.json").write_text(
        json.dumps(
            {
                "spec": spec.to_dict(),
                "status": "finished",
                "ok": True,
                "counts": {"images": 4, "processed": 3, "failed_images": 1, "rows_errors": 2},
                "timings": {"total_s": 12.5},
                "versions": {"clipmaps": "0.1.0"},
                "fingerprint": {"params": {"gem": "gem-hash"}},
            }
        )
    )
    return out


@pytest.fixture(scope="module")
def report(output, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rendered") / "report"
    assert main(["report", str(output), "-o", str(folder), "--sample", "10"]) == 0
    return folder


def img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_page_is_self_contained(report):
    page = (report / "index.html").read_text()
    srcs = img_sources(page)
    # 3 scenes × (image + 2 label maps + regions + 3 gem + 3 legrad heatmaps); the missing image has none
    assert len(srcs) == 30
    for src in srcs:
        assert src.startswith("assets/") and (report / src).stat().st_size > 100
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load anything remote"
    assert "<script src" not in page and "<link" not in page


def test_page_content(report):
    page = (report / "index.html").read_text()
    # run metadata, dataset row counts, methods with their hashes
    assert "clipmaps-tiny-vit (random:seed=0)" in page and "gem-hash" in page
    assert "<td>labels/</td><td class='num'>6</td>" in page
    # the legend: class colours of both vocabularies, background names once each
    assert "voc-photo" in page and "voc-85" in page
    assert "0 background (background, ground, sky)" in page
    c = class_colour(1)
    assert f"#{c[0]:02x}{c[1]:02x}{c[2]:02x}" in page
    # pixel shares and errors by reason
    assert "Per-class pixel shares" in page and re.search(r"\d+\.\d\d%", page)
    assert "FileNotFoundError" in page and "EmptyMask" in page
    # the missing image is reported on its card, not drawn as a broken image
    assert "image not readable" in page
    # heatmaps per method and prompt, region masks from RLE, polygon and PNG
    assert "gem heatmaps (3)" in page and "legrad heatmaps (3)" in page
    assert page.count("<figcaption>3 masks (manifest), 3 regions/ rows") == 3
    assert "not decodable" not in page and "<td>report</td>" not in page  # every map and mask decoded


def test_every_image_renders_in_chromium(report, tmp_path):
    exe = ensure_chromium()
    url = (report / "index.html").resolve().as_uri()
    common = [
        exe,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2000",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    tag = re.search(r'<p id="img-check"[^>]*>[^<]*', dom.stdout)
    assert tag, "the page's image check did not run:\n" + dom.stdout[-1000:]
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', tag.group(0)))
    assert attrs.get("data-loaded") == "true", tag.group(0)
    assert attrs.get("data-broken") == "0", tag.group(0)
    assert int(attrs["data-total"]) == len(img_sources((report / "index.html").read_text())) == 30

    shot = tmp_path / "report.png"
    r = subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[:2] == (2000, 1280)
    colours = np.unique(arr.reshape(-1, 3), axis=0)
    assert len(colours) > 1000, f"the screenshot looks blank: {len(colours)} colours"
    assert arr.std() > 20
    a = arr.astype(int)
    page_bg = np.all(np.abs(a - [245, 245, 247]) < 6, -1) | np.all(a > 250, -1)
    assert 1 - page_bg.mean() > 0.1, "the screenshot is mostly empty page"
    saturated = (a.max(-1) - a.min(-1)) > 80  # legend swatches, images, overlays: colour, not just text
    assert saturated.mean() > 0.005
    shutil.copyfile(shot, report / "screenshot.png")  # kept next to the report for a look


def test_sample_seed_and_default_location(output, tmp_path):
    """--sample picks that many images (deterministically per seed); the default folder is OUTPUT/report."""
    dest = build_report(str(output), sample=2, seed=1)
    page = (Path(dest) / "index.html").read_text()
    assert "2 of 4 images (ids from the manifest)" in page
    again = build_report(str(output), str(tmp_path / "again"), sample=2, seed=1)
    cards = re.findall(r"<div class='card' id='img-([^']+)'>", page)
    assert cards == re.findall(r"<div class='card' id='img-([^']+)'>", (Path(again) / "index.html").read_text())
    assert len(cards) == 2


def test_ensure_chromium_skips_with_a_reason_without_apt(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="apt-get is not available to install it"):
        ensure_chromium()


def test_report_of_an_s3_output(s3, output, tmp_path):
    """Datasets and _job.json on S3 (the images stay local, as the manifest names them): the report is written
    to a local folder with -o, and by default uploaded to OUTPUT_URI/report."""
    fs = s3.filesystem()
    for name in ("labels", "heatmaps", "regions", "errors", "vocabulary"):
        fs.put(str(output / name) + "/", f"clipmaps/report-test/{name}/", recursive=True)
    fs.put_file(str(output / "_job.json"), "clipmaps/report-test/_job.json")
    uri = "s3://clipmaps/report-test"
    local = build_report(uri, str(tmp_path / "local"), sample=1, storage_options=s3.storage_options)
    page = (Path(local) / "index.html").read_text()
    assert "1 of 4 images" in page and "s3://clipmaps/report-test" in page
    assert all((Path(local) / src).exists() for src in img_sources(page))
    dest = build_report(uri, sample=1, storage_options=s3.storage_options)
    assert dest == "s3://clipmaps/report-test/report"
    assert fs.exists("clipmaps/report-test/report/index.html")
    assert len(fs.ls("clipmaps/report-test/report/assets")) == len(img_sources(page))
