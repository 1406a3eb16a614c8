"""``clipmaps export coco``: label maps → COCO JSON, read back by pycocotools (the reference reader)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from clipmaps.jobs.cli import main
from clipmaps.jobs.export_fiftyone import field_name, samples, to_fiftyone
from clipmaps.jobs.outputs import JobOutputs
from clipmaps.schemas.datasets import HEATMAPS, LABELS, VOCABULARY
from clipmaps.schemas.encodings import encode_heatmap, encode_label_map

CLASSES = ["cat", "dog", "car"]


def _label_maps(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = {}
    for i, (h, w) in enumerate([(40, 60), (33, 17), (50, 50)]):
        m = np.zeros((h, w), np.uint8)
        m[: h // 2, : w // 3] = 1  # cat block
        m[h // 2 :, w // 2 :] = 3  # car block
        m[rng.random((h, w)) < 0.05] = 2  # scattered dog pixels: a region of many parts
        maps[f"{100 + i}"] = m
    return maps


def _output(root: Path, maps: dict[str, np.ndarray], method: str = "maskclip", ids=None, confidence=None) -> Path:
    ids = ids or list(maps)
    confidence = confidence or {}
    rows = [
        {
            "image_id": image_id,
            "method": method,
            "model": "m",
            "weights": "w",
            "params_hash": "p",
            "height": m.shape[0],
            "width": m.shape[1],
            "label_map": encode_label_map(m),
            "confidence": encode_label_map(confidence[image_id]) if image_id in confidence else None,
            "vocabulary_id": "v1",
        }
        for image_id, m in zip(ids, maps.values(), strict=True)
    ]
    (root / "labels").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS), root / "labels" / "part-0000000-x.parquet")
    vocab = [{"vocabulary_id": "v1", "class_index": 0, "name": "background", "is_background": True,
              "templates": ["a photo of a {}."], "background_names": []}]  # fmt: skip
    vocab += [{"vocabulary_id": "v1", "class_index": i + 1, "name": n, "is_background": False,
               "templates": ["a photo of a {}."], "background_names": None} for i, n in enumerate(CLASSES)]  # fmt: skip
    (root / "vocabulary").mkdir()
    pq.write_table(pa.Table.from_pylist(vocab, schema=VOCABULARY), root / "vocabulary" / "v1.parquet")
    return root


def test_coco_export_reads_back_in_pycocotools_pixel_for_pixel(tmp_path, capsys):
    maps = _label_maps()
    out = _output(tmp_path / "out", maps)
    path = tmp_path / "ann.json"
    assert main(["export", "coco", str(out), "--method", "maskclip", "-o", str(path)]) == 0
    assert "3 images" in capsys.readouterr().out
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [100, 101, 102]  # decimal image ids are kept as COCO ids
    assert {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())} == {"cat": 1, "dog": 2, "car": 3}
    for image_id, m in maps.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(image_id)]))
        assert sorted(a["category_id"] for a in anns) == sorted(int(v) for v in np.unique(m) if v)
        info = coco.loadImgs([int(image_id)])[0]
        assert (info["height"], info["width"]) == m.shape
        for a in anns:
            decoded = coco.annToMask(a).astype(bool)
            assert np.array_equal(decoded, m == a["category_id"])
            assert a["area"] == pytest.approx(float(mask_utils.area(a["segmentation"])))
            assert a["bbox"] == pytest.approx(mask_utils.toBbox(a["segmentation"]).tolist())
            assert a["score"] == 1.0  # no confidence column: documented default
    # loadRes takes the annotations as detection results (what COCOeval scores)
    results = coco.loadRes(json.loads(path.read_text())["annotations"])
    assert len(results.getAnnIds()) == len(coco.getAnnIds())


def test_non_integer_ids_are_numbered_and_kept(tmp_path):
    maps = _label_maps()
    out = _output(tmp_path / "out", maps, ids=["b.jpg", "a.jpg", "c.jpg"])
    path = tmp_path / "ann.json"
    assert main(["export", "coco", str(out), "--method", "maskclip", "-o", str(path)]) == 0
    images = json.loads(path.read_text())["images"]
    assert sorted((i["id"], i["clipmaps_image_id"]) for i in images) == [(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")]


def test_categories_follow_the_source_file(tmp_path):
    out = _output(tmp_path / "out", _label_maps())
    source = tmp_path / "instances.json"
    source.write_text(json.dumps({"categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
                                                 {"id": 3, "name": "car", "supercategory": "vehicle"}]}))  # fmt: skip
    path = tmp_path / "ann.json"
    args = ["export", "coco", str(out), "--method", "maskclip", "-o", str(path), "--categories-from", str(source)]
    assert main(args) == 0
    doc = json.loads(path.read_text())
    assert {c["name"]: c["id"] for c in doc["categories"]} == {"cat": 17, "dog": 18, "car": 3}
    assert {a["category_id"] for a in doc["annotations"]} == {17, 18, 3}
    source.write_text(json.dumps({"categories": [{"id": 17, "name": "cat"}]}))
    assert main(args) == 2


def test_refusals_name_what_is_wrong_and_leave_no_file(tmp_path, capsys):
    out = _output(tmp_path / "out", _label_maps(), method="gem")
    path = tmp_path / "ann.json"
    assert main(["export", "coco", str(out), "--method", "maskclip", "-o", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no label maps of method 'maskclip'" in err and "gem" in err
    assert not path.exists() and not Path(f"{path}.tmp").exists()
    assert main(["export", "coco", str(tmp_path / "nothing"), "--method", "gem", "-o", str(path)]) == 2
    assert "no labels/ dataset" in capsys.readouterr().err
    assert main(["export", "coco", str(out), "--method", "legrad", "-o", str(path)]) == 2
    assert "LeGrad writes heatmaps" in capsys.readouterr().err
    assert main(["export", "coco", str(out), "-o", str(path)]) == 0  # the only label-map method: no --method needed
    assert json.loads(path.read_text())["annotations"]


def _with_heatmaps(out: Path) -> np.ndarray:
    heat = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    row = {"image_id": "100", "prompt": "a cat", "method": "gem", "model": "m", "weights": "w", "params_hash": "p",
           "height": 40, "width": 60, "encoding": "float16", "heatmap": encode_heatmap(heat, "float16")}  # fmt: skip
    (out / "heatmaps").mkdir()
    table = pa.Table.from_pylist([{f.name: row.get(f.name) for f in HEATMAPS}], schema=HEATMAPS)
    pq.write_table(table, out / "heatmaps" / "part-0000000-x.parquet")
    return heat


def test_fiftyone_samples_carry_each_label_map_and_heatmap(tmp_path):
    maps = _label_maps()
    out = _output(tmp_path / "out", maps)
    heat = _with_heatmaps(out)
    got = list(samples(JobOutputs(str(out))))
    assert [s["image_id"] for s in got] == ["100", "101", "102"]
    assert all(np.array_equal(s["labels"]["maskclip"][0], maps[s["image_id"]]) for s in got)
    assert np.abs(got[0]["heatmaps"][("gem", "a cat")] - heat).max() < 1e-3  # float16
    assert got[1]["heatmaps"] == {}
    assert field_name("gem", "a red car!") == "gem_a_red_car"


def test_fiftyone_dataset_where_fiftyone_runs(tmp_path, capsys):
    out = _output(tmp_path / "out", _label_maps())
    _with_heatmaps(out)
    try:
        import fiftyone  # noqa: F401
    except ImportError:
        # without the extra the command says what to install
        assert main(["export", "fiftyone", str(out), "--name", "t"]) == 2
        assert "pip install 'clipmaps[fiftyone]'" in capsys.readouterr().err
        pytest.skip("fiftyone is not installed here (optional extra clipmaps[fiftyone])")
    try:
        dataset = to_fiftyone(JobOutputs(str(out)), "clipmaps-test", overwrite=True)
    except Exception as e:  # FiftyOne needs MongoDB (fiftyone-db), which not every platform gets
        pytest.skip(f"FiftyOne cannot start its database here: {e}")
    assert len(dataset) == 3
    first = dataset.first()
    assert first["maskclip_labels"].mask.shape == (40, 60) and first["gem_a_cat"].map.shape == (40, 60)
    assert dataset.mask_targets["maskclip_labels"][1] == "cat"
    dataset.delete()


def test_scores_are_the_mean_confidence_of_each_region(tmp_path):
    maps = _label_maps()
    conf = {k: np.where(m == 1, 200, 100).astype(np.uint8) for k, m in maps.items()}  # cats surer than the rest
    out = _output(tmp_path / "out", maps, confidence=conf)
    path = tmp_path / "ann.json"
    assert main(["export", "coco", str(out), "--method", "maskclip", "-o", str(path)]) == 0
    scores = {(a["image_id"], a["category_id"]): a["score"] for a in json.loads(path.read_text())["annotations"]}
    assert scores[(100, 1)] == pytest.approx(200 / 255, abs=1e-6) and scores[(100, 3)] == pytest.approx(100 / 255)


def test_a_job_without_label_confidence_is_told_its_scores_are_all_one(tmp_path, caplog):
    out = _output(tmp_path / "out", _label_maps())
    (out / "_job.json").write_text(json.dumps({"spec": {"output": {"uri": str(out), "label_confidence": False}}}))
    path = tmp_path / "ann.json"
    with caplog.at_level("WARNING", logger="clipmaps.jobs.export"):
        assert main(["export", "coco", str(out), "--method", "maskclip", "-o", str(path)]) == 0
    assert {a["score"] for a in json.loads(path.read_text())["annotations"]} == {1.0}
    assert "output.label_confidence" in caplog.text
