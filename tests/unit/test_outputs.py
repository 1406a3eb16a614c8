"""Reading a finished job's outputs (``clipmaps.jobs.outputs``): ``_job.json``, datasets, the manifest join,
storage options."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmaps.jobs.outputs import DATASET_NAMES, JobOutputs, dataset_schema, parse_storage_options, usable_options
from clipmaps.schemas.datasets import DATASETS, LABELS
from clipmaps.schemas.errors import ConfigError


def test_an_empty_folder_has_no_job_and_no_datasets(tmp_path):
    out = JobOutputs(str(tmp_path))
    assert out.exists() and not out.exists("labels")
    assert out.job == {} and out.spec == {} and out.manifest_uri is None
    assert all(out.dataset(n) is None and out.table(n) is None for n in DATASET_NAMES)
    with pytest.raises(ConfigError, match="names no input manifest"):
        out.image_uris()
    with pytest.raises(ValueError, match="unknown dataset"):
        out.dataset("label")


def test_datasets_and_the_manifest_join(tmp_path):
    (tmp_path / "labels").mkdir()
    pq.write_table(LABELS.empty_table(), tmp_path / "labels" / "part-0.parquet")
    manifest = tmp_path / "manifest.jsonl"
    rows = [("a", "/img/a.jpg"), ("b", "/img/b.jpg"), ("a", "/img/a-again.jpg")]
    manifest.write_text("".join(json.dumps({"image_id": i, "image_uri": u}) + "\n" for i, u in rows))
    spec = {"input": {"manifest": str(manifest), "storage_options": {"anon": True, "secret": "***"}}}
    (tmp_path / "_job.json").write_text(json.dumps({"spec": spec}))
    out = JobOutputs(str(tmp_path), {"use_ssl": False})
    assert out.dataset("labels").schema.names == LABELS.names
    assert out.table("labels") is None  # a dataset without rows reads as none
    assert out.image_uri_map() == {"a": "/img/a.jpg", "b": "/img/b.jpg"}  # an id's first row
    assert out.manifest(["image_id"], image_ids=["b"]).to_pylist() == [{"image_id": "b"}]
    assert out.input_options == {"anon": True, "use_ssl": False}  # redacted values left out, the caller's added
    assert JobOutputs(str(tmp_path), input_storage_options={"x": 1}).input_options == {"x": 1}


def test_storage_options_and_schemas():
    assert parse_storage_options(["anon=true", "endpoint_url=http://h:1", "n=3"]) == {
        "anon": True,
        "endpoint_url": "http://h:1",
        "n": 3,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_storage_options(["anon"])
    assert usable_options({"key": "***", "client_kwargs": {"region_name": "x", "token": "***"}}) == {
        "client_kwargs": {"region_name": "x"}
    }
    assert set(DATASET_NAMES) == {*DATASETS, "regions"}
    assert dataset_schema("regions", 8).field("embedding").type == pa.list_(pa.float32(), 8)
    assert dataset_schema("errors") is DATASETS["errors"]
