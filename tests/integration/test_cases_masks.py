"""The shared field cases about region masks, through the real CLI: ``clipmaps manifest coco`` then ``clipmaps run``
(local Ray, the shipped ``clipmaps-synth-vit`` model), on the inputs each case's ``make_case.py`` writes.

* ``coco-polygon-degenerate-part``: a polygon list with a 2-point part keeps its real part (area and bbox as
  pycocotools' ``COCO.annToMask`` gives them).
* ``coco-point-segmentation``: a segmentation of single points costs only that region (a ``mask`` error row).
* ``coco-duplicate-annotation-id``: two annotations of one image sharing an id cost only the later one; the image
  keeps its label map and heatmaps; also when it is the only image with masks (the spec check is about the column).

Each test also runs the case's own ``check.py`` on the output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from clipmaps.jobs.cli import main

CASES = Path(__file__).resolve().parents[3] / "shared" / "cases"

pytestmark = pytest.mark.skipif(not CASES.is_dir(), reason=f"the shared cases are not at {CASES}")


def make_case(name: str, work: Path) -> Path:
    """Run the case's ``make_case.py`` into ``work``; returns ``work``."""
    subprocess.run([sys.executable, str(CASES / name / "make_case.py"), str(work)], check=True, capture_output=True)
    return work


def manifest_and_run(work: Path, monkeypatch) -> int:
    """``clipmaps manifest coco coco.json . -o manifest.jsonl`` then ``clipmaps run job.yaml`` in ``work``, as the
    case's README runs them; returns the run's exit code.

    The run starts (and stops) its own local Ray from ``work``: the manifest's image URIs and the spec's paths are
    relative to it, and Ray workers resolve them against the directory Ray was started from, so the shared
    ``ray_local`` fixture (started elsewhere) would read and write in the wrong place."""
    monkeypatch.chdir(work)
    assert main(["manifest", "coco", "coco.json", ".", "-o", "manifest.jsonl"]) == 0
    return main(["run", "job.yaml"])


def read(work: Path, name: str) -> list[dict]:
    path = work / "out" / name
    return pads.dataset(str(path), format="parquet").to_table().to_pylist() if path.exists() else []


def case_check(name: str, work: Path) -> subprocess.CompletedProcess:
    """The case's own ``check.py`` on ``work/out`` (exit 0 = its right value)."""
    return subprocess.run(
        [sys.executable, str(CASES / name / "check.py"), "out"], cwd=work, capture_output=True, text=True
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_polygon_with_a_degenerate_part(tmp_path, monkeypatch, capsys):
    coco_api = pytest.importorskip("pycocotools.coco")
    work = make_case("coco-polygon-degenerate-part", tmp_path / "work")
    ref = coco_api.COCO(str(work / "coco.json"))
    want = {str(a): int(ref.annToMask(ref.anns[a]).sum()) for a in (10, 12)}
    assert want == {"10": 864, "12": 576}
    assert manifest_and_run(work, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "1 polygon part(s) are degenerate" in printed and "image 1 annotation 10 part 1 (2 point(s)" in printed
    regions = {r["region_id"]: (r["area"], list(r["bbox"])) for r in read(work, "regions")}
    assert regions["10"] == (want["10"], [24, 18, 24, 36])
    assert regions["12"] == (want["12"], [60, 24, 24, 24])
    assert [e for e in read(work, "errors") if e["region_id"] == "10"] == []
    checked = case_check("coco-polygon-degenerate-part", work)
    assert checked.returncode == 0, checked.stdout


def test_point_segmentation(tmp_path, monkeypatch):
    work = make_case("coco-point-segmentation", tmp_path / "work")
    assert manifest_and_run(work, monkeypatch) == 0
    labels, regions, errors = read(work, "labels"), read(work, "regions"), read(work, "errors")
    assert [(r["image_id"], r["method"]) for r in labels] == [("1", "gem")]
    assert [r["region_id"] for r in regions] == ["12"]
    (err,) = [e for e in errors if e["region_id"] == "11"]
    assert (err["stage"], err["error_type"]) == ("mask", "MalformedPolygon")
    assert "part 0: 1 point(s)" in err["message"] and "part 1: 1 point(s)" in err["message"]
    checked = case_check("coco-point-segmentation", work)
    assert checked.returncode == 0, checked.stdout


def test_duplicate_annotation_id(tmp_path, monkeypatch, capsys):
    work = make_case("coco-duplicate-annotation-id", tmp_path / "work")
    assert manifest_and_run(work, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "1 annotation(s) repeat an id" in printed and "image 1 annotation 7" in printed
    labels, heat, regions, errors = (read(work, n) for n in ("labels", "heatmaps", "regions", "errors"))
    assert sorted(r["image_id"] for r in labels) == ["1", "2"]
    assert {r["image_id"] for r in heat} == {"1", "2"}
    # the first annotation 7 (the red box) is embedded; the second is the only cost of the clash
    assert sorted((r["image_id"], r["region_id"], r["area"]) for r in regions) == [("1", "7", 864), ("2", "8", 864)]
    assert [(e["image_id"], e["region_id"], e["stage"], e["error_type"]) for e in errors] == [
        ("1", "7", "mask", "DuplicateRegionId")
    ]
    checked = case_check("coco-duplicate-annotation-id", work)
    assert checked.returncode == 0, checked.stdout


def test_duplicate_annotation_id_on_the_only_image(tmp_path, monkeypatch):
    """Without the case's clean second image the job used to stop with "the manifest has no 'masks' column"."""
    work = make_case("coco-duplicate-annotation-id", tmp_path / "work")
    coco = json.loads((work / "coco.json").read_text())
    coco["images"] = [i for i in coco["images"] if i["id"] == 1]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == 1]
    (work / "coco.json").write_text(json.dumps(coco))
    assert manifest_and_run(work, monkeypatch) == 0
    assert [r["image_id"] for r in read(work, "labels")] == ["1"]
    assert [(r["region_id"], r["area"]) for r in read(work, "regions")] == [("7", 864)]
    assert [(e["region_id"], e["error_type"]) for e in read(work, "errors")] == [("7", "DuplicateRegionId")]
    checked = case_check("coco-duplicate-annotation-id", work)
    assert checked.returncode == 0, checked.stdout
