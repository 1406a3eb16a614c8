"""Annotated rows (the shape :func:`clipmaps.pipeline.annotate.annotate` returns) built by hand, for the tests of
``write_outputs`` that need no model: the plan of the tests' job spec and rows where every method wrote, or failed."""

from __future__ import annotations

import pyarrow as pa
import yaml

from clipmaps.actors.registry import model_info
from clipmaps.pipeline.annotate import annotation_plan, output_kinds, output_schema
from clipmaps.pipeline.write import WriterConfig
from tests.helpers.specs import JOB_SPEC

SECRET_URI = "s3://AKIDEXAMPLE:hunter2@bucket/a.png"


def plan():
    """The plan of :func:`raw_spec` for rows with prompts."""
    return annotation_plan(raw_spec(), has_prompts=True)


def writer_config(plan, uri: str = "/unused", storage_options: dict | None = None) -> WriterConfig:
    """What a writing task of ``plan`` gets, writing under ``uri``."""
    job = plan.spec
    return WriterConfig(
        output_uri=uri,
        storage_options=dict(storage_options or {}),
        provenance=plan.provenance(),
        kinds=output_kinds(job),
        embed_dim=model_info(job.model.name).embed_dim,
    )


def annotated_rows(plan, ids: tuple[str, str] = ("a", "b")) -> pa.Table:
    """Two annotated rows (ids ``ids``): one where every method wrote but LeGrad (its error is in ``errors``), one
    that failed at decode."""
    dim = model_info(plan.spec.model.name).embed_dim
    schema = output_schema(
        plan.spec, pa.schema([pa.field("image_id", pa.string()), pa.field("image_uri", pa.string())])
    )
    heat = {"prompt": "red circle", "height": 4, "width": 6, "encoding": "png8", "heatmap": b"PNG"}
    region = {
        "region_id": "r1",
        "embedding": [0.0] * dim,
        "mask": {"size": [4, 6], "counts": "abc"},
        "area": 3,
        "bbox": [0, 0, 2, 2],
        "loss": 0.5,
        "expl_map": None,
    }
    good = {
        "image_id": ids[0],
        "image_uri": SECRET_URI,
        "height": 4,
        "width": 6,
        "errors": [{"method": "legrad", "region_id": None, "stage": "model", "error_type": "X", "message": "m"}],
        "maskclip__label_map": b"L1",
        "gem__label_map": b"L2",
        "gem__heatmaps": [heat],
        "legrad__heatmaps": None,  # failed there: its error is in `errors`
        "maskinversion__regions": [region],
    }
    bad = {
        "image_id": ids[1],
        "image_uri": "/data/b.png",
        "error_stage": "decode",
        "error_type": "ImageDecodeError",
        "error_message": "cannot decode",
        "errors": [{"method": None, "region_id": None, "stage": "decode", "error_type": "ImageDecodeError",
                    "message": "cannot decode"}],
    }  # fmt: skip
    assert schema.field("maskinversion__regions").type.value_type.field("embedding").type.list_size == dim
    return pa.Table.from_pylist([good, bad], schema=schema)


def raw_spec() -> dict:
    """The tests' job spec without its input and output sections (what annotate and write_outputs take)."""
    raw = yaml.safe_load(JOB_SPEC.read_text())
    del raw["input"], raw["output"]
    return raw
