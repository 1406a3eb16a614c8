"""The CPU decode stage on real files: formats and modes, EXIF orientation, broken inputs, masks, retries."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from clipmaps.pipeline.decode import (
    OUTPUT_COLUMNS,
    DecodeConfig,
    DecodeStage,
    decode_batch,
    failed_rows,
    is_transient,
    load_image,
    output_columns,
    to_rgb,
)
from clipmaps.pipeline.decode.image import EXIF_TRANSPOSE, load_oriented
from clipmaps.pipeline.decode.masks import decode_mask, orient_mask
from clipmaps.pipeline.decode.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, default_preprocess
from clipmaps.schemas import batches as B
from clipmaps.schemas.datasets import MANIFEST
from clipmaps.schemas.encodings import rle_encode
from clipmaps.schemas.errors import RowError
from tests.helpers.data_images import (
    FlakyFileSystem,
    find_box,
    jpeg_with_box,
    jpeg_with_orientation,
    marked_rgb,
    png_claiming_size,
    png_mask,
    save,
    truncated_jpeg,
)

S = 32


def cfg(**kw) -> DecodeConfig:
    base = {"square_size": S, "retry_backoff_s": 0.0, "io_threads": 4}
    return DecodeConfig(**{**base, **kw})


def batch(*uris, masks=None, **extra) -> dict[str, np.ndarray]:
    n = len(uris)
    out = {
        B.IMAGE_ID: np.array([f"id{i}" for i in range(n)], dtype=object),
        B.IMAGE_URI: np.array(list(uris), dtype=object),
    }
    if masks is not None:
        col = np.empty(n, dtype=object)
        for i, m in enumerate(masks):
            col[i] = m
        out["masks"] = col
    out.update(extra)
    return out


def row(out: dict, i: int) -> dict:
    return {k: v[i] for k, v in out.items()}


def assert_ok(r: dict):
    assert r[B.ERROR_STAGE] is None, (r[B.ERROR_TYPE], r[B.ERROR_MESSAGE])


def assert_error(r: dict, stage: str, error_type: str, *fragments: str):
    """A failed row: error columns set; sizes 0, every tensor column the declared empty fill (a good row's ``ndim``),
    list columns null."""
    assert (r[B.ERROR_STAGE], r[B.ERROR_TYPE]) == (stage, error_type), r[B.ERROR_MESSAGE]
    for fragment in fragments:
        assert fragment in r[B.ERROR_MESSAGE]
    assert r[B.HEIGHT] == 0 and r[B.WIDTH] == 0
    for name, shape in (
        (B.PIXELS_SQUARE, (3, 0, 0)),
        (B.PIXELS_MASKCLIP, (3, 0, 0)),
        (B.MASKS_SQUARE, (0, 0, 0)),
        (B.MASK_AREA, (0,)),
        (B.MASK_BBOX, (0, 4)),
    ):
        if name in r:
            assert r[name].shape == shape and r[name].ndim == B.COLUMNS[name].ndim, name
    for name in (B.MASK_IDS, B.MASK_RLE, B.MASK_ERRORS):
        if name in r:
            assert r[name] is None


def unnormalise(chw: np.ndarray) -> np.ndarray:
    """``pixels_square`` back to 0..255 HWC (OpenAI mean/std)."""
    hwc = chw.transpose(1, 2, 0) * np.asarray(OPENAI_STD) + np.asarray(OPENAI_MEAN)
    return hwc * 255.0


# ---------------------------------------------------------------------------------------------- formats and modes
def test_jpeg_and_png_shapes_dtypes_and_columns(tmp_path):
    jpg = save(marked_rgb(64, 48), tmp_path / "a.jpg", quality=95)
    png = save(marked_rgb(40, 30), tmp_path / "b.png")
    maskclip = Preprocess(size=24, mode="short_side", resample="bilinear")
    out = decode_batch(
        batch(jpg, png, prompts=np.array([np.array(["cat", "dog"], dtype=object), None], dtype=object)),
        cfg(maskclip=maskclip),
    )
    assert list(out) == [
        B.IMAGE_ID,
        B.IMAGE_URI,
        B.HEIGHT,
        B.WIDTH,
        B.ERROR_STAGE,
        B.ERROR_TYPE,
        B.ERROR_MESSAGE,
        B.PROMPTS,
        B.PIXELS_SQUARE,
        B.PIXELS_MASKCLIP,
    ]  # masks dropped, no mask columns
    assert out[B.HEIGHT].dtype == np.int64 and out[B.WIDTH].dtype == np.int64
    assert all(v.dtype == object and v.shape == (2,) for k, v in out.items() if k not in (B.HEIGHT, B.WIDTH))
    a, b = row(out, 0), row(out, 1)
    assert_ok(a)
    assert_ok(b)
    assert (a[B.HEIGHT], a[B.WIDTH], b[B.HEIGHT], b[B.WIDTH]) == (48, 64, 30, 40)
    assert a[B.PIXELS_SQUARE].shape == (3, S, S) and a[B.PIXELS_SQUARE].dtype == np.float32
    assert a[B.PIXELS_MASKCLIP].shape == (3, 24, 32) and a[B.PIXELS_MASKCLIP].dtype == np.float32
    assert b[B.PIXELS_MASKCLIP].shape == (3, 24, 32)
    assert a[B.PROMPTS] == ["cat", "dog"] and b[B.PROMPTS] is None
    assert not failed_rows(out).any()
    np.testing.assert_allclose(a[B.PIXELS_SQUARE], Preprocess(size=S).image(Image.open(jpg)), atol=1e-6)


def test_square_none_and_maskclip_default(tmp_path):
    p = save(marked_rgb(600, 400), tmp_path / "a.png")
    out = decode_batch(batch(p), cfg(square_size=None, maskclip=default_preprocess("maskclip")))
    r = row(out, 0)
    assert B.PIXELS_SQUARE not in r and r[B.PIXELS_MASKCLIP].shape == (3, 512, 768)
    assert output_columns(cfg(square_size=None, need_masks=True)) == (
        B.HEIGHT,
        B.WIDTH,
        B.ERROR_STAGE,
        B.ERROR_TYPE,
        B.ERROR_MESSAGE,
        B.PROMPTS,
        B.MASK_IDS,
        B.MASK_AREA,
        B.MASK_BBOX,
        B.MASK_RLE,
        B.MASK_ERRORS,
    )
    assert set(output_columns(cfg(maskclip=default_preprocess("maskclip"), need_masks=True))) == set(OUTPUT_COLUMNS)


def test_cmyk_jpeg(tmp_path):
    p = save(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    img = load_image(Path(p).read_bytes())
    assert img.mode == "RGB" and img.size == (16, 12)
    r, g, b = np.asarray(img, dtype=int).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red
    assert_ok(row(decode_batch(batch(p), cfg()), 0))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).round().astype(np.uint16)
    ramp[0, 0], ramp[0, 1], ramp[0, 2] = 0, 32768, 65535
    p = save(Image.fromarray(ramp), tmp_path / "g16.png")
    assert Image.open(p).mode.startswith("I")
    arr = np.asarray(load_image(Path(p).read_bytes()))
    assert arr.dtype == np.uint8 and arr.shape == (16, 64, 3)
    assert tuple(arr[0, :3, 0]) == (0, 128, 255)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert len(np.unique(arr)) > 200  # the full range survives (clipping would leave almost only 255)
    assert_ok(row(decode_batch(batch(p), cfg()), 0))


def test_other_high_depth_modes():
    i32 = Image.fromarray(np.array([[0, 65535], [257, 1000]], dtype=np.int32), "I")
    assert to_rgb(i32).getpixel((1, 0)) == (255, 255, 255)
    assert to_rgb(i32).getpixel((0, 1)) == (1, 1, 1)
    wide = Image.fromarray(np.array([[-100, 100]], dtype=np.int32), "I")
    assert (np.asarray(to_rgb(wide))[0, :, 0].tolist()) == [0, 255]  # min–max
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32), "F")
    assert (np.asarray(to_rgb(f))[0, :, 0].tolist()) == [0, 128, 255, 0]
    one_bit = Image.new("1", (2, 1))
    one_bit.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(one_bit)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_grayscale(tmp_path):
    p = save(Image.new("L", (10, 7), 77), tmp_path / "g.png")
    img = load_image(Path(p).read_bytes())
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (77, 77, 77)


def test_transparency_is_composited_on_white(tmp_path):
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)  # index 0 transparent (black in the palette)
    p = save(pal, tmp_path / "pal.png", transparency=0)
    img = load_image(Path(p).read_bytes())
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((5, 5)) == (255, 0, 0)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    q = save(rgba, tmp_path / "rgba.png")
    img = load_image(Path(q).read_bytes())
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) in ((127, 127, 127), (126, 126, 126), (128, 128, 128))
    assert img.getpixel((3, 3)) == (0, 0, 255)
    la = save(Image.new("LA", (3, 3), (0, 0)), tmp_path / "la.png")
    assert load_image(Path(la).read_bytes()).getpixel((1, 1)) == (255, 255, 255)
    gif = save(pal, tmp_path / "pal.gif", transparency=0)
    assert load_image(Path(gif).read_bytes()).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("orientation", "size", "corner"),
    [(1, (40, 20), "tl"), (3, (40, 20), "br"), (6, (20, 40), "tr"), (8, (20, 40), "bl"), (2, (40, 20), "tr")],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, corner):
    p = jpeg_with_orientation(tmp_path / f"o{orientation}.jpg", 40, 20, orientation)
    img = load_image(Path(p).read_bytes())
    assert img.size == size
    w, h = size
    xy = {"tl": (2, 2), "tr": (w - 3, 2), "bl": (2, h - 3), "br": (w - 3, h - 3)}
    for name, (x, y) in xy.items():
        r, g, b = img.getpixel((x, y))
        is_red = r > 200 and g < 60 and b < 60
        assert is_red == (name == corner), (name, img.getpixel((x, y)))
    # through the stage: height/width after orientation, and the mark lands in the square input too
    out = row(decode_batch(batch(p), cfg(square_size=40)), 0)
    assert (out[B.WIDTH], out[B.HEIGHT]) == size
    red = unnormalise(out[B.PIXELS_SQUARE])[..., 0]
    sx, sy = {"tl": (1, 1), "tr": (38, 1), "bl": (1, 38), "br": (38, 38)}[corner]
    assert red[sy, sx] > 200 and red[39 - sy, 39 - sx] < 160


def test_tiny_and_extreme_aspect_images(tmp_path):
    one = save(Image.new("RGB", (1, 1), (10, 200, 30)), tmp_path / "one.png")
    long = save(Image.new("RGB", (4000, 10), (1, 2, 3)), tmp_path / "long.jpg")
    out = decode_batch(batch(one, long), cfg(maskclip=default_preprocess("maskclip")))
    a, b = row(out, 0), row(out, 1)
    assert_ok(a)
    assert_ok(b)
    assert (a[B.HEIGHT], a[B.WIDTH]) == (1, 1) and a[B.PIXELS_SQUARE].shape == (3, S, S)
    assert a[B.PIXELS_MASKCLIP].shape == (3, 512, 512)
    assert (b[B.HEIGHT], b[B.WIDTH]) == (10, 4000) and b[B.PIXELS_SQUARE].shape == (3, S, S)
    assert b[B.PIXELS_MASKCLIP].shape == (3, 5, 2048)  # long side capped at 2048


# ---------------------------------------------------------------------------------------------- broken inputs
def test_decompression_bombs(tmp_path):
    huge = png_claiming_size(tmp_path / "huge.png", 100_000, 100_000)  # a few hundred bytes on disk
    big = png_claiming_size(tmp_path / "big.png", 9_000, 9_000)  # under Pillow's hard limit, over ours
    normal = save(marked_rgb(50, 40), tmp_path / "normal.png")
    before = Image.MAX_IMAGE_PIXELS
    out = decode_batch(batch(huge, big, normal), cfg(max_pixels=50_000_000))
    assert_error(row(out, 0), "decode", "DecompressionBomb", str(huge))
    assert_error(row(out, 1), "decode", "DecompressionBomb", "9000x9000 = 81000000 pixels exceeds max_pixels 50000000")
    assert_ok(row(out, 2))
    low = decode_batch(batch(normal), cfg(max_pixels=1999))
    assert_error(row(low, 0), "decode", "DecompressionBomb", "50x40 = 2000 pixels")
    assert before == Image.MAX_IMAGE_PIXELS  # never changed globally


def test_broken_files_become_error_rows_in_order(tmp_path):
    good = save(marked_rgb(20, 10), tmp_path / "good.jpg")
    trunc = truncated_jpeg(tmp_path / "trunc.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not an image\n" * 10)
    eps = tmp_path / "x.eps"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    uris = [
        good,
        trunc,
        str(tmp_path / "zero.jpg"),
        str(tmp_path / "text.jpg"),
        str(tmp_path / "missing.jpg"),
        "ftp://host/a.jpg",
        good,
        str(tmp_path),
        str(eps),
        None,
    ]
    out = decode_batch(batch(*uris), cfg(need_masks=True, maskclip=default_preprocess("maskclip")))
    assert all(len(v) == len(uris) for v in out.values())
    assert failed_rows(out).tolist() == [False, True, True, True, True, True, False, True, True, True]
    assert list(out[B.IMAGE_URI]) == uris and list(out[B.IMAGE_ID]) == [f"id{i}" for i in range(len(uris))]
    assert_ok(row(out, 0))
    assert_error(row(out, 1), "decode", "TruncatedImage", trunc)
    assert_error(row(out, 2), "decode", "EmptyFile", "0 bytes")
    assert_error(row(out, 3), "decode", "UnidentifiedImageError", "text.jpg", "not a recognised image")
    assert_error(row(out, 4), "read", "FileNotFoundError", "missing.jpg: not found")
    assert_error(row(out, 5), "read", "UnsupportedScheme", "'ftp'")
    assert_ok(row(out, 6))
    assert_error(row(out, 7), "read", "IsADirectoryError")
    assert_error(row(out, 8), "decode", "UnidentifiedImageError")  # EPS is not in the accepted formats
    assert_error(row(out, 9), "read", "MissingImageUri")
    np.testing.assert_array_equal(out[B.PIXELS_SQUARE][0], out[B.PIXELS_SQUARE][6])


def test_rows_failed_earlier_are_passed_through(tmp_path):
    good = save(marked_rgb(20, 10), tmp_path / "good.jpg")
    nan = np.float32("nan")  # how Ray hands back a column that was None on every row of a block
    b = batch(
        good,
        good,
        good,
        error_stage=np.array([None, "manifest", nan], dtype=object),
        error_type=np.array([None, "X", nan], dtype=object),
        error_message=np.array([None, "earlier", nan], dtype=object),
        extra=np.array([1, 2, 3]),
    )
    out = decode_batch(b, cfg())
    assert_ok(row(out, 0))
    assert_ok(row(out, 2))
    assert (out[B.ERROR_STAGE][1], out[B.ERROR_TYPE][1], out[B.ERROR_MESSAGE][1]) == ("manifest", "X", "earlier")
    assert out[B.PIXELS_SQUARE][1].shape == (3, 0, 0) and out[B.PIXELS_SQUARE][2].shape == (3, S, S)
    np.testing.assert_array_equal(out["extra"], [1, 2, 3])  # other columns pass through untouched
    assert failed_rows(out).tolist() == [False, True, False]
    assert failed_rows({B.ERROR_STAGE: np.full(2, nan, np.float32)}).tolist() == [False, False]


# ---------------------------------------------------------------------------------------------- masks
def test_masks(tmp_path):
    h, w = 24, 36
    img = save(marked_rgb(w, h), tmp_path / "img.png")
    good = np.zeros((h, w), bool)
    good[4:10, 5:20] = True
    png = np.zeros((h, w), bool)
    png[20:, 30:] = True
    png_mask(tmp_path / "m.png", png)
    png_mask(tmp_path / "small.png", np.ones((h // 2, w // 2), bool))
    bad_counts = dict(rle_encode(good))
    bad_counts["counts"] = bad_counts["counts"][:-1]
    masks = [
        {"region_id": "rle", "rle": rle_encode(good), "uri": None, "polygon": None},
        {"region_id": "poly", "rle": None, "uri": None, "polygon": [[2.0, 2.0, 12.0, 2.0, 12.0, 8.0, 2.0, 8.0]]},
        {"region_id": "png", "rle": None, "uri": str(tmp_path / "m.png"), "polygon": None},
        {"region_id": "full", "rle": rle_encode(np.ones((h, w), bool))},
        {"region_id": None, "rle": rle_encode(good.T.copy())},  # wrong size, id from its index: "4"
        {"region_id": "empty", "rle": rle_encode(np.zeros((h, w), bool))},
        {"region_id": "malformed", "rle": bad_counts},
        {"region_id": "gone", "uri": str(tmp_path / "nope.png")},
        {"region_id": "small", "uri": str(tmp_path / "small.png")},
        {"region_id": "both", "rle": rle_encode(good), "uri": str(tmp_path / "m.png")},
        {"region_id": "outside", "polygon": [[100, 100, 120, 100, 110, 120]]},
        {"region_id": "rle", "polygon": [[0, 0, 3, 0, 3, 3]]},
        {"region_id": "badpoly", "polygon": [[0, 0, 3]]},
    ]
    out = row(decode_batch(batch(img, masks=[masks]), cfg(need_masks=True)), 0)
    assert_ok(out)
    assert out[B.MASK_IDS] == ["rle", "poly", "png", "full"]
    sq = out[B.MASKS_SQUARE]
    assert sq.dtype == np.float32 and sq.shape == (4, S, S) and sq.min() >= 0 and sq.max() <= 1
    np.testing.assert_allclose(sq[0], Preprocess(size=S).mask(good, (w, h)))
    assert np.all(sq[3] == 1.0)
    assert out[B.MASK_AREA].dtype == np.int64 and out[B.MASK_BBOX].dtype == np.int32
    assert out[B.MASK_AREA].tolist()[0] == good.sum() and out[B.MASK_AREA].tolist()[2:] == [png.sum(), h * w]
    assert out[B.MASK_BBOX].tolist()[0] == [5, 4, 15, 6]
    assert out[B.MASK_BBOX].tolist()[2] == [30, 20, 6, 4]
    assert out[B.MASK_BBOX].tolist()[3] == [0, 0, w, h]
    errors = {e["region_id"]: (e["error_type"], e["message"]) for e in out[B.MASK_ERRORS]}
    assert errors["4"][0] == "MaskSizeMismatch" and "[36, 24] differs from the image's [24, 36]" in errors["4"][1]
    assert errors["empty"][0] == "EmptyMask"
    assert errors["malformed"][0] == "MalformedRLE"
    assert errors["gone"][0] == "MaskNotFound" and "nope.png" in errors["gone"][1]
    assert errors["small"][0] == "MaskSizeMismatch"
    assert errors["both"][0] == "MalformedMask" and "rle, uri" in errors["both"][1]
    assert errors["outside"][0] == "EmptyMask"
    assert errors["rle"][0] == "DuplicateRegionId"
    assert errors["badpoly"][0] == "MalformedPolygon"
    assert len(out[B.MASK_ERRORS]) == 9


def test_masks_are_in_the_oriented_frame(tmp_path):
    p = jpeg_with_orientation(tmp_path / "o6.jpg", 40, 20, 6)  # displayed 20 wide, 40 tall
    oriented = np.zeros((40, 20), bool)
    oriented[:5, -5:] = True  # where the red mark ends up
    stored = np.zeros((20, 40), bool)
    stored[:5, :5] = True  # the red mark in the file's pixels
    masks = [[{"region_id": "a", "rle": rle_encode(oriented)}, {"region_id": "b", "rle": rle_encode(stored)}]]
    out = row(decode_batch(batch(p, masks=masks), cfg(need_masks=True, square_size=None)), 0)
    # auto: "b" is of the stored size, so it goes through the image's orientation and covers the mark too
    assert out[B.MASK_IDS] == ["a", "b"] and B.MASKS_SQUARE not in out
    assert out[B.MASK_BBOX].tolist() == [[15, 0, 5, 5], [15, 0, 5, 5]]
    only = row(decode_batch(batch(p, masks=masks), cfg(need_masks=True, annotation_frame="oriented")), 0)
    assert only[B.MASK_IDS] == ["a"] and [e["error_type"] for e in only[B.MASK_ERRORS]] == ["MaskSizeMismatch"]


def test_masks_in_ray_numpy_form_and_rows_without_masks(tmp_path):
    img = save(marked_rgb(16, 8), tmp_path / "i.png")
    m = np.zeros((8, 16), bool)
    m[2:4, 3:9] = True
    rle = rle_encode(m)
    ray_like = np.array(
        [
            {
                "region_id": "x",
                "rle": {"size": np.array(rle["size"], np.int32), "counts": rle["counts"]},
                "uri": None,
                "polygon": None,
            },
            {
                "region_id": "y",
                "rle": None,
                "uri": None,
                "polygon": np.array([np.array([1.0, 1.0, 6.0, 1.0, 6.0, 5.0])], dtype=object),
            },
        ],
        dtype=object,
    )
    out = decode_batch(batch(img, img, masks=[ray_like, None]), cfg(need_masks=True))
    a, b = row(out, 0), row(out, 1)
    assert a[B.MASK_IDS] == ["x", "y"] and a[B.MASK_ERRORS] == []
    assert b[B.MASK_IDS] == [] and b[B.MASKS_SQUARE].shape == (0, S, S) and b[B.MASK_BBOX].shape == (0, 4)
    assert b[B.MASK_AREA].shape == (0,)


def _case_image(tmp_path) -> str:
    """A 96 x 72 PNG, as the field cases use."""
    return save(Image.fromarray(np.full((72, 96, 3), 128, np.uint8)), tmp_path / "a.png")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_polygon_with_a_degenerate_part_keeps_its_real_part(tmp_path, caplog):
    coco = pytest.importorskip("pycocotools.coco")
    box = [24.0, 18.0, 48.0, 18.0, 48.0, 54.0, 24.0, 54.0]
    parts = {
        "10": [box, [60.0, 10.0, 60.0, 12.0]],  # the field case: a stray 2-point part
        "13": [[60.0, 10.0, 60.0, 12.0, 60.0, 14.0], box],  # a zero-area part first
        "14": [box, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]],  # an odd number of coordinates
        "15": [[60.5, 30.2], [60.5, 30.2]],  # nothing usable (as coco-point-segmentation)
        "16": [[-40.0, -40.0, -10.0, -40.0, -10.0, -10.0]],  # wholly outside the image
        "17": [[-10.0, -10.0, 20.0, -10.0, 20.0, 20.0, -10.0, 20.0]],  # partly outside: clipped
    }
    masks = [{"region_id": rid, "polygon": p} for rid, p in parts.items()]
    with caplog.at_level(logging.WARNING, logger="clipmaps.pipeline.decode.masks"):
        out = row(decode_batch(batch(_case_image(tmp_path), masks=[masks]), cfg(need_masks=True)), 0)
    assert_ok(out)
    # reference: pycocotools' COCO.annToMask on the same annotations (the usable ones: it cannot read "15")
    ref = coco.COCO()
    ref.dataset = {
        "images": [{"id": 1, "width": 96, "height": 72}],
        "annotations": [
            {"id": int(rid), "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": p}
            for rid, p in parts.items()
            if rid not in ("15", "16")
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    ref.createIndex()
    want = {str(a["id"]): ref.annToMask(a) for a in ref.dataset["annotations"]}
    assert out[B.MASK_IDS] == ["10", "13", "14", "17"]
    assert out[B.MASK_AREA].tolist() == [int(want[r].sum()) for r in out[B.MASK_IDS]] == [864, 864, 864, 400]
    assert out[B.MASK_BBOX].tolist()[0] == [24, 18, 24, 36] and out[B.MASK_BBOX].tolist()[3] == [0, 0, 20, 20]
    errors = {e["region_id"]: (e["error_type"], e["message"]) for e in out[B.MASK_ERRORS]}
    assert set(errors) == {"15", "16"}
    assert errors["15"][0] == "MalformedPolygon"
    assert "part 0: 1 point(s)" in errors["15"][1] and "part 1: 1 point(s)" in errors["15"][1]
    assert errors["16"] == ("EmptyMask", "the mask has no pixels inside the image")
    warned = [r.getMessage() for r in caplog.records if "degenerate polygon part" in r.getMessage()]
    assert any("region '10'" in w and "part 1" in w and "2 point(s)" in w for w in warned)
    assert any("region '13'" in w and "part 0" in w and "zero area" in w for w in warned)
    assert any("region '14'" in w and "part 1" in w and "odd number" in w for w in warned)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rle_forms_and_sizes(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    truth = np.zeros((72, 96), bool)
    truth[24:48, 60:84] = True
    runs = [int(r) for r in np.diff(np.flatnonzero(np.diff(np.r_[-1, truth.flatten(order="F"), -1])))]
    runs = [0, *runs] if truth[0, 0] else runs  # COCO counts start with a run of 0s
    their_area = int(mask_utils.area(mask_utils.frPyObjects({"size": [72, 96], "counts": runs}, 72, 96)))
    masks = [
        {"region_id": "crowd", "rle": {"size": [72, 96], "counts": runs}},  # uncompressed, as iscrowd
        {"region_id": "swapped", "rle": rle_encode(truth.T.copy())},  # [W, H] instead of [H, W]
        {"region_id": "small", "rle": rle_encode(truth[:36, :48])},
    ]
    out = row(decode_batch(batch(_case_image(tmp_path), masks=[masks]), cfg(need_masks=True)), 0)
    assert out[B.MASK_IDS] == ["crowd"] and out[B.MASK_AREA].tolist() == [their_area] == [576]
    errors = {e["region_id"]: (e["error_type"], e["message"]) for e in out[B.MASK_ERRORS]}
    assert errors["swapped"][0] == "MaskSizeMismatch"
    assert "RLE size [H, W] = [96, 72] differs from the image's [72, 96]" in errors["swapped"][1]
    assert errors["small"][0] == "MaskSizeMismatch" and "[36, 48]" in errors["small"][1]


def test_repeated_and_missing_region_ids_cost_only_the_later_mask(tmp_path):
    red = [24.0, 18.0, 48.0, 18.0, 48.0, 54.0, 24.0, 54.0]
    blue = [60.0, 24.0, 84.0, 24.0, 84.0, 48.0, 60.0, 48.0]
    masks = [
        {"region_id": "7", "polygon": [red]},
        {"region_id": "7", "polygon": [blue]},  # clashes with the first
        {"region_id": None, "polygon": [blue]},  # no id: named by its position, "2"
        {"region_id": "3", "polygon": [red]},
        {"region_id": None, "polygon": [red]},  # position "4"
    ]
    out = row(decode_batch(batch(_case_image(tmp_path), masks=[masks]), cfg(need_masks=True)), 0)
    assert_ok(out)
    assert out[B.MASK_IDS] == ["7", "2", "3", "4"]
    assert out[B.MASK_AREA].tolist() == [864, 576, 864, 864]
    assert out[B.MASK_ERRORS] == [
        {
            "region_id": "7",
            "error_type": "DuplicateRegionId",
            "message": "region_id '7' is used by an earlier mask",
        }
    ]


def test_arrow_table_input(tmp_path):
    img = save(marked_rgb(16, 8), tmp_path / "i.png")
    m = np.zeros((8, 16), bool)
    m[0, 0] = True
    table = pa.Table.from_pylist(
        [
            {"image_id": "a", "image_uri": img, "masks": [{"region_id": "0", "rle": rle_encode(m)}], "prompts": ["x"]},
            {"image_id": "b", "image_uri": str(tmp_path / "missing.png"), "masks": None, "prompts": None},
        ],
        schema=MANIFEST,
    )
    out = DecodeStage(cfg(need_masks=True))(table)
    assert out[B.MASK_IDS][0] == ["0"] and out[B.MASK_AREA][0].tolist() == [1] and out[B.PROMPTS][0] == ["x"]
    assert out[B.ERROR_TYPE][1] == "FileNotFoundError"


# ---------------------------------------------------------------------------------------------- retries, credentials
@pytest.fixture
def flaky():
    FlakyFileSystem.reset()
    buf = io.BytesIO()
    marked_rgb(12, 10).save(buf, format="PNG")
    FlakyFileSystem.files["b/img.png"] = buf.getvalue()
    yield FlakyFileSystem
    FlakyFileSystem.reset()


def test_transient_errors_are_retried(flaky):
    flaky.fail_times["b/img.png"] = 2
    out = decode_batch(batch("flaky://b/img.png"), cfg(allowed_schemes=("flaky",), retries=2))
    assert_ok(row(out, 0))
    assert flaky.opens["b/img.png"] == 3


def test_retries_are_bounded(flaky):
    flaky.fail_times["b/img.png"] = 5
    out = decode_batch(batch("flaky://b/img.png"), cfg(allowed_schemes=("flaky",), retries=1))
    assert_error(row(out, 0), "read", "ConnectionResetError", "flaky://b/img.png", "after 2 attempts")
    assert flaky.opens["b/img.png"] == 2


def test_missing_files_are_not_retried(flaky):
    out = decode_batch(batch("flaky://b/nope.png"), cfg(allowed_schemes=("flaky",), retries=3))
    assert_error(row(out, 0), "read", "FileNotFoundError")
    assert flaky.opens["b/nope.png"] == 1


def test_messages_never_carry_credentials(flaky):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    flaky.fail_times["b/img.png"] = 9
    flaky.error = OSError(f"server said no to key {secret}")
    so = {"key": "AKIAIOSFODNN7EXAMPLE", "secret": secret, "client_kwargs": {"endpoint_url": "http://x"}}
    out = decode_batch(batch("flaky://b/img.png"), cfg(allowed_schemes=("flaky",), storage_options=so, retries=0))
    assert_error(row(out, 0), "read", "OSError", "flaky://b/img.png", "server said no to key ***")
    assert secret not in out[B.ERROR_MESSAGE][0] and "AKIA" not in out[B.ERROR_MESSAGE][0]
    out = decode_batch(batch("s3://AKIAIOSFODNN7EXAMPLE:" + secret + "@bucket/x.jpg"), cfg(allowed_schemes=("gs",)))
    assert secret not in out[B.ERROR_MESSAGE][0] and "s3://***@bucket/x.jpg" in out[B.ERROR_MESSAGE][0]


def test_mask_errors_never_carry_credentials(flaky):
    """Mask URIs with a userinfo or a presigned signature, whose reads fail with messages that quote them without
    the scheme (as botocore does): the mask errors name the region and the URI, redacted."""
    secret, sig = "se/cr+et@planted-77", "5ca1ab1e0ddba11f00d"
    key = f"b/m2.png?X-Amz-Credential=AKIAPLANTED%2F2024&X-Amz-Signature={sig}"
    cases = [  # (mask URI, the message its read fails with)
        (f"flaky://AKIAPLANTED:{secret}@b/m.png", f'Invalid bucket name "AKIAPLANTED:{secret}@b"'),
        (f"flaky://{key}", f'no such key "{key}"'),
        (f"flaky://AKIAPLANTED:{secret}@b/gone.png", None),
    ]
    config = cfg(allowed_schemes=("flaky",), need_masks=True, retries=0)
    messages = []
    for uri, message in cases:
        if message is not None:
            flaky.fail_times[FlakyFileSystem._strip_protocol(uri)] = 9
            flaky.error = OSError(message)
        out = decode_batch(batch("flaky://b/img.png", masks=[[{"region_id": "r", "uri": uri}]]), config)
        assert_ok(row(out, 0))
        [error] = out[B.MASK_ERRORS][0]
        assert error["region_id"] == "r" and error["error_type"] == ("OSError" if message else "MaskNotFound")
        messages.append(error["message"])
    assert not [m for m in messages if secret in m or sig in m or "AKIAPLANTED" in m], messages
    assert "flaky://***@b/m.png" in messages[0] and "X-Amz-Signature=***" in messages[1]


def test_is_transient():
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError("503 Service Unavailable"))
    assert is_transient(OSError("Please reduce your request rate: SlowDown"))

    class EndpointConnectionError(Exception):
        pass

    assert is_transient(EndpointConnectionError("could not connect"))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(PermissionError("403"))
    assert not is_transient(ValueError("bad"))
    assert not is_transient(RowError("read", "X", "y"))
    assert not is_transient(OSError("some other failure"))


def test_config_validation():
    with pytest.raises(ValueError, match="max_pixels"):
        DecodeConfig(max_pixels=0)
    with pytest.raises(ValueError, match="square_size"):
        DecodeConfig(square_size=0)
    assert DecodeConfig(allowed_schemes=("S3",)).allowed_schemes == ("s3",)
    with pytest.raises(TypeError):
        DecodeStage(DecodeConfig(), square_size=3)
    assert DecodeStage(square_size=64).config.square_size == 64


def test_region_ids_are_never_reused_within_an_image(tmp_path):
    """A mask whose id an earlier, failed mask had is a duplicate too (one id never names both an error and a region);
    an unnamed mask named by its position does not take an id another mask of the image has explicitly."""
    h, w = 24, 36
    img = save(marked_rgb(w, h), tmp_path / "img.png")
    box = np.zeros((h, w), bool)
    box[4:10, 5:20] = True
    masks = [
        {"region_id": "a", "polygon": [[0, 0, 3]]},  # fails: no usable polygon part
        {"region_id": "a", "rle": rle_encode(box)},  # same id as the failed one: a duplicate, not region "a"
        {"region_id": None, "rle": rle_encode(box)},  # unnamed, position 2 …
        {"region_id": "2", "rle": rle_encode(box)},  # … but "2" is this mask's own id
    ]
    out = row(decode_batch(batch(img, masks=[masks]), cfg(need_masks=True)), 0)
    assert out[B.MASK_IDS] == ["#2", "2"]
    assert sorted((e["region_id"], e["error_type"]) for e in out[B.MASK_ERRORS]) == [
        ("a", "DuplicateRegionId"),
        ("a", "MalformedPolygon"),
    ]


def test_an_unreachable_server_is_not_a_missing_file():
    """fsspec's HTTP filesystem raises FileNotFoundError when it cannot connect; the row says it could not connect
    (after its retries), not that the file is missing."""
    out = decode_batch(batch("http://127.0.0.1:9/img.png"), cfg(allowed_schemes=("http",), retries=1))
    assert out[B.ERROR_TYPE][0] == "ClientConnectorError"
    assert "cannot connect" in out[B.ERROR_MESSAGE][0] and "(after 2 attempts)" in out[B.ERROR_MESSAGE][0]


# ------------------------------------------------------------------------------------------------ annotation frames
STORED_W, STORED_H = 48, 32
#: the object, in the stored pixels: x 8…23, y 8…15 (on the JPEG block grid, off-centre in both axes so that every
#: orientation moves it somewhere else)
STORED_BOX = (8, 8, 24, 16)


def stored_box_mask() -> np.ndarray:
    m = np.zeros((STORED_H, STORED_W), bool)
    x0, y0, x1, y1 = STORED_BOX
    m[y0:y1, x0:x1] = True
    return m


def box_polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]


def bbox_of(m: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(m)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def framed_masks(tmp_path: Path, frame: str, box_in_frame: np.ndarray) -> tuple[list[dict], dict]:
    """The object as a polygon, an RLE and a PNG mask drawn in one frame (``box_in_frame``: its mask there)."""
    x, y, w, h = bbox_of(box_in_frame)
    return [
        {"region_id": f"{frame}-poly", "polygon": box_polygon(x, y, x + w, y + h)},
        {"region_id": f"{frame}-rle", "rle": rle_encode(box_in_frame)},
        {"region_id": f"{frame}-png", "uri": png_mask(tmp_path / f"{frame}.png", box_in_frame)},
    ], {"height": box_in_frame.shape[0], "width": box_in_frame.shape[1]}


def decode_framed(p: str, masks: list[dict], declared: dict, **kw) -> dict:
    extra = {B.HEIGHT: np.array([declared["height"]]), B.WIDTH: np.array([declared["width"]])}
    out = row(decode_batch(batch(p, masks=[masks], **extra), cfg(need_masks=True, **kw)), 0)
    assert_ok(out)
    return out


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_mask_is_pillows_exif_transpose(orientation):
    rng = np.random.default_rng(orientation)
    m = rng.random((5, 7)) < 0.5
    img = Image.fromarray(np.where(m, 255, 0).astype(np.uint8), "L")
    img.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(img)) != 0
    np.testing.assert_array_equal(orient_mask(m, orientation), expected)
    assert set(EXIF_TRANSPOSE) == set(range(2, 9))


@pytest.mark.parametrize("orientation", [*range(1, 9), 0, 9])
def test_load_oriented_reports_the_tag_and_the_stored_size(tmp_path, orientation):
    p = jpeg_with_box(tmp_path / "b.jpg", STORED_W, STORED_H, orientation, STORED_BOX)
    img, tag, stored = load_oriented(Path(p).read_bytes())
    assert tag == (orientation if 2 <= orientation <= 8 else 1)  # 0 and 9 are no orientation, as for Pillow
    assert stored == (STORED_W, STORED_H)
    assert img.size == ((STORED_H, STORED_W) if tag >= 5 else (STORED_W, STORED_H))
    assert img.size == ImageOps.exif_transpose(Image.open(p)).size


# auto with 2–4: both frames have one size, and auto takes the oriented one (test_auto_cannot_tell_equal_frames)
@pytest.mark.parametrize(
    ("orientation", "mode"), [(t, "stored") for t in range(1, 9)] + [(t, "auto") for t in (1, 5, 6, 7, 8)]
)
def test_masks_drawn_on_the_stored_frame_cover_the_object(tmp_path, orientation, mode):
    """The object drawn in the stored pixels; masks of it in the stored frame (polygon + declared stored size, RLE
    and PNG of the stored size) cover exactly the object in the decoded image, for every orientation."""
    p = jpeg_with_box(tmp_path / "b.jpg", STORED_W, STORED_H, orientation, STORED_BOX)
    truth = find_box(load_image(Path(p).read_bytes()))
    assert truth.sum() == 16 * 8  # the drawing survived JPEG and orientation intact
    masks, declared = framed_masks(tmp_path, "stored", stored_box_mask())
    out = decode_framed(p, masks, declared, annotation_frame=mode)
    assert (out[B.HEIGHT], out[B.WIDTH]) == truth.shape
    assert out[B.MASK_IDS] == ["stored-poly", "stored-rle", "stored-png"], out[B.MASK_ERRORS]
    assert out[B.MASK_BBOX].tolist() == [list(bbox_of(truth))] * 3
    assert out[B.MASK_AREA].tolist() == [int(truth.sum())] * 3
    # the square model input: the mask lies over the object's pixels there too
    green = unnormalise(out[B.PIXELS_SQUARE])[..., 1] > 130
    for square in out[B.MASKS_SQUARE]:
        assert (green[square > 0.5]).mean() > 0.9


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["auto", "oriented"])
def test_masks_drawn_on_the_oriented_frame_are_used_as_they_are(tmp_path, orientation, mode):
    p = jpeg_with_box(tmp_path / "b.jpg", STORED_W, STORED_H, orientation, STORED_BOX)
    truth = find_box(load_image(Path(p).read_bytes()))
    masks, declared = framed_masks(tmp_path, "oriented", truth)
    out = decode_framed(p, masks, declared, annotation_frame=mode)
    assert out[B.MASK_IDS] == ["oriented-poly", "oriented-rle", "oriented-png"], out[B.MASK_ERRORS]
    assert out[B.MASK_BBOX].tolist() == [list(bbox_of(truth))] * 3
    assert out[B.MASK_AREA].tolist() == [int(truth.sum())] * 3


@pytest.mark.parametrize("orientation", [2, 3, 4])
def test_auto_cannot_tell_equal_frames(tmp_path, orientation):
    """Flips and the 180° turn keep the size: auto takes such a mask as drawn on the oriented frame (documented);
    a collection annotated on the stored pixels sets annotation_frame: stored."""
    p = jpeg_with_box(tmp_path / "b.jpg", STORED_W, STORED_H, orientation, STORED_BOX)
    masks, declared = framed_masks(tmp_path, "stored", stored_box_mask())
    out = decode_framed(p, masks, declared)
    assert out[B.MASK_BBOX].tolist() == [list(bbox_of(stored_box_mask()))] * 3  # the stored position, as is


def test_polygons_without_a_declared_size_follow_the_mode(tmp_path):
    p = jpeg_with_box(tmp_path / "b.jpg", STORED_W, STORED_H, 6, STORED_BOX)
    truth = find_box(load_image(Path(p).read_bytes()))
    stored_poly = [{"region_id": "s", "polygon": box_polygon(*STORED_BOX)}]
    # Ray hands a nullable integer column with nulls over as float64 NaN: unknown, like an absent column
    nan = {B.HEIGHT: np.array([np.nan]), B.WIDTH: np.array([np.nan])}
    out = row(decode_batch(batch(p, masks=[stored_poly], **nan), cfg(need_masks=True, annotation_frame="stored")), 0)
    assert out[B.MASK_BBOX].tolist() == [list(bbox_of(truth))]
    # auto without a size: the oriented frame, as before sizes were declared (the polygon lands elsewhere)
    out = row(decode_batch(batch(p, masks=[stored_poly]), cfg(need_masks=True)), 0)
    assert out[B.MASK_BBOX].tolist() == [[8, 8, 16, 8]]


@pytest.mark.parametrize(("declared", "mode"), [((40, 30), "auto"), ((48, 32), "oriented"), ((32, 48), "stored")])
def test_a_declared_size_no_orientation_explains_fails_each_mask_not_the_image(tmp_path, declared, mode):
    """Oriented 32x48 (W x H), stored 48x32, tag 6: a declared size that is neither (or not the forced frame) makes
    every mask of the row a MaskSizeMismatch naming its region, both sizes and the tag; the image is still decoded."""
    p = jpeg_with_box(tmp_path / "b.jpg", STORED_W, STORED_H, 6, STORED_BOX)
    masks, _ = framed_masks(tmp_path, "stored", stored_box_mask())
    extra = {B.WIDTH: np.array([declared[0]], np.int32), B.HEIGHT: np.array([declared[1]], np.int32)}
    out = row(decode_batch(batch(p, masks=[masks], **extra), cfg(need_masks=True, annotation_frame=mode)), 0)
    assert_ok(out)
    assert (out[B.WIDTH], out[B.HEIGHT]) == (32, 48) and out[B.PIXELS_SQUARE].shape == (3, S, S)
    assert out[B.MASK_IDS] == [] and out[B.MASKS_SQUARE].shape == (0, S, S)
    errors = out[B.MASK_ERRORS]
    assert [e["region_id"] for e in errors] == ["stored-poly", "stored-rle", "stored-png"]
    for e in errors:
        assert e["error_type"] == "MaskSizeMismatch"
        msg = e["message"]
        assert f"the row's declared size [H, W] = {[declared[1], declared[0]]}" in msg, msg
        assert "[48, 32] as decoded" in msg and "EXIF orientation 6" in msg and "[32, 48]" in msg, msg


def test_a_forced_frame_refuses_the_other_one(tmp_path):
    p = jpeg_with_box(tmp_path / "b.jpg", STORED_W, STORED_H, 8, STORED_BOX)
    oriented = find_box(load_image(Path(p).read_bytes()))
    with pytest.raises(
        RowError, match=r"RLE size \[H, W\] = \[32, 48\] differs from the image's \[48, 32\] as decoded"
    ):
        decode_mask({"rle": rle_encode(stored_box_mask())}, 48, 32, orientation=8, annotation_frame="oriented")
    with pytest.raises(RowError, match=r"stored frame \[32, 48\].*EXIF orientation 8; input.annotation_frame: stored"):
        decode_mask({"rle": rle_encode(oriented)}, 48, 32, orientation=8, annotation_frame="stored")
    with pytest.raises(ValueError, match="annotation_frame must be one of"):
        decode_mask({"rle": rle_encode(oriented)}, 48, 32, annotation_frame="displayed")
    with pytest.raises(ValueError, match="annotation_frame must be one of"):
        DecodeConfig(annotation_frame="displayed")


def test_input_storage_options_reach_only_the_stores_they_are_for():
    """A job with S3 options and https images: aiohttp refused S3's endpoint_url on every https row (review)."""
    from clipmaps.pipeline.plan import option_schemes
    from clipmaps.pipeline.spec import load_spec
    from tests.helpers.specs import JOB_SPEC

    local = load_spec(JOB_SPEC, overrides=["input.allowed_schemes=[file,s3,https]"])
    assert option_schemes(local) == ("file", "s3")
    web = load_spec(JOB_SPEC, overrides=["input.uri=https://h/m.jsonl", "input.allowed_schemes=[https]"])
    assert option_schemes(web) == ("https",)
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}
    cfg = DecodeConfig(storage_options=options, options_schemes=option_schemes(local))
    assert cfg.options_for("s3://b/a.png") == options and cfg.options_for("/data/a.png") == options
    assert cfg.options_for("https://example.com/a.png") == {}
    assert DecodeConfig(storage_options=options).options_for("https://x/a.png") == options  # None: every scheme
