"""Manifests (Parquet / JSONL / CSV), their validation, and the COCO / SA-1B / folder adapters."""

from __future__ import annotations

import argparse
import csv
import json
import logging

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipmaps.jobs.commands import add_manifest_parser
from clipmaps.jobs.manifest import AnnotationReport, from_coco, from_folder, from_sa1b, write_manifest
from clipmaps.pipeline.sources import (
    MANIFEST_READ,
    iter_table_batches,
    read_manifest_table,
    validate_manifest,
)
from clipmaps.schemas.datasets import ERRORS, MANIFEST
from clipmaps.schemas.encodings import rle_decode, rle_encode
from clipmaps.schemas.errors import ManifestError
from tests.helpers.data_images import coco_instances, png_mask, sa1b_file

SOLID = np.zeros((6, 8), bool)
SOLID[1:4, 2:7] = True

ROWS = [
    {
        "image_id": "007",
        "image_uri": "/data/a.jpg",
        "masks": [
            {"region_id": "r0", "rle": rle_encode(SOLID)},
            {"region_id": "r1", "polygon": [[0.0, 0.0, 4.0, 0.0, 4.0, 3.5]]},
            {"region_id": "r2", "uri": "s3://bucket/a_mask_2.png"},
        ],
        "prompts": ["a cat", "a dog"],
        "width": 8,
        "height": 6,
    },
    {"image_id": "b", "image_uri": "s3://bucket/b.jpg", "masks": None, "prompts": None},
    {"image_id": "c", "image_uri": "gs://bucket/c.png", "masks": [], "prompts": ["sky"]},
]


def expected_rows():
    out = []
    for r in ROWS:
        masks = (
            None
            if r["masks"] is None
            else [
                {"region_id": m.get("region_id"), "rle": m.get("rle"), "uri": m.get("uri"), "polygon": m.get("polygon")}
                for m in r["masks"]
            ]
        )
        out.append({**r, "masks": masks, "width": r.get("width"), "height": r.get("height"), "masks_uri": None})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


# ---------------------------------------------------------------------------------------------- formats
def test_jsonl_manifest(tmp_path):
    uri = write_jsonl(tmp_path / "m.jsonl", ROWS)
    table = read_manifest_table(uri)
    assert table.schema == MANIFEST_READ
    assert table.to_pylist() == expected_rows()


def test_parquet_manifest_and_limit_reads_only_what_is_needed(tmp_path):
    table = pa.Table.from_pylist(expected_rows(), schema=MANIFEST)
    pq.write_table(table, tmp_path / "m.parquet")
    assert read_manifest_table(str(tmp_path / "m.parquet")).to_pylist() == expected_rows()
    big = pa.table({"image_id": [str(i) for i in range(10_000)], "image_uri": [f"/i/{i}.jpg" for i in range(10_000)]})
    pq.write_table(big, tmp_path / "big.parquet", row_group_size=1000)
    head = read_manifest_table(str(tmp_path / "big.parquet"), limit=5)
    assert head["image_id"].to_pylist() == ["0", "1", "2", "3", "4"]
    assert head["masks"].null_count == 5 and head.schema == MANIFEST_READ
    # a directory of Parquet files is a dataset
    (tmp_path / "dir").mkdir()
    pq.write_table(big.slice(0, 10), tmp_path / "dir" / "part-0.parquet")
    pq.write_table(big.slice(10, 10), tmp_path / "dir" / "part-1.parquet")
    assert read_manifest_table(str(tmp_path / "dir")).num_rows == 20


def test_parquet_with_loose_types_is_conformed(tmp_path):
    loose = pa.table(
        {
            "image_id": pa.array([1, 2], pa.int64()),
            "image_uri": ["/a.jpg", "/b.jpg"],
            "masks": pa.array([[{"region_id": "x", "uri": "/m.png"}], None]),  # struct without rle/polygon fields
            "prompts": [["cat"], None],
        }
    )
    pq.write_table(loose, tmp_path / "loose.parquet")
    t = read_manifest_table(str(tmp_path / "loose.parquet"))
    assert t["image_id"].to_pylist() == ["1", "2"]
    assert t["masks"].to_pylist()[0] == [{"region_id": "x", "rle": None, "uri": "/m.png", "polygon": None}]
    uncompressed = pa.table(
        {
            "image_id": ["a"],
            "image_uri": ["/a.jpg"],
            "masks": [[{"region_id": "0", "rle": {"size": [6, 8], "counts": [6, 2, 1]}}]],
        }
    )
    pq.write_table(uncompressed, tmp_path / "unc.parquet")
    rle = read_manifest_table(str(tmp_path / "unc.parquet"))["masks"].to_pylist()[0][0]["rle"]
    assert isinstance(rle["counts"], str)


def test_csv_manifest(tmp_path):
    masks = json.dumps([{"region_id": "r0", "rle": {"size": [6, 8], "counts": rle_encode(SOLID)["counts"]}}])
    uri = write_csv(
        tmp_path / "m.csv",
        ["image_id", "image_uri", "masks", "prompts"],
        [
            ["007", "/data/a.jpg", masks, "a cat|a dog"],
            ["b", "s3://bucket/b.jpg", "", '["sky", "a|b"]'],
            ["c", "gs://bucket/c.png", "", ""],
        ],
    )
    assert '"[""sky"", ""a|b""]"' in (tmp_path / "m.csv").read_text()
    t = read_manifest_table(uri)
    rows = t.to_pylist()
    assert [r["image_id"] for r in rows] == ["007", "b", "c"]  # ids stay text
    assert rows[0]["prompts"] == ["a cat", "a dog"]
    assert rows[1]["prompts"] == ["sky", "a|b"]
    assert rows[2]["prompts"] is None and rows[2]["masks"] is None
    np.testing.assert_array_equal(rle_decode(rows[0]["masks"][0]["rle"]), SOLID)
    assert read_manifest_table(uri, limit=2).num_rows == 2


def test_declared_size_columns_in_every_format(tmp_path):
    # JSONL: integers and integral floats (as some exporters write them); absent or null = unknown
    rows = [
        {"image_id": "a", "image_uri": "/a.jpg", "width": 640, "height": 480.0},
        {"image_id": "b", "image_uri": "/b.jpg"},
        {"image_id": "c", "image_uri": "/c.jpg", "width": None, "height": 10},
    ]
    t = read_manifest_table(write_jsonl(tmp_path / "m.jsonl", rows))
    assert t["width"].to_pylist() == [640, None, None] and t["height"].to_pylist() == [480, None, 10]
    # CSV: decimal text, empty = unknown
    csv_rows = [["a", "/a.jpg", "640", " 480"], ["b", "/b.jpg", "", ""]]
    uri = write_csv(tmp_path / "m.csv", ["image_id", "image_uri", "width", "height"], csv_rows)
    t = read_manifest_table(uri)
    assert t["width"].to_pylist() == [640, None] and t["height"].to_pylist() == [480, None]
    # Parquet: any integer type is cast to int32; a manifest without the columns reads them as null
    sized = {"width": pa.array([640], pa.int64()), "height": pa.array([480], pa.uint16())}
    pq.write_table(pa.table({"image_id": ["a"], "image_uri": ["/a.jpg"], **sized}), tmp_path / "m.parquet")
    t = read_manifest_table(str(tmp_path / "m.parquet"))
    assert t.schema == MANIFEST_READ and t.to_pylist()[0]["width"] == 640 and t.to_pylist()[0]["height"] == 480
    pq.write_table(pa.table({"image_id": ["a"], "image_uri": ["/a.jpg"]}), tmp_path / "bare.parquet")
    t = read_manifest_table(str(tmp_path / "bare.parquet"))
    assert t["width"].to_pylist() == [None] and t["height"].to_pylist() == [None]
    valid, errors = validate_manifest(t)
    assert errors == [] and valid.schema == MANIFEST


@pytest.mark.parametrize("bad", ["wide", "4.5", 4.5, True, [640], 2**31])
def test_a_declared_size_that_is_not_an_integer_is_named(tmp_path, bad):
    uri = write_jsonl(tmp_path / "m.jsonl", [{"image_id": "a", "image_uri": "/a.jpg", "width": bad, "height": 4}])
    with pytest.raises(ManifestError, match=r"line 1: column 'width' must be an integer"):
        read_manifest_table(uri)


def test_round_trip_through_write_manifest(tmp_path):
    table = pa.Table.from_pylist(expected_rows(), schema=MANIFEST)
    for name in ("m.parquet", "m.jsonl", "m.csv"):
        write_manifest(table, str(tmp_path / name))
        assert read_manifest_table(str(tmp_path / name)).to_pylist() == expected_rows(), name


def test_compressed_jsonl(tmp_path):
    import gzip

    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as f:
        f.write(json.dumps(ROWS[1]) + "\n")
    assert read_manifest_table(str(tmp_path / "m.jsonl.gz"))["image_id"].to_pylist() == ["b"]


# ---------------------------------------------------------------------------------------------- errors
def test_missing_required_columns_are_named(tmp_path):
    with pytest.raises(ManifestError, match=r"missing required column\(s\) image_uri"):
        read_manifest_table(write_jsonl(tmp_path / "m.jsonl", [{"image_id": "a", "uri": "/x"}]))
    with pytest.raises(ManifestError, match=r"missing required column\(s\) image_id, image_uri"):
        read_manifest_table(write_csv(tmp_path / "m.csv", ["path"], [["/x.jpg"]]))
    pq.write_table(pa.table({"image_uri": ["/x"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"missing required column\(s\) image_id \(it has: image_uri\)"):
        read_manifest_table(str(tmp_path / "m.parquet"))


def test_empty_manifests_are_reported(tmp_path):
    (tmp_path / "zero.jsonl").write_bytes(b"")
    with pytest.raises(ManifestError, match="is empty"):
        read_manifest_table(str(tmp_path / "zero.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="is empty: it has no rows"):
        read_manifest_table(str(tmp_path / "blank.jsonl"))
    with pytest.raises(ManifestError, match="is empty: it has no rows"):
        read_manifest_table(write_csv(tmp_path / "h.csv", ["image_id", "image_uri"], []))
    pq.write_table(pa.Table.from_pylist([], schema=MANIFEST), tmp_path / "e.parquet")
    with pytest.raises(ManifestError, match="is empty"):
        read_manifest_table(str(tmp_path / "e.parquet"))
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(ManifestError, match="0 bytes"):
        read_manifest_table(str(tmp_path / "zero.parquet"))


def test_unreadable_manifests(tmp_path):
    with pytest.raises(ManifestError, match="file not found"):
        read_manifest_table(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(ManifestError, match=r"cannot read manifest .*bad\.parquet"):
        read_manifest_table(str(tmp_path / "bad.parquet"))
    with pytest.raises(ManifestError, match="unknown format"):
        read_manifest_table(str(tmp_path / "m.txt"))
    (tmp_path / "bad.jsonl").write_text('{"image_id": "a", "image_uri": "/x"}\n{oops\n')
    with pytest.raises(ManifestError, match=r"line 2: not valid JSON"):
        read_manifest_table(str(tmp_path / "bad.jsonl"))
    (tmp_path / "types.jsonl").write_text('{"image_id": "a", "image_uri": "/x", "masks": [{"rle": "zz"}]}\n')
    with pytest.raises(ManifestError, match=r"line 1 masks\[0\]: 'rle' must be an object"):
        read_manifest_table(str(tmp_path / "types.jsonl"))
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest_table("nosuchprotocol://bucket/m.parquet")


def test_extra_columns_are_dropped_with_a_warning(tmp_path, caplog):
    uri = write_jsonl(tmp_path / "m.jsonl", [{"image_id": "a", "image_uri": "/a.jpg", "label": 3, "split": "val"}])
    with caplog.at_level(logging.WARNING, logger="clipmaps.pipeline.sources"):
        t = read_manifest_table(uri)
    assert t.column_names == MANIFEST.names
    assert "ignoring extra column(s) label, split" in caplog.text


def test_validate_splits_duplicates_bad_uris_schemes_and_masks(tmp_path):
    rows = [
        {"image_id": "a", "image_uri": "/a.jpg"},
        {"image_id": "a", "image_uri": "/a2.jpg"},  # duplicate: 2nd occurrence is the error
        {"image_id": "b", "image_uri": ""},
        {"image_id": "c", "image_uri": "s3a://bucket/c.jpg"},  # s3a is not s3
        {"image_id": "d", "image_uri": "s3://bucket/d.jpg", "masks": [{"region_id": "0"}]},
        {
            "image_id": "e",
            "image_uri": "S3://bucket/e.jpg",
            "masks": [{"region_id": "0", "uri": "/m.png", "polygon": [[0, 0, 1, 0, 1, 1]]}],
        },
        {"image_id": "f", "image_uri": "file:///f.jpg", "masks": [{"region_id": "0", "uri": "http://x/m.png"}]},
        {
            "image_id": "g",
            "image_uri": "/g.jpg",
            "masks": [{"region_id": "k", "uri": "/1.png"}, {"region_id": "k", "uri": "/2.png"}],
        },
        {"image_id": "", "image_uri": "/h.jpg"},
        {"image_id": "a", "image_uri": "/a3.jpg"},
        {"image_id": "ok", "image_uri": "gs://b/ok.jpg", "masks": [{"uri": "/m.png"}, {"rle": rle_encode(SOLID)}]},
    ]
    table = read_manifest_table(write_jsonl(tmp_path / "m.jsonl", rows))
    assert table.num_rows == len(rows)  # reading keeps everything
    valid, errors = validate_manifest(table, allowed_schemes=("file", "s3", "gs"))
    assert valid.schema == MANIFEST
    # "g" repeats a region id: the image is kept (the decode stage reports the later mask as a region error)
    assert valid["image_id"].to_pylist() == ["a", "g", "ok"]
    by = {(e["image_id"], e["uri"]): e for e in errors}
    assert len(errors) == len(rows) - 3
    assert all(e["stage"] == "manifest" for e in errors)
    assert by[("a", "/a2.jpg")]["error_type"] == "DuplicateImageId"
    assert "already appears on row 0" in by[("a", "/a2.jpg")]["message"]
    assert by[("a", "/a3.jpg")]["error_type"] == "DuplicateImageId"
    assert by[("b", "")]["error_type"] == "MissingImageUri"
    assert by[("c", "s3a://bucket/c.jpg")]["error_type"] == "UnsupportedScheme"
    assert "'s3a'" in by[("c", "s3a://bucket/c.jpg")]["message"]
    assert by[("d", "s3://bucket/d.jpg")]["error_type"] == "MalformedMask"
    assert "none of rle, uri, polygon" in by[("d", "s3://bucket/d.jpg")]["message"]
    assert "several" in by[("e", "S3://bucket/e.jpg")]["message"]  # scheme match is case-insensitive
    assert by[("f", "file:///f.jpg")]["error_type"] == "UnsupportedScheme"
    assert by[("f", "file:///f.jpg")]["region_id"] == "0"
    assert ("g", "/g.jpg") not in by
    assert by[("", "/h.jpg")]["error_type"] == "MissingImageId"
    errors_table = pa.Table.from_pylist(errors, schema=ERRORS)
    assert errors_table.num_rows == len(errors)


def test_validate_on_a_slice_names_the_right_mask():
    rows = [
        {
            "image_id": str(i),
            "image_uri": "/x.jpg",
            "masks": [{"region_id": "a", "uri": "/m.png"}, {"region_id": "b", **({} if i == 3 else {"uri": "/n"})}],
        }
        for i in range(5)
    ]
    table = pa.Table.from_pylist(rows, schema=MANIFEST).slice(2, 3)
    valid, errors = validate_manifest(table)
    assert valid["image_id"].to_pylist() == ["2", "4"]
    assert [(e["image_id"], e["region_id"], e["message"]) for e in errors] == [
        ("3", "b", "mask 1 (region_id 'b') has none of rle, uri, polygon")
    ]


def test_validate_bare_paths_are_file_and_schemes_are_exact(tmp_path):
    table = read_manifest_table(
        write_jsonl(
            tmp_path / "m.jsonl",
            [
                {"image_id": "1", "image_uri": "/x/1.jpg"},
                {"image_id": "2", "image_uri": "relative/2.jpg"},
                {"image_id": "3", "image_uri": "s3://b/3.jpg"},
                {"image_id": "4", "image_uri": "s3n://b/4.jpg"},
            ],
        )
    )
    valid, errors = validate_manifest(table, allowed_schemes=("s3",))
    assert valid["image_id"].to_pylist() == ["3"]
    assert {e["image_id"]: e["error_type"] for e in errors} == {
        "1": "UnsupportedScheme",
        "2": "UnsupportedScheme",
        "4": "UnsupportedScheme",
    }
    valid, errors = validate_manifest(table, allowed_schemes=("file", "s3"))
    assert valid["image_id"].to_pylist() == ["1", "2", "3"]


def test_refused_rows_hide_credentials_and_presigned_signatures():
    """Rows refused at the manifest stage name their URI (``uri`` column and message) without the userinfo of
    ``user:secret@`` URIs or the values of presigned query parameters."""
    signature, secret = "f00dfacecafe0123456789abcdef", "se/cr+et@planted"
    presigned = (
        "https://b.s3.amazonaws.com/x.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential=AKIAPLANTED%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={signature}"
    )
    rows = [
        {"image_id": "p", "image_uri": presigned},
        {"image_id": "u", "image_uri": f"ftp://user:{secret}@host/x.png"},
        {"image_id": "m", "image_uri": "/x.png", "masks": [{"region_id": "0", "uri": presigned}]},
        {"image_id": "dup", "image_uri": f"s3://AKIA:{secret}@b/x.png"},
        {"image_id": "dup", "image_uri": f"s3://AKIA:{secret}@b/y.png"},
    ]
    valid, errors = validate_manifest(pa.Table.from_pylist(rows, schema=MANIFEST), allowed_schemes=("file", "s3"))
    assert valid["image_id"].to_pylist() == ["dup"]
    text = json.dumps(errors)
    assert signature not in text and "AKIAPLANTED" not in text and secret not in text
    by = {e["image_id"]: e for e in errors}
    assert by["p"]["message"].startswith("URI scheme 'https' of https://b.s3.amazonaws.com/x.png?") and (
        "X-Amz-Signature=***" in by["p"]["uri"]
    )
    assert by["u"]["uri"] == "ftp://***@host/x.png" and by["dup"]["uri"] == "s3://***@b/y.png"
    assert by["m"]["region_id"] == "0" and "allowed: file, s3" in by["m"]["message"]


def test_iter_table_batches():
    t = pa.Table.from_pylist(expected_rows(), schema=MANIFEST)
    parts = iter_table_batches(t, 2)
    assert [p.num_rows for p in parts] == [2, 1]


# ---------------------------------------------------------------------------------------------- adapters
def test_coco_adapter(tmp_path):
    data = coco_instances(tmp_path / "instances.json", rle_encode)
    table = from_coco(str(tmp_path / "instances.json"), "s3://bucket/coco/val2017/")
    assert table.schema == MANIFEST
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == ["1", "2", "3"]
    assert [r["image_uri"] for r in rows] == [
        "s3://bucket/coco/val2017/a.jpg",
        "s3://bucket/coco/val2017/sub/b.jpg",
        "s3://bucket/coco/val2017/c.jpg",
    ]
    poly, rle = rows[0]["masks"]
    assert poly["region_id"] == "11" and poly["rle"] is None
    assert poly["polygon"] == data["annotations"][0]["segmentation"]  # original coordinates, two parts
    assert rle["region_id"] == "12" and rle["polygon"] is None
    np.testing.assert_array_equal(rle_decode(rle["rle"]), data["_truth"]["12"])
    (crowd,) = rows[1]["masks"]
    assert crowd["region_id"] == "21" and isinstance(crowd["rle"]["counts"], str)
    np.testing.assert_array_equal(rle_decode(crowd["rle"]), data["_truth"]["21"])
    assert rows[2]["masks"] == []  # listed without annotations
    valid, errors = validate_manifest(table, allowed_schemes=("s3",))
    assert valid.num_rows == 3 and errors == []
    local = from_coco(str(tmp_path / "instances.json"), str(tmp_path / "images"))
    assert local["image_uri"].to_pylist()[1] == str(tmp_path / "images" / "sub" / "b.jpg")
    # the declared size of every image (COCO images[].width/height), the frame its polygons are drawn in
    assert [(r["width"], r["height"]) for r in rows] == [(50, 40), (30, 20), (10, 10)]
    assert table.schema.field("width").type == pa.int32() == table.schema.field("height").type


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_crowd_rle_matches_pycocotools(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    data = coco_instances(tmp_path / "instances.json", rle_encode)
    seg = data["annotations"][2]["segmentation"]
    theirs = mask_utils.frPyObjects(seg, *seg["size"])
    ours = from_coco(str(tmp_path / "instances.json"), "/img")["masks"].to_pylist()[1][0]["rle"]
    assert ours["counts"] == theirs["counts"].decode("ascii")


def _coco_with_id_problems(path) -> dict:
    box = [[24, 18, 48, 18, 48, 54, 24, 54]]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 96, "height": 72} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "box"}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "segmentation": box},
            {"id": 7, "image_id": 1, "category_id": 1, "segmentation": box},  # clash within image 1
            {"id": 7, "image_id": 2, "category_id": 1, "segmentation": box},  # same id, other image: no clash there
            {"image_id": 3, "category_id": 1, "segmentation": box},  # no id
            {"id": 30, "image_id": 3, "category_id": 1, "segmentation": box},
            {"id": None, "image_id": 3, "category_id": 1, "segmentation": box},  # null id
        ],
    }
    path.write_text(json.dumps(data))
    return data


def test_coco_adapter_keeps_ids_and_reports_clashes_and_missing_ids(tmp_path, caplog):
    _coco_with_id_problems(tmp_path / "c.json")
    report = AnnotationReport()
    with caplog.at_level(logging.WARNING, logger="clipmaps.jobs.manifest"):
        table = from_coco(str(tmp_path / "c.json"), "/img", report=report)
    ids = [[m["region_id"] for m in r] for r in table["masks"].to_pylist()]
    assert ids == [["7", "7"], ["7"], [None, "30", None]]  # stable: never renumbered
    assert (report.duplicates, report.duplicate_examples) == (1, [("1", "7")])
    assert (report.missing, report.missing_examples) == (2, [("3", 0), ("3", 2)])
    assert "1 annotation(s) repeat an id" in caplog.text and "image 1 annotation 7" in caplog.text
    # the manifest keeps every image: a clash is not a reason to refuse a row
    valid, errors = validate_manifest(table)
    assert valid.num_rows == 3 and errors == []


def test_id_report_caps_its_examples():
    report = AnnotationReport()
    for i in range(8):
        report.add_image(str(i), [{"region_id": "a"}, {"region_id": "a"}, {"region_id": None, "polygon": [[1, 2]]}])
    assert report.duplicates == report.missing == report.degenerate_parts == 8
    assert len(report.duplicate_examples) == len(report.missing_examples) == AnnotationReport.MAX_EXAMPLES
    assert len(report.degenerate_examples) == AnnotationReport.MAX_EXAMPLES
    assert all(line.endswith(", …") for line in report.lines())
    assert AnnotationReport().lines() == []


def test_manifest_cli_prints_id_problems(tmp_path, capsys):
    _coco_with_id_problems(tmp_path / "c.json")
    parser = argparse.ArgumentParser(prog="clipmaps")
    add_manifest_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["manifest", "coco", str(tmp_path / "c.json"), "/img", "-o", str(tmp_path / "m.jsonl")])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"clipmaps manifest: 3 images, 6 masks -> {tmp_path / 'm.jsonl'}"
    assert out[1].startswith("clipmaps manifest: warning: 1 annotation(s) repeat an id")
    assert out[1].endswith("image 1 annotation 7")
    assert out[2].startswith("clipmaps manifest: warning: 2 annotation(s) have no id")
    assert out[2].endswith("image 3 mask 0, image 3 mask 2")
    back = read_manifest_table(str(tmp_path / "m.jsonl"))
    assert [[m["region_id"] for m in r] for r in back["masks"].to_pylist()] == [["7", "7"], ["7"], [None, "30", None]]


def test_sa1b_adapter_reports_id_clashes(tmp_path):
    rle = rle_encode(SOLID)
    doc = {
        "image": {"image_id": 5, "file_name": "sa_5.jpg"},
        "annotations": [{"id": 1, "segmentation": rle}, {"id": 1, "segmentation": rle}, {"segmentation": rle}],
    }
    (tmp_path / "sa_5.json").write_text(json.dumps(doc))
    report = AnnotationReport()
    table = from_sa1b(str(tmp_path / "sa_5.json"), report=report, inline_masks=True)
    assert [m["region_id"] for m in table["masks"].to_pylist()[0]] == ["1", "1", None]
    assert (report.duplicates, report.missing) == (1, 1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_segmentation_forms(tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    crowd = np.zeros((72, 96), bool)
    crowd[10:30, 5:40] = True
    flat = crowd.flatten(order="F").astype(np.int8)
    runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()  # starts with 0s: pixel 0 is 0
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": {"size": [72, 96], "counts": runs}},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [24, 18, 48, 18, 48, 54, 24, 54]},
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[24, 18, 48, 18, 48, 54, 24, 54], [60, 10, 60, 12]],  # kept; dropped when decoded
        },
    ]
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 96, "height": 72}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    report = AnnotationReport()
    masks = from_coco(str(tmp_path / "c.json"), "/img", report=report)["masks"].to_pylist()[0]
    assert (report.degenerate_parts, report.duplicates, report.missing) == (1, 0, 0)
    assert report.degenerate_examples == [("1", "3", 1, "2 point(s), a polygon needs at least 3 (6 coordinates)")]
    (line,) = report.lines()
    assert line.startswith("1 polygon part(s) are degenerate and will be dropped") and "annotation 3 part 1" in line
    ref = coco_api.COCO(str(tmp_path / "c.json"))
    np.testing.assert_array_equal(rle_decode(masks[0]["rle"]), ref.annToMask(ref.anns[1]).astype(bool))
    assert masks[1]["polygon"] == [[24.0, 18.0, 48.0, 18.0, 48.0, 54.0, 24.0, 54.0]]  # a flat list is one part
    assert masks[2]["polygon"][1] == [60.0, 10.0, 60.0, 12.0]
    bad = dict(data, annotations=[dict(anns[0], segmentation=[[1, "x", 3]])])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="image 1 annotation 1: polygon segmentation must be lists of numbers"):
        from_coco(str(tmp_path / "bad.json"), "/img")
    bad = dict(data, annotations=[dict(anns[0], segmentation={"size": [72], "counts": runs})])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match=r"RLE 'size' must be \[height, width\]"):
        from_coco(str(tmp_path / "bad.json"), "/img")


def test_uncompressed_rle_in_a_manifest_is_compressed_and_kept(tmp_path):
    m = np.zeros((6, 5), bool)
    m[1:4, 2:4] = True
    runs = np.diff(np.r_[0, np.flatnonzero(np.diff(m.flatten(order="F").astype(np.int8))) + 1, m.size]).tolist()
    rows = [
        {"image_id": "a", "image_uri": "/a.png", "masks": [{"region_id": "c", "rle": {"size": [6, 5], "counts": runs}}]}
    ]
    table = read_manifest_table(write_jsonl(tmp_path / "m.jsonl", rows))
    (mask,) = table["masks"].to_pylist()[0]
    assert mask["rle"]["counts"] == rle_encode(m)["counts"]
    np.testing.assert_array_equal(rle_decode(mask["rle"]), m)
    # the same in Parquet, where uncompressed counts arrive as a list<int64> column (not castable to the string)
    rle_type = pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.list_(pa.int64()))])
    mask_type = pa.struct([("region_id", pa.string()), ("rle", rle_type)])
    loose = pa.table(
        {
            "image_id": ["a"],
            "image_uri": ["/a.png"],
            "masks": pa.array([[{"region_id": "c", "rle": {"size": [6, 5], "counts": runs}}]], pa.list_(mask_type)),
        }
    )
    pq.write_table(loose, tmp_path / "m.parquet")
    (mask,) = read_manifest_table(str(tmp_path / "m.parquet"))["masks"].to_pylist()[0]
    assert mask["rle"] == {"size": [6, 5], "counts": rle_encode(m)["counts"]}


def test_coco_adapter_rejects_non_coco(tmp_path):
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(ManifestError, match="not a COCO instances file"):
        from_coco(str(tmp_path / "x.json"), "/img")
    with pytest.raises(ManifestError, match="file not found"):
        from_coco(str(tmp_path / "missing.json"), "/img")


def test_sa1b_adapter(tmp_path):
    rng = np.random.default_rng(0)
    masks1 = [rng.random((12, 16)) < 0.3, rng.random((12, 16)) < 0.6]
    masks2 = [rng.random((12, 16)) < 0.5]
    sa1b_file(tmp_path, 1, masks1, rle_encode)
    sa1b_file(tmp_path, 2, masks2, rle_encode)
    table = from_sa1b(str(tmp_path / "sa_*.json"), inline_masks=True)  # masks_uri by default: test_manifest_refs
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == ["1", "2"]
    assert rows[0]["image_uri"] == str(tmp_path / "sa_1.jpg")
    assert [m["region_id"] for m in rows[0]["masks"]] == ["1000", "1001"]
    assert [(r["width"], r["height"]) for r in rows] == [(16, 12), (16, 12)]  # image.width/height
    for m, truth in zip(rows[0]["masks"], masks1):
        np.testing.assert_array_equal(rle_decode(m["rle"]), truth)
    one = from_sa1b([str(tmp_path / "sa_2.json")], inline_masks=True)
    assert one.num_rows == 1 and len(one["masks"].to_pylist()[0]) == 1
    with pytest.raises(ManifestError, match="no SA-1B JSON files"):
        from_sa1b(str(tmp_path / "none_*.json"))


def _folder(root):
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(root / "cat.jpg")
    m = np.zeros((6, 8), bool)
    m[1:3, 1:3] = True
    for k in (0, 1, 10, 2):
        png_mask(root / f"cat_mask_{k}.png", m)
    Image.new("RGB", (8, 6)).save(root / "dog.PNG")
    Image.new("RGB", (8, 6)).save(root / "cat.png")  # same stem, other extension: a separate image
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (4, 4)).save(root / "sub" / "bird.webp")
    png_mask(root / "sub" / "bird_mask_a.png", np.ones((4, 4), bool))


def test_folder_adapter(tmp_path):
    root = tmp_path / "photos"
    _folder(root)
    rows = from_folder(str(root)).to_pylist()
    assert [r["image_id"] for r in rows] == ["cat.jpg", "cat.png", "dog.PNG"]  # masks are not images
    cat = rows[0]
    assert cat["image_uri"] == str(root / "cat.jpg")
    assert [m["region_id"] for m in cat["masks"]] == ["0", "1", "2", "10"]  # natural order
    assert cat["masks"][0]["uri"] == str(root / "cat_mask_0.png")
    assert rows[1]["masks"] == rows[0]["masks"]  # cat.png shares the stem "cat"
    assert rows[2]["masks"] == []
    rec = from_folder(str(root), recursive=True).to_pylist()
    assert [r["image_id"] for r in rec] == ["cat.jpg", "cat.png", "dog.PNG", "sub/bird.webp"]
    assert [m["region_id"] for m in rec[3]["masks"]] == ["a"]
    globbed = from_folder(str(root / "*.jpg")).to_pylist()
    assert [r["image_id"] for r in globbed] == ["cat.jpg"] and len(globbed[0]["masks"]) == 4
    custom = from_folder(str(root), mask_pattern="{stem}-seg-*.png").to_pylist()
    assert [r["image_id"] for r in custom][:2] == ["cat.jpg", "cat.png"]
    assert any(r["image_id"] == "cat_mask_0.png" for r in custom)  # other convention: PNG masks are images
    with pytest.raises(ManifestError, match="no images"):
        from_folder(str(root / "*.txt"))
    with pytest.raises(ValueError, match="exactly one"):
        from_folder(str(root), mask_pattern="{stem}.png")


def test_folder_adapter_on_a_remote_filesystem():
    fs = fsspec.filesystem("memory")
    buf = pa.BufferOutputStream()
    Image.new("RGB", (8, 6)).save(buf, format="JPEG")
    fs.pipe("/bucket/imgs/x.jpg", buf.getvalue().to_pybytes())
    fs.pipe("/bucket/imgs/x_mask_0.png", b"png")
    try:
        rows = from_folder("memory://bucket/imgs").to_pylist()
    finally:
        fs.rm("/bucket", recursive=True)
    assert rows[0]["image_id"] == "x.jpg"
    assert rows[0]["image_uri"].startswith("memory://") and rows[0]["image_uri"].endswith("/bucket/imgs/x.jpg")
    assert rows[0]["masks"][0]["uri"].endswith("/bucket/imgs/x_mask_0.png")


def test_manifest_cli(tmp_path, capsys):
    root = tmp_path / "photos"
    _folder(root)
    parser = argparse.ArgumentParser(prog="clipmaps")
    add_manifest_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.parquet"
    args = parser.parse_args(["manifest", "folder", str(root), "-o", str(out)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == f"clipmaps manifest: 3 images, 8 masks -> {out}"
    assert read_manifest_table(str(out)).num_rows == 3
    coco_instances(tmp_path / "instances.json", rle_encode)
    args = parser.parse_args(
        [
            "manifest",
            "coco",
            str(tmp_path / "instances.json"),
            "s3://b/img",
            "-o",
            str(tmp_path / "coco.jsonl"),
            "--storage-option",
            "anon=true",
        ]
    )
    assert args.func(args) == 0
    assert "3 images, 3 masks" in capsys.readouterr().out
    args = parser.parse_args(["manifest", "sa1b", str(tmp_path / "nothing_*.json"), "-o", str(tmp_path / "s.parquet")])
    assert args.func(args) == 2
    assert "no SA-1B JSON files" in capsys.readouterr().err


def test_folder_adapter_takes_an_existing_path_literally(tmp_path):
    """A folder whose name holds glob characters is that folder, not a pattern (a literal existing path wins)."""
    root = tmp_path / "scans[1]"
    _folder(root)
    (tmp_path / "scans1").mkdir()  # what the pattern would match instead
    rows = from_folder(str(root)).to_pylist()
    assert [r["image_id"] for r in rows] == ["cat.jpg", "cat.png", "dog.PNG"]
    assert rows[0]["image_uri"] == str(root / "cat.jpg")
