"""Masks by reference (``masks_uri``) through the decode stage, on real local files: SA-1B per-image JSON, folders of
per-instance PNGs, side Parquet tables (one scan per batch, row groups pruned by ``image_id``), the errors of each
form, rows failed upstream, and the ``mask_rle`` column against pycocotools."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from clipmaps.pipeline.decode import DecodeConfig, decode_batch, failed_rows
from clipmaps.pipeline.decode.mask_refs import reference_form
from clipmaps.schemas import batches as B
from clipmaps.schemas.encodings import mask_bbox, rle_decode, rle_encode
from tests.helpers.data_images import FlakyFileSystem, jpeg_with_orientation, marked_rgb, png_mask, save

S = 16
H, W = 24, 36


def cfg(**kw) -> DecodeConfig:
    base = {"square_size": S, "retry_backoff_s": 0.0, "io_threads": 4, "need_masks": True}
    return DecodeConfig(**{**base, **kw})


def batch(uris: list[str], refs: list, *, ids: list[str] | None = None, masks: list | None = None, **extra) -> dict:
    n = len(uris)
    out = {
        B.IMAGE_ID: B.objects(ids or [f"id{i}" for i in range(n)]),
        B.IMAGE_URI: B.objects(uris),
        B.MASKS_URI: B.objects(refs),
    }
    if masks is not None:
        out["masks"] = B.objects(masks)
    out.update(extra)
    return out


def row(out: dict, i: int) -> dict:
    return {k: v[i] for k, v in out.items()}


def assert_ok(r: dict) -> None:
    assert r[B.ERROR_STAGE] is None, (r[B.ERROR_TYPE], r[B.ERROR_MESSAGE])


def assert_failed(r: dict, stage: str, error_type: str, *fragments: str) -> None:
    assert (r[B.ERROR_STAGE], r[B.ERROR_TYPE]) == (stage, error_type), r[B.ERROR_MESSAGE]
    for fragment in fragments:
        assert fragment in r[B.ERROR_MESSAGE], r[B.ERROR_MESSAGE]
    assert r[B.MASK_IDS] is None and r[B.MASK_RLE] is None and r[B.MASK_AREA].shape == (0,)
    assert r[B.MASKS_SQUARE].shape == (0, 0, 0) and r[B.MASK_BBOX].shape == (0, 4)


def random_masks(seed: int, n: int, h: int = H, w: int = W) -> list[np.ndarray]:
    """``n`` blob-like masks (a random rectangle each, with holes), never empty."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        m[y0 : rng.integers(y0 + 2, h + 1), x0 : rng.integers(x0 + 2, w + 1)] = True
        m &= rng.random((h, w)) < 0.8
        m[y0, x0] = True
        out.append(m)
    return out


def sa1b_json(path: Path, masks: list, ids: list, size: tuple[int, int] = (H, W)) -> str:
    doc = {
        "image": {"image_id": 1, "file_name": "x.jpg", "height": size[0], "width": size[1]},
        "annotations": [
            {"id": i, "segmentation": m if isinstance(m, dict) else rle_encode(m), "area": 0, "bbox": [0, 0, 0, 0]}
            for i, m in zip(ids, masks)
        ],
    }
    path.write_text(json.dumps(doc))
    return str(path)


# ---------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize(
    ("uri", "form"),
    [
        ("s3://b/sa_1.json", "sa1b-json"),
        ("/data/SA_1.JSON", "sa1b-json"),
        ("https://h/x.json?X-Amz-Signature=abc", "sa1b-json"),
        ("s3://b/masks.parquet", "parquet"),
        ("s3://b/masks.parquet/", "parquet"),
        ("gs://b/m.pq", "parquet"),
        ("s3://b/image123/", "folder"),
        ("/data/image123", "folder"),
    ],
)
def test_the_form_of_a_reference_is_told_by_its_name(uri, form):
    assert reference_form(uri) == form


# ---------------------------------------------------------------------------------------------- SA-1B JSON
def test_sa1b_json_reference_decodes_as_inline_masks(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    truth = random_masks(0, 3)
    bad = {"size": [H, W], "counts": "!!"}  # not the RLE alphabet: costs that mask only
    ref = sa1b_json(tmp_path / "x.json", [*truth, bad, truth[0]], [11, 12, 13, 14, 11])
    out = decode_batch(batch([img], [ref]), cfg())
    r = row(out, 0)
    assert_ok(r)
    assert B.MASKS_URI not in out  # consumed, like the inline masks
    assert r[B.MASK_IDS] == ["11", "12", "13"]
    assert [(e["region_id"], e["error_type"]) for e in r[B.MASK_ERRORS]] == [
        ("14", "MalformedRLE"),
        ("11", "DuplicateRegionId"),
    ]
    assert r[B.MASK_AREA].tolist() == [int(m.sum()) for m in truth]
    assert r[B.MASK_BBOX].tolist() == [list(mask_bbox(m)) for m in truth]
    for rle, m in zip(r[B.MASK_RLE], truth):
        np.testing.assert_array_equal(rle_decode(rle), m)
    # the same masks inline give the same columns
    inline = [{"region_id": str(i), "rle": rle_encode(m)} for i, m in zip([11, 12, 13], truth)]
    same = row(decode_batch(batch([img], [None], masks=[inline]), cfg()), 0)
    for name in (B.MASK_IDS, B.MASK_RLE):
        assert same[name] == r[name]
    for name in (B.MASK_AREA, B.MASK_BBOX, B.MASKS_SQUARE):
        np.testing.assert_array_equal(same[name], r[name])


def test_sa1b_json_edge_cases(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    [m] = random_masks(1, 1)
    doc = {
        "image": {"width": W, "height": H},
        "annotations": [
            {"segmentation": rle_encode(m)},  # no id: named by position
            {"id": 5, "segmentation": [[1, 1, 10, 1, 10, 8, 1, 8]]},  # a polygon, in the declared frame
            {"id": 6},  # no segmentation
            "not an object",
        ],
    }
    (tmp_path / "edge.json").write_text(json.dumps(doc))
    (tmp_path / "none.json").write_text(json.dumps({"image": {}, "annotations": []}))
    out = decode_batch(batch([img, img], [str(tmp_path / "edge.json"), str(tmp_path / "none.json")]), cfg())
    r = row(out, 0)
    assert_ok(r)
    assert r[B.MASK_IDS] == ["0", "5"]
    assert r[B.MASK_AREA].tolist() == [int(m.sum()), 9 * 7]
    assert [(e["region_id"], e["error_type"]) for e in r[B.MASK_ERRORS]] == [
        ("6", "MalformedMask"),
        ("3", "MalformedMask"),
    ]
    empty = row(out, 1)  # a file that lists no annotation: 0 masks, said by the file itself
    assert_ok(empty)
    assert empty[B.MASK_IDS] == [] and empty[B.MASK_RLE] == [] and empty[B.MASKS_SQUARE].shape == (0, S, S)


def test_the_json_declared_size_is_the_rows_frame(tmp_path):
    """An SA-1B JSON declaring another size than the image: each mask fails as MaskSizeMismatch (per region)."""
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    masks = random_masks(2, 2)
    ref = sa1b_json(tmp_path / "x.json", masks, [1, 2], size=(H + 1, W))
    r = row(decode_batch(batch([img], [ref]), cfg()), 0)
    assert_ok(r)
    assert r[B.MASK_IDS] == [] and [e["error_type"] for e in r[B.MASK_ERRORS]] == ["MaskSizeMismatch"] * 2


def test_sa1b_reference_errors_are_row_errors_naming_the_uri(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    (tmp_path / "bad.json").write_text('{"annotations": [')
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    refs = [str(tmp_path / n) for n in ("gone.json", "bad.json", "other.json", "bin.json")]
    out = decode_batch(batch([img] * 4, refs), cfg())
    assert_failed(row(out, 0), "mask", "MasksNotFound", "gone.json", "not found")
    assert_failed(row(out, 1), "mask", "MalformedMaskReference", "bad.json", "not valid JSON")
    assert_failed(row(out, 2), "mask", "MalformedMaskReference", "other.json", "no 'annotations' list")
    assert_failed(row(out, 3), "mask", "MalformedMaskReference", "bin.json")
    assert failed_rows(out).all()


def test_a_missing_image_is_reported_before_its_masks(tmp_path):
    out = decode_batch(batch([str(tmp_path / "nope.png")], [str(tmp_path / "gone.json")]), cfg())
    assert out[B.ERROR_STAGE][0] == "read" and out[B.ERROR_TYPE][0] == "FileNotFoundError"


# ---------------------------------------------------------------------------------------------- PNG folders
def test_png_folder_reference(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    folder = tmp_path / "image123"
    folder.mkdir()
    truth = random_masks(3, 3)
    for name, m in zip(("b.png", "a.png", "c.PNG"), truth):
        png_mask(folder / name, m)
    png_mask(folder / "wrong.png", np.ones((H, W + 2), bool))  # another size: that mask only
    (folder / "notes.txt").write_text("ignored")
    (folder / "sub").mkdir()
    png_mask(folder / "sub" / "deep.png", truth[0])  # not in the folder itself
    out = decode_batch(batch([img, img], [str(folder) + "/", str(folder)]), cfg())
    for i in (0, 1):  # with or without the trailing slash
        r = row(out, i)
        assert_ok(r)
        assert r[B.MASK_IDS] == ["a", "b", "c"]  # stems, by file name
        order = [truth[1], truth[0], truth[2]]
        assert r[B.MASK_AREA].tolist() == [int(m.sum()) for m in order]
        for rle, m in zip(r[B.MASK_RLE], order):
            np.testing.assert_array_equal(rle_decode(rle), m)
        [err] = r[B.MASK_ERRORS]
        assert err["region_id"] == "wrong" and err["error_type"] == "MaskSizeMismatch"


def test_png_folder_errors(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_bytes(b"x")
    refs = [str(tmp_path / "missing") + "/", str(tmp_path / "empty") + "/", str(tmp_path / "file.bin")]
    out = decode_batch(batch([img] * 3, refs), cfg())
    assert_failed(row(out, 0), "mask", "MasksNotFound", "missing")
    assert_failed(row(out, 1), "mask", "NoMasksForImage", "empty", "no .png")
    assert_failed(row(out, 2), "mask", "MalformedMaskReference", "file.bin")


# ---------------------------------------------------------------------------------------------- side Parquet
RLE_T = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
SIDE = pa.schema(
    [
        ("image_id", pa.string()),
        ("region_id", pa.string()),
        ("rle", RLE_T),
        ("polygon", pa.list_(pa.list_(pa.float64()))),
    ]
)


def side_rows(image_id: str, masks: list[np.ndarray], prefix: str = "r") -> list[dict]:
    return [
        {"image_id": image_id, "region_id": f"{prefix}{k}", "rle": rle_encode(m), "polygon": None}
        for k, m in enumerate(masks)
    ]


def test_side_parquet_reference(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    a, b = random_masks(4, 2), random_masks(5, 1)
    rows = side_rows("a", a) + side_rows("b", b) + side_rows("other", random_masks(6, 2))
    rows.append({"image_id": "b", "region_id": "poly", "rle": None, "polygon": [[2, 2, 6, 2, 6, 6, 2, 6]]})
    table_path = tmp_path / "masks.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SIDE), table_path)
    ref = str(table_path)
    out = decode_batch(batch([img] * 3, [ref] * 3, ids=["a", "b", "c"]), cfg())
    ra, rb, rc = row(out, 0), row(out, 1), row(out, 2)
    assert_ok(ra)
    assert_ok(rb)
    assert ra[B.MASK_IDS] == ["r0", "r1"] and rb[B.MASK_IDS] == ["r0", "poly"]
    assert ra[B.MASK_AREA].tolist() == [int(m.sum()) for m in a]
    assert rb[B.MASK_AREA].tolist() == [int(b[0].sum()), 16]
    # an image listed with masks_uri but without rows in the side table: an error row naming it (it asked for masks)
    assert_failed(rc, "mask", "NoMasksForImage", "masks.parquet", "'c'")
    # alone in its batch, too
    alone = decode_batch(batch([img], [ref], ids=["c"]), cfg())
    assert_failed(row(alone, 0), "mask", "NoMasksForImage", "'c'")


def test_side_parquet_folder_and_mask_struct_column(tmp_path):
    """A folder of Parquet files (named ``….parquet/`` or not) read as one table; the mask as one ``MASK`` struct."""
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    a, b = random_masks(7, 2), random_masks(8, 1)
    mask_t = pa.struct([("rle", RLE_T), ("polygon", pa.list_(pa.list_(pa.float64())))])
    schema = pa.schema([("image_id", pa.string()), ("region_id", pa.string()), ("mask", mask_t)])
    for folder in ("side.parquet", "side"):
        (tmp_path / folder).mkdir()
        for part, (iid, ms) in enumerate((("a", a), ("b", b))):
            rows = [{"image_id": iid, "region_id": f"m{k}", "mask": {"rle": rle_encode(m)}} for k, m in enumerate(ms)]
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / folder / f"part-{part}.parquet")
    refs = [str(tmp_path / "side.parquet") + "/", str(tmp_path / "side") + "/", str(tmp_path / "side")]
    out = decode_batch(batch([img] * 3, refs, ids=["a", "b", "a"]), cfg())
    for i, truth in ((0, a), (1, b), (2, a)):
        r = row(out, i)
        assert_ok(r)
        assert r[B.MASK_IDS] == [f"m{k}" for k in range(len(truth))]
        assert r[B.MASK_AREA].tolist() == [int(m.sum()) for m in truth]


def test_side_parquet_errors(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    pq.write_table(pa.table({"image_id": ["a"], "region_id": ["r"]}), tmp_path / "nomask.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    refs = [str(tmp_path / n) for n in ("gone.parquet", "nomask.parquet", "junk.parquet")]
    out = decode_batch(batch([img] * 3, refs, ids=["a", "a", "a"]), cfg())
    assert_failed(row(out, 0), "mask", "MasksNotFound", "gone.parquet")
    assert_failed(row(out, 1), "mask", "MalformedMaskReference", "nomask.parquet", "rle/polygon")
    assert_failed(row(out, 2), "mask", "MalformedMaskReference", "junk.parquet")


class CountingFileSystem(LocalFileSystem):
    """The local filesystem as ``counting://``, adding up the bytes read through it."""

    protocol = "counting"
    root_marker = "/"
    bytes_read = 0

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("counting://") :] if str(path).startswith("counting://") else path
        return LocalFileSystem._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        read = f.read

        def counted(*args):
            data = read(*args)
            CountingFileSystem.bytes_read += len(data)
            return data

        f.read = counted
        return f


fsspec.register_implementation("counting", CountingFileSystem, clobber=True)


def test_one_image_reads_its_row_groups_not_the_whole_table(tmp_path):
    """A side table sorted by image_id with many row groups: one image's lookup reads the footer and the row group its
    statistics select, not the whole file; the worker keeps the footer, so a later batch reads the row group alone."""
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    rng = np.random.default_rng(9)
    rows = []
    for k in range(400):
        for r in range(5):
            m = rng.random((H, W)) < 0.5  # noisy masks: long counts strings, a file worth pruning
            rows.append({"image_id": f"img{k:04d}", "region_id": str(r), "rle": rle_encode(m), "polygon": None})
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SIDE), path, row_group_size=25)
    size = path.stat().st_size
    meta = pq.ParquetFile(path).metadata
    largest_group = max(
        sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
        for g in range(meta.num_row_groups)
    )
    config = cfg(allowed_schemes=("file", "counting"))
    reads = []
    for image_id in ("img0123", "img0301"):
        CountingFileSystem.bytes_read = 0
        out = decode_batch(batch([img], [f"counting://{path}"], ids=[image_id]), config)
        assert_ok(row(out, 0))
        assert out[B.MASK_IDS][0] == ["0", "1", "2", "3", "4"]
        reads.append(CountingFileSystem.bytes_read)
    # the first: the footer (read when the table is found and again when kept; 64 KiB read-ahead) and one row group
    assert reads[0] <= 2 * (meta.serialized_size + 65536) + largest_group < size / 2, (reads, size)
    assert 0 < reads[1] <= largest_group, (reads, largest_group)


# ---------------------------------------------------------------------------------------------- rows and batches
def test_rows_failed_upstream_are_not_fetched(tmp_path):
    FlakyFileSystem.reset()
    try:
        buf = io.BytesIO()
        marked_rgb(W, H).save(buf, format="PNG")
        FlakyFileSystem.files["b/x.png"] = buf.getvalue()
        FlakyFileSystem.files["b/x.json"] = json.dumps(
            {"annotations": [{"id": 1, "segmentation": rle_encode(random_masks(1, 1)[0])}]}
        ).encode()
        nan = np.float32("nan")
        b = batch(
            ["flaky://b/x.png", "flaky://b/x.png"],
            ["flaky://b/x.json", "flaky://b/never.json"],
            ids=["ok", "refused"],
            error_stage=B.objects([nan, "manifest"]),
            error_type=B.objects([nan, "UnsupportedScheme"]),
            error_message=B.objects([nan, "refused by the manifest check"]),
        )
        out = decode_batch(b, cfg(allowed_schemes=("flaky",)))
        assert_ok(row(out, 0))
        assert out[B.MASK_IDS][0] == ["1"]
        assert_failed(row(out, 1), "manifest", "UnsupportedScheme", "refused by the manifest check")
        assert "b/never.json" not in FlakyFileSystem.opens and FlakyFileSystem.opens["b/x.png"] == 1
    finally:
        FlakyFileSystem.reset()


def test_reference_reads_are_retried_and_bounded(tmp_path):
    FlakyFileSystem.reset()
    try:
        buf = io.BytesIO()
        marked_rgb(W, H).save(buf, format="PNG")
        FlakyFileSystem.files["b/x.png"] = buf.getvalue()
        doc = json.dumps({"annotations": [{"id": 1, "segmentation": rle_encode(random_masks(1, 1)[0])}]}).encode()
        FlakyFileSystem.files["b/once.json"] = FlakyFileSystem.files["b/always.json"] = doc
        FlakyFileSystem.fail_times.update({"b/once.json": 1, "b/always.json": 9})
        out = decode_batch(
            batch(["flaky://b/x.png"] * 2, ["flaky://b/once.json", "flaky://b/always.json"]),
            cfg(allowed_schemes=("flaky",), retries=2),
        )
        assert_ok(row(out, 0))
        assert FlakyFileSystem.opens["b/once.json"] == 2
        assert_failed(row(out, 1), "mask", "ConnectionResetError", "flaky://b/always.json", "after 3 attempts")
        assert FlakyFileSystem.opens["b/always.json"] == 3
    finally:
        FlakyFileSystem.reset()


def test_a_reference_with_a_refused_scheme_is_not_read(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    out = decode_batch(batch([img], ["s3://AKIAPLANTED:planted-secret-77@b/x.json"]), cfg(allowed_schemes=("file",)))
    assert_failed(row(out, 0), "mask", "UnsupportedScheme", "s3://***@b/x.json")
    assert "planted" not in out[B.ERROR_MESSAGE][0] and "AKIA" not in out[B.ERROR_MESSAGE][0]


def test_inline_and_referenced_masks_together_are_refused(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    [m] = random_masks(1, 1)
    ref = sa1b_json(tmp_path / "x.json", [m], [1])
    inline = [{"region_id": "1", "rle": rle_encode(m)}]
    nan = np.float64("nan")
    out = decode_batch(batch([img, img, img], [ref, None, ref], masks=[inline, inline, nan]), cfg())
    assert_failed(row(out, 0), "mask", "AmbiguousMasks", "masks and masks_uri")
    assert_ok(row(out, 1))  # inline alone
    assert_ok(row(out, 2))  # by reference alone, the inline column null (NaN, as Ray hands it over)
    assert out[B.MASK_IDS][1] == out[B.MASK_IDS][2] == ["1"]


def test_without_need_masks_references_are_ignored(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    out = decode_batch(batch([img], [str(tmp_path / "gone.json")]), cfg(need_masks=False))
    assert_ok(row(out, 0))
    assert B.MASK_RLE not in out and B.MASKS_URI not in out


# ---------------------------------------------------------------------------------------------- mask_rle
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_mask_rle_agrees_with_pycocotools_in_the_decoded_frame(tmp_path):
    """``mask_rle`` is the COCO RLE of each mask at the image's decoded size: pycocotools' area and bbox of it equal
    ``mask_area``/``mask_bbox``; for an EXIF-rotated photo whose RLE was drawn on the stored frame, it is the mask
    turned with the pixels (size = the decoded frame)."""
    mask_util = pytest.importorskip("pycocotools.mask")
    stored_w, stored_h = 40, 24
    img = jpeg_with_orientation(tmp_path / "rot.jpg", stored_w, stored_h, 6)  # decoded as 24 wide, 40 high
    stored = random_masks(11, 4, stored_h, stored_w)
    ref = sa1b_json(tmp_path / "rot.json", stored, [1, 2, 3, 4], size=(stored_h, stored_w))
    plain = save(marked_rgb(W, H), tmp_path / "x.png")
    plain_ref = sa1b_json(tmp_path / "x.json", random_masks(12, 5), [1, 2, 3, 4, 5])
    out = decode_batch(batch([img, plain], [ref, plain_ref]), cfg())
    for i, frame in ((0, [stored_w, stored_h]), (1, [H, W])):
        r = row(out, i)
        assert_ok(r)
        assert len(r[B.MASK_RLE]) == len(r[B.MASK_IDS]) > 0
        coco = [{"size": rle["size"], "counts": rle["counts"].encode("ascii")} for rle in r[B.MASK_RLE]]
        assert all(rle["size"] == frame for rle in r[B.MASK_RLE])
        np.testing.assert_array_equal(mask_util.area(coco), r[B.MASK_AREA])
        np.testing.assert_array_equal(mask_util.toBbox(coco), r[B.MASK_BBOX])
        for rle, c in zip(r[B.MASK_RLE], coco):
            np.testing.assert_array_equal(mask_util.decode(c).astype(bool), rle_decode(rle))
    # the rotated one is the stored mask turned as the pixels are (tag 6: 90° clockwise)
    for rle, m in zip(row(out, 0)[B.MASK_RLE], stored):
        np.testing.assert_array_equal(rle_decode(rle), np.rot90(m, k=-1))


def test_mask_rle_of_inline_masks_and_failed_rows(tmp_path):
    img = save(marked_rgb(W, H), tmp_path / "x.png")
    truth = random_masks(13, 2)
    inline = [
        {"region_id": "p", "polygon": [[0, 0, 8, 0, 8, 4, 0, 4]]},
        {"region_id": "r", "rle": rle_encode(truth[0])},
    ]
    out = decode_batch(batch([img, str(tmp_path / "nope.png")], [None, None], masks=[inline, inline]), cfg())
    box = np.zeros((H, W), bool)
    box[:4, :8] = True
    np.testing.assert_array_equal(rle_decode(out[B.MASK_RLE][0][0]), box)
    np.testing.assert_array_equal(rle_decode(out[B.MASK_RLE][0][1]), truth[0])
    assert out[B.MASK_RLE][1] is None and out[B.ERROR_STAGE][1] == "read"
    # Arrow type as declared: the column converts to its declared list<struct>
    arr = pa.array(list(out[B.MASK_RLE]), type=B.COLUMNS[B.MASK_RLE].arrow)
    assert arr.null_count == 1 and arr[0][0]["size"].as_py() == [H, W]


def test_png_masks_with_an_exif_rotated_image_are_read_in_their_frame(tmp_path):
    """PNG masks of a folder reference drawn on the stored frame of a rotated photo are turned like the pixels."""
    img = jpeg_with_orientation(tmp_path / "rot.jpg", 40, 24, 6)
    folder = tmp_path / "rot"
    folder.mkdir()
    [m] = random_masks(14, 1, 24, 40)
    png_mask(folder / "0.png", m)
    r = row(decode_batch(batch([img], [str(folder) + "/"]), cfg()), 0)
    assert_ok(r)
    np.testing.assert_array_equal(rle_decode(r[B.MASK_RLE][0]), np.rot90(m, k=-1))
    assert Image.open(img).size == (40, 24)
