"""annotate's pieces without Ray: the spec loader, the row checks on the workers, the output schema, and the decode
stage reading an ``image`` bytes column (plain binary and the Hugging Face ``{bytes, path}`` struct)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from clipmaps.pipeline.annotate import load_annotate_spec, output_kinds, output_schema, validate_rows
from clipmaps.pipeline.decode import DecodeConfig, decode_batch
from clipmaps.pipeline.spec import SpecError, load_spec
from clipmaps.schemas.datasets import MANIFEST
from tests.helpers.specs import JOB_SPEC


def _png(w: int = 20, h: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _raw_without_io() -> dict:
    raw = yaml.safe_load(JOB_SPEC.read_text())
    del raw["input"], raw["output"]
    return raw


def test_spec_without_input_and_output_loads_for_annotate_only(tmp_path):
    raw = _raw_without_io()
    spec = load_annotate_spec(raw)
    assert spec.enabled_methods() == ["maskclip", "gem", "legrad", "maskinversion"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_annotate_spec(path).model.name == "clipmaps-tiny-vit"
    with pytest.raises(SpecError, match="input"):  # the CLI's loader still requires both sections
        load_spec(raw)
    given = dict(raw, input={"allowed_schemes": ["s3"]})
    assert load_annotate_spec(given).input.allowed_schemes == ("s3",)
    with pytest.raises(SpecError, match="methods"):
        load_annotate_spec(dict(raw, methods={"nope": {}}))


def test_output_schema_columns():
    spec = load_annotate_spec(_raw_without_io())
    kinds = output_kinds(spec)
    assert kinds["maskclip"] == ("label_map",) and kinds["legrad"] == ("heatmaps",)
    assert kinds["maskinversion"] == ("regions",)
    inp = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("caption", pa.string())])
    names = output_schema(spec, inp).names
    assert "image" not in names and "caption" in names and "maskclip__confidence" not in names
    confident = load_annotate_spec({**_raw_without_io(), "output": {"label_confidence": True}})
    assert "maskclip__confidence" in output_schema(confident, inp).names
    assert {"maskclip__label_map", "gem__heatmaps", "legrad__heatmaps", "maskinversion__regions", "errors"} <= set(
        names
    )


def test_validate_rows_refuses_like_the_manifest_reader():
    table = pa.table(
        {
            "image_id": ["ok", "", "no-image", "bad-scheme", "hf"],
            "image": pa.array([_png(), _png(), None, None, None], pa.binary()),
            "image_uri": ["", None, None, "ftp://x/y.jpg", None],
        }
    )
    out = validate_rows(table, ("file", "s3"))
    assert out["error_stage"].to_pylist() == [None, "manifest", "manifest", "manifest", "manifest"]
    assert out["error_type"].to_pylist() == [
        None,
        "MissingImageId",
        "MissingImage",
        "UnsupportedScheme",
        "MissingImage",
    ]
    assert out["image"].to_pylist()[1] is None  # a refused row's image is not carried on
    masks = pa.array([[{"region_id": "a", "rle": None, "uri": None, "polygon": None}]], MANIFEST.field("masks").type)
    bad = validate_rows(pa.table({"image_id": ["m"], "image": [_png()], "masks": masks}), ("file",))
    assert bad["error_type"].to_pylist() == ["MalformedMask"]
    with pytest.raises(ValueError, match="'prompts'"):
        validate_rows(pa.table({"image_id": ["a"], "image": [_png()], "prompts": [{"x": 1}]}), ("file",))


def test_validate_rows_accepts_the_hugging_face_image_struct():
    hf = pa.array(
        [{"bytes": _png(), "path": "a.png"}, {"bytes": None, "path": "b.png"}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    out = validate_rows(pa.table({"image_id": ["a", "b"], "image": hf}), ("file",))
    assert out["error_type"].to_pylist() == [None, "MissingImage"]


def test_decode_reads_image_bytes_instead_of_fetching():
    cfg = DecodeConfig(square_size=32)
    batch = {
        "image_id": np.array(["plain", "hf", "broken"], dtype=object),
        "image": np.array([_png(20, 10), {"bytes": _png(8, 6), "path": "x.png"}, b"nope"], dtype=object),
    }
    out = decode_batch(batch, cfg)
    assert "image" not in out
    assert list(out["height"]) == [10, 6, 0] and list(out["width"]) == [20, 8, 0]
    assert out["pixels_square"][0].shape == (3, 32, 32)
    assert out["error_stage"][2] == "decode" and "image bytes of broken" in out["error_message"][2]


def test_validate_rows_without_an_image_column_is_the_manifest_check():
    table = pa.table({"image_id": ["a", "b", "c"], "image_uri": ["x.jpg", " ", "gs://b/c.jpg"]})
    out = validate_rows(table, ("file", "s3"))
    assert out["error_type"].to_pylist() == [None, "MissingImageUri", "UnsupportedScheme"]
    assert out.column_names[:2] == ["image_id", "image_uri"]  # the input's columns, unchanged, then the errors
