"""The output's dataset card: ``datasets.load_dataset(OUTPUT, name)`` loads each dataset, PNG columns as images."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmaps.schemas.card import dataset_card, feature
from clipmaps.schemas.datasets import DATASETS, HEATMAPS, LABELS, regions_schema
from clipmaps.schemas.encodings import encode_heatmap, encode_label_map
from clipmaps.schemas.storage import write_table
from tests.helpers.outputs import unit


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """``rows`` with every column of ``schema`` (columns a row leaves out are null: the card tracks the schema)."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _empty(schema: pa.Schema, path) -> None:
    """A 0-row file as the pipeline writes it (the storage module's writer: schema, no row group)."""
    write_table(schema.empty_table(), fsspec.filesystem("file"), str(path))


def _write_output(root, dim: int = 8):
    (root / "labels").mkdir(parents=True)
    m = np.zeros((12, 20), np.uint8)
    m[3:9, 4:15] = 2
    prov = {"method": "maskclip", "model": "m", "weights": "w", "params_hash": "p"}
    labels = [{"image_id": "a", **prov, "height": 12, "width": 20, "label_map": encode_label_map(m),
               "vocabulary_id": "v"}]  # fmt: skip
    pq.write_table(_table(labels, LABELS), root / "labels" / "part-0000000-x.parquet")
    _empty(LABELS, root / "labels" / "part-empty.parquet")
    (root / "heatmaps").mkdir()
    heat = np.linspace(0, 1, 12 * 20, dtype=np.float32).reshape(12, 20)
    hrows = [{"image_id": "a", "prompt": "a cat", **prov, "height": 12, "width": 20, "encoding": "png8",
              "heatmap": encode_heatmap(heat, "png8")}]  # fmt: skip
    pq.write_table(_table(hrows, HEATMAPS), root / "heatmaps" / "part-0000000-x.parquet")
    (root / "regions").mkdir()
    regions = [{"image_id": "a", "region_id": f"r{i}", **prov, "embedding": unit(np.ones(dim)).tolist(), "area": 4,
                "bbox": [0, 0, 2, 2], "loss": 0.1} for i in range(2)]  # fmt: skip
    pq.write_table(_table(regions, regions_schema(dim)), root / "regions" / "part-0000000-x.parquet")
    extra = {
        "errors": {"image_id": "b", "uri": "b.jpg", "stage": "read", "error_type": "FileNotFoundError",
                   "message": "b.jpg: not found"},
        "vocabulary": {"vocabulary_id": "v", "class_index": 0, "name": "background", "is_background": True,
                       "templates": ["{}"]},
    }  # fmt: skip
    for name, row in extra.items():
        (root / name).mkdir()
        _empty(DATASETS[name], root / name / "part-empty.parquet")
        pq.write_table(_table([row], DATASETS[name]), root / name / "part-0000000-x.parquet")
    schemas = {
        **{n: DATASETS[n] for n in ("labels", "heatmaps", "errors", "vocabulary")},
        "regions": regions_schema(dim),
    }
    (root / "README.md").write_text(dataset_card(schemas, heatmap_encoding="png8", title="test output"))
    return m, heat


def test_every_dataset_loads_by_name_with_images_decoded(tmp_path):
    datasets = pytest.importorskip("datasets")
    m, heat = _write_output(tmp_path / "out")
    cache = str(tmp_path / "hf-cache")
    labels = datasets.load_dataset(str(tmp_path / "out"), "labels", split="train", cache_dir=cache)
    assert labels.num_rows == 1 and labels.features["label_map"] == datasets.Image()
    assert np.array_equal(np.asarray(labels[0]["label_map"]), m)  # a PIL image with the class indices
    heatmaps = datasets.load_dataset(str(tmp_path / "out"), "heatmaps", split="train", cache_dir=cache)
    assert np.abs(np.asarray(heatmaps[0]["heatmap"]) / 255.0 - heat).max() <= 0.5 / 255 + 1e-6
    regions = datasets.load_dataset(str(tmp_path / "out"), "regions", split="train", cache_dir=cache)
    assert regions.num_rows == 2 and len(regions[0]["embedding"]) == 8
    for name in ("errors", "vocabulary"):  # beside the 0-row schema file every dataset has
        ds = datasets.load_dataset(str(tmp_path / "out"), name, split="train", cache_dir=cache)
        assert ds.num_rows == 1 and set(ds.column_names) == set(DATASETS[name].names)


def test_float16_heatmaps_stay_binary_and_unknown_types_are_refused():
    card = dataset_card({"heatmaps": HEATMAPS}, heatmap_encoding="float16", title="t")
    assert "name: heatmap\n    dtype: binary" in card
    assert feature(pa.list_(pa.float32(), 4)) == {"list": "float32", "length": 4}
    with pytest.raises(TypeError, match="no datasets feature"):
        feature(pa.dictionary(pa.int8(), pa.string()))
