"""The bad-input matrix: 31 kinds of broken or odd input, all through ONE real pipeline run (local Ray, GEM and
MaskInversion), each with its expected outcome — processed correctly, or an error row that names the stage and the
reason — and no input silently dropped. Then the CLI: an empty manifest, a manifest without its required columns,
``run.max_error_fraction`` on both sides, and a changed spec refused unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from clipmaps.jobs.cli import build_parser, main
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.encodings import decode_label_map, rle_encode
from tests.helpers.data_images import (
    jpeg_with_orientation,
    marked_rgb,
    png_claiming_size,
    png_mask,
    save,
    truncated_jpeg,
)
from tests.helpers.specs import JOB_SPEC

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
PROMPT = "red square"


@dataclass
class Case:
    """One manifest row (or two, for duplicates) and what must become of it.

    ``outcome``: ``ok`` (label map of ``size`` = (h, w), one heatmap, ``regions`` regions, no error row), ``error``
    (an error row with ``stage``/``error_type``, no result rows) or ``mask_error`` (results as ``ok``, plus one
    ``mask`` error row for region ``region_id``; with no region left, also MaskInversion's ``NoMasks``)."""

    name: str
    outcome: str
    stage: str | None = None
    error_type: str | None = None
    size: tuple[int, int] | None = None
    regions: int = 0
    region_id: str | None = None
    skip: str | None = None
    rows: list[dict] = field(default_factory=list)

    @property
    def image_id(self) -> str:
        return f"case-{self.name}"


def _box(h: int, w: int, rid: str = "box") -> dict:
    m = np.zeros((h, w), bool)
    m[h // 4 : max(h // 4 + 1, 3 * h // 4), w // 4 : max(w // 4 + 1, 3 * w // 4)] = True
    return {"region_id": rid, "rle": rle_encode(m)}


def _row(case: Case, uri, masks=None, **extra) -> dict:
    return {"image_id": case.image_id, "image_uri": uri, "masks": masks, "prompts": [PROMPT], **extra}


def build_cases(folder: Path) -> list[Case]:
    """Write every case's files under ``folder``; return the cases with their manifest rows."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = 96, 72
    box = _box(h, w)
    cases: list[Case] = []

    def ok(name, path, size=(h, w), masks=None, regions=1):
        c = Case(name, "ok", size=size, regions=regions)
        c.rows = [_row(c, str(path), masks if masks is not None else [_box(*size)])]
        cases.append(c)

    def fails(name, uri, stage, error_type, skip=None):
        c = Case(name, "error", stage=stage, error_type=error_type, skip=skip)
        c.rows = [_row(c, uri, [box])]
        cases.append(c)

    def mask_fails(name, bad: dict, error_type, extra_masks=(box,)):
        c = Case(name, "mask_error", stage="mask", error_type=error_type, size=(h, w), regions=len(extra_masks),
                 region_id=bad["region_id"])  # fmt: skip
        path = save(marked_rgb(w, h), folder / f"{name}.png")
        c.rows = [_row(c, path, [*extra_masks, bad])]
        cases.append(c)

    # images that must be processed
    ok("plain_jpeg", save(marked_rgb(w, h), folder / "plain.jpg", quality=90))
    ok("cmyk_jpeg", save(marked_rgb(w, h).convert("CMYK"), folder / "cmyk.jpg", quality=90))
    gray16 = Image.fromarray((np.arange(w * h).reshape(h, w) * 9).astype(np.uint16))
    ok("png_16bit", save(gray16, folder / "gray16.png"))
    ok("grayscale", save(marked_rgb(w, h).convert("L"), folder / "gray.jpg"))
    pal = marked_rgb(w, h).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    ok("palette_transparency", save(pal, folder / "palette.png", transparency=0))
    rgba = marked_rgb(w, h).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))))
    ok("rgba_png", save(rgba, folder / "rgba.png"))
    ok("exif_rotated", jpeg_with_orientation(folder / "exif6.jpg", w, h, 6), size=(w, h))  # shown 72 wide, 96 high
    ok("one_pixel", save(marked_rgb(1, 1, block=1), folder / "one.png"), size=(1, 1),
       masks=[{"region_id": "all", "rle": rle_encode(np.ones((1, 1), bool))}])  # fmt: skip
    ok("extreme_aspect", save(marked_rgb(2000, 4, block=2), folder / "wide.png"), size=(4, 2000))
    frames = [marked_rgb(w, h), Image.new("RGB", (w, h), (0, 0, 255))]
    ok("animated_gif", save(frames[0], folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50))
    ok("unicode_spaces", save(marked_rgb(w, h), folder / "ünï cödé 图片 ✓.png"))
    cases[-1].rows[0]["image_id"] = "图片 ✓ — case unicode"
    ok("mask_full", save(marked_rgb(w, h), folder / "full.png"),
       masks=[{"region_id": "everything", "rle": rle_encode(np.ones((h, w), bool))}])  # fmt: skip
    png = np.zeros((h, w), bool)
    png[10:40, 20:60] = True
    ok(
        "mask_png_uri",
        save(marked_rgb(w, h), folder / "maskuri.png"),
        masks=[{"region_id": "png", "uri": png_mask(folder / "maskuri_mask_0.png", png)}],
    )
    ok("mask_polygon", save(marked_rgb(w, h), folder / "poly.png"),
       masks=[{"region_id": "tri", "polygon": [[10, 10, 60, 10, 30, 50]]}])  # fmt: skip

    # images that must fail, with the stage and reason
    fails("truncated_jpeg", truncated_jpeg(folder / "truncated.jpg"), "decode", "TruncatedImage")
    (folder / "empty.jpg").write_bytes(b"")
    fails("zero_byte_file", str(folder / "empty.jpg"), "decode", "EmptyFile")
    (folder / "notes.jpg").write_text("this is not an image\n")
    fails("not_an_image", str(folder / "notes.jpg"), "decode", "UnidentifiedImageError")
    fails("missing_file", str(folder / "no-such-file.jpg"), "read", "FileNotFoundError")
    (folder / "a-folder.jpg").mkdir()
    fails("directory_not_file", str(folder / "a-folder.jpg"), "read", "IsADirectoryError")
    locked = save(marked_rgb(w, h), folder / "locked.jpg")
    os.chmod(locked, 0)
    fails("permission_denied", locked, "read", "PermissionError",
          skip="running as root: chmod 000 does not deny root's reads (directory_not_file covers an unreadable "
               "path, tests/unit/test_decode.py the PermissionError mapping)" if IS_ROOT else None)  # fmt: skip
    fails("decompression_bomb", png_claiming_size(folder / "bomb.png", 12_000, 12_000), "decode", "DecompressionBomb")

    # masks that must fail while the image is processed
    wrong = {"region_id": "wrong", "rle": rle_encode(np.ones((5, 5), bool))}
    mask_fails("mask_wrong_size", wrong, "MaskSizeMismatch")
    mask_fails("mask_empty", {"region_id": "empty", "rle": rle_encode(np.zeros((h, w), bool))}, "EmptyMask")
    mask_fails("mask_uri_missing", {"region_id": "gone", "uri": str(folder / "no-such-mask.png")}, "MaskNotFound")
    bad_rle = {"region_id": "garbled", "rle": {"size": [h, w], "counts": "\x7f\x7f not RLE"}}
    mask_fails("malformed_rle", bad_rle, "MalformedRLE")
    mask_fails("only_mask_malformed", dict(bad_rle, region_id="only"), "MalformedRLE", extra_masks=())

    # rows the manifest check refuses (stage "manifest")
    c = Case("duplicate_image_id", "duplicate", stage="manifest", error_type="DuplicateImageId", size=(h, w), regions=1)
    first = save(marked_rgb(w, h), folder / "dup-first.png")
    c.rows = [_row(c, first, [box]), _row(c, save(marked_rgb(w, h), folder / "dup-second.png"), [box])]
    cases.append(c)
    c = Case("missing_image_uri", "error", stage="manifest", error_type="MissingImageUri")
    c.rows = [_row(c, None, [box])]
    cases.append(c)
    c = Case("missing_image_id", "error", stage="manifest", error_type="MissingImageId")
    c.rows = [_row(c, save(marked_rgb(w, h), folder / "anonymous.png"), [box], image_id=None)]
    cases.append(c)
    c = Case("unsupported_scheme", "error", stage="manifest", error_type="UnsupportedScheme")
    c.rows = [_row(c, "http://127.0.0.1:9/remote.jpg", [box])]
    cases.append(c)
    c = Case("mask_scheme_refused", "error", stage="manifest", error_type="UnsupportedScheme", region_id="remote")
    c.rows = [
        _row(
            c,
            save(marked_rgb(w, h), folder / "remote-mask.png"),
            [{"region_id": "remote", "uri": "http://127.0.0.1:9/m.png"}],
        )
    ]
    cases.append(c)
    return cases


CASE_NAMES = [
    "plain_jpeg", "cmyk_jpeg", "png_16bit", "grayscale", "palette_transparency", "rgba_png", "exif_rotated",
    "one_pixel", "extreme_aspect", "animated_gif", "unicode_spaces", "mask_full", "mask_png_uri", "mask_polygon",
    "truncated_jpeg", "zero_byte_file", "not_an_image", "missing_file", "directory_not_file", "permission_denied",
    "decompression_bomb", "mask_wrong_size", "mask_empty", "mask_uri_missing", "malformed_rle",
    "only_mask_malformed", "duplicate_image_id", "missing_image_uri", "missing_image_id", "unsupported_scheme",
    "mask_scheme_refused",
]  # fmt: skip


def job_sets(manifest, out, *extra: str) -> list[str]:
    return [
        f"input.manifest={manifest}", f"output.uri={out}", "output.overwrite=false", "output.shard_rows=8",
        "methods.maskclip=null", "methods.legrad=null", "methods.gem.size=64", "methods.gem.original=false",
        "methods.maskinversion.size=64",
        "methods.maskinversion.iterations=5", "methods.gem.resources.batch_size=4",
        "methods.maskinversion.resources.batch_size=4", "run.max_error_fraction=1.0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Build every case, run the pipeline once on a local Ray (kept up for the CLI tests of this module)."""
    import ray

    from clipmaps.pipeline.run import run

    folder = tmp_path_factory.mktemp("bad-inputs")
    cases = build_cases(folder / "in")
    assert sorted(c.name for c in cases) == sorted(CASE_NAMES)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for c in cases for r in c.rows))
    out = folder / "out"
    spec = load_spec(JOB_SPEC, overrides=job_sets(manifest, out))
    job = folder / "job.yaml"
    job.write_text(spec.to_yaml(redact=False))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = run(spec)
        tables = {n: pads.dataset(out / n, format="parquet").to_table() for n in ("labels", "heatmaps", "regions",
                                                                                   "errors")}  # fmt: skip
        yield {"cases": {c.name: c for c in cases}, "result": result, "tables": tables, "job": job, "out": out,
               "rows": sum(len(c.rows) for c in cases)}  # fmt: skip
    finally:
        ray.shutdown()


def _rows(table, **where) -> list[dict]:
    return [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_outcome(matrix, name):
    case: Case = matrix["cases"][name]
    if case.skip:
        pytest.skip(case.skip)
    t = matrix["tables"]
    image_id = case.rows[0]["image_id"]
    if image_id is None:  # found by its URI
        errors = _rows(t["errors"], image_id=None, uri=case.rows[0]["image_uri"])
    else:
        errors = _rows(t["errors"], image_id=image_id)
    labels, heatmaps = _rows(t["labels"], image_id=image_id), _rows(t["heatmaps"], image_id=image_id)
    regions = _rows(t["regions"], image_id=image_id)
    found = sorted((e["stage"], e["error_type"], e["region_id"]) for e in errors)
    if case.outcome == "error":
        assert found == [(case.stage, case.error_type, case.region_id)], found  # a refused mask keeps its id
        assert errors[0]["message"] and not labels and not heatmaps and not regions
        return
    # processed: one label map of the expected size, one heatmap (one prompt), the regions
    assert len(labels) == 1 and len(heatmaps) == 1, (len(labels), len(heatmaps), found)
    assert (labels[0]["height"], labels[0]["width"]) == case.size
    assert decode_label_map(labels[0]["label_map"]).shape == case.size
    assert len(regions) == case.regions
    if case.outcome == "ok":
        assert not errors, found
    elif case.outcome == "mask_error":
        expected = [("mask", case.error_type, case.region_id)]
        if case.regions == 0:  # nothing left to embed
            expected.append(("model", "NoMasks", None))
        assert found == sorted(expected)
        assert case.region_id in errors[0]["message"] or errors[0]["message"]
    elif case.outcome == "duplicate":  # the first row processed, the second refused
        assert found == [("manifest", "DuplicateImageId", None)]
        assert errors[0]["uri"] == case.rows[1]["image_uri"]
    if name == "mask_full":
        assert regions[0]["area"] == case.size[0] * case.size[1]


def test_no_input_is_silently_dropped(matrix):
    t, result = matrix["tables"], matrix["result"]
    assert result.total == matrix["rows"] and result.processed == matrix["rows"]
    seen_ids = set(t["labels"].column("image_id").to_pylist()) | set(t["errors"].column("image_id").to_pylist())
    seen_uris = set(t["errors"].column("uri").to_pylist())
    for case in matrix["cases"].values():
        for row in case.rows:
            assert row["image_id"] in seen_ids or row["image_uri"] in seen_uris, (case.name, row["image_uri"])
    # every manifest row has exactly its outcome: result rows for the processed ones, error rows for the others
    failed = {e["image_id"] for e in t["errors"].to_pylist()}
    assert result.errors == len(failed)


@pytest.mark.parametrize(("threshold", "code"), [(0.9, 0), (0.1, 3)])
def test_exit_code_follows_max_error_fraction(matrix, threshold, code, capsys):
    """Re-running the finished job (nothing left to do) recomputes the error fraction; the exit code tells whether
    it is above ``run.max_error_fraction``."""
    frac = matrix["result"].error_fraction
    assert 0.1 < frac < 0.9
    assert main(["run", str(matrix["job"]), "--set", f"run.max_error_fraction={threshold}"]) == code
    captured = capsys.readouterr()
    if code:
        assert "is above run.max_error_fraction" in captured.err
    assert "images with errors" in captured.out


def test_a_changed_spec_is_refused_unless_overwrite(matrix, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(matrix["out"], out)
    sets = ["--set", f"output.uri={out}", "--set", "methods.gem.depth=5"]
    assert main(["run", str(matrix["job"]), *sets]) == 2
    err = capsys.readouterr().err
    assert "methods.gem.depth: 7 → 5" in err and "--overwrite" in err and "resume" not in err
    assert build_parser().parse_args(["run", "job.yaml", "--overwrite"]).overwrite
    # --overwrite replaces the old results (two rows of the manifest keep the run short)
    assert main(["run", str(matrix["job"]), *sets, "--overwrite", "--set", "input.limit=2"]) == 0
    job = json.loads((out / "_job.json").read_text())
    assert len(job["attempts"]) == 1 and job["counts"]["images"] == 2
    assert pads.dataset(out / "labels", format="parquet").count_rows() == 2


def _manifest_spec(tmp_path: Path, manifest: Path) -> Path:
    spec = load_spec(JOB_SPEC, overrides=job_sets(manifest, tmp_path / "out"))
    path = tmp_path / "job.yaml"
    path.write_text(spec.to_yaml(redact=False))
    return path


def test_empty_manifest_is_a_clear_error(tmp_path, capsys):
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("")
    assert main(["run", str(_manifest_spec(tmp_path, manifest))]) == 2
    err = capsys.readouterr().err
    assert "manifest" in err and "empty" in err and "Traceback" not in err


def test_manifest_missing_columns_is_a_clear_error(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image_id": "a", "uri": "x.jpg"}) + "\n")
    assert main(["run", str(_manifest_spec(tmp_path, manifest))]) == 2
    err = capsys.readouterr().err
    assert "missing required column(s) image_uri" in err
