"""The codecs of ``clipmaps.schemas.encodings``: COCO RLE, label maps, heatmaps, polygons."""

from __future__ import annotations

import numpy as np
import pytest

from clipmaps.pipeline.sources import compress_rle_counts
from clipmaps.schemas.encodings import (
    decode_heatmap,
    decode_label_map,
    encode_heatmap,
    encode_label_map,
    mask_bbox,
    polygons_to_mask,
    rle_decode,
    rle_encode,
)

SHAPES = [(1, 1), (1, 17), (23, 1), (7, 9), (32, 32), (41, 97), (200, 3)]


def random_masks(seed: int = 0):
    """Masks of many shapes and densities, including empty, full and single-pixel ones, and blobs."""
    rng = np.random.default_rng(seed)
    for h, w in SHAPES:
        yield np.zeros((h, w), bool)
        yield np.ones((h, w), bool)
        one = np.zeros((h, w), bool)
        one[rng.integers(h), rng.integers(w)] = True
        yield one
        for p in (0.02, 0.5, 0.97):
            yield rng.random((h, w)) < p
        blob = np.zeros((h, w), bool)
        y0, x0 = rng.integers(h), rng.integers(w)
        blob[y0 : y0 + max(1, h // 2), x0 : x0 + max(1, w // 3)] = True
        yield blob


def uncompressed_runs(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


# ---------------------------------------------------------------------------------------------- RLE
def test_rle_round_trip_on_random_masks():
    n = 0
    for mask in random_masks():
        rle = rle_encode(mask)
        assert rle["size"] == list(mask.shape)
        assert isinstance(rle["counts"], str)
        back = rle_decode(rle)
        assert back.dtype == bool and back.shape == mask.shape
        np.testing.assert_array_equal(back, mask)
        n += 1
    assert n == 7 * len(SHAPES)


def test_rle_accepts_uncompressed_counts_bytes_and_non_bool_masks():
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = rng.random((13, 29)) < 0.4
        runs = uncompressed_runs(mask)
        np.testing.assert_array_equal(rle_decode({"size": [13, 29], "counts": runs}), mask)
        assert compress_rle_counts(runs) == rle_encode(mask)["counts"]
        counts = rle_encode(mask.astype(np.uint8) * 255)["counts"]
        np.testing.assert_array_equal(rle_decode({"size": [13, 29], "counts": counts.encode("ascii")}), mask)


def test_rle_large_runs_and_column_major_order():
    mask = np.zeros((1000, 700), bool)
    mask[:, 600:] = True  # one very long run: exercises multi-character numbers and the delta coding
    mask[3, 0] = True
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle), mask)
    tall = np.zeros((4, 2), bool)
    tall[:, 0] = True  # column-major: the first column is one run of 4
    assert uncompressed_runs(tall) == [0, 4, 4]
    np.testing.assert_array_equal(rle_decode({"size": [4, 2], "counts": [0, 4, 4]}), tall)


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ({"counts": "04"}, r"needs 'size' \[H, W\] and 'counts'"),
        ({"size": [2], "counts": "04"}, "needs 'size'"),
        ({"size": [-2, 2], "counts": "04"}, "negative size"),
        ({"size": [2, 2], "counts": [1, 2]}, r"runs cover 3 pixels, the size 2x2 needs 4"),
        ({"size": [2, 2], "counts": [5, -1]}, "negative run length"),
        ({"size": [2, 2], "counts": "0 4"}, "not in the RLE alphabet"),
        ({"size": [2, 2], "counts": "0" + chr(48 + 0x20)}, "ends inside a number"),
        ("not a dict", "needs 'size'"),
    ],
)
def test_malformed_rle_messages(rle, match):
    with pytest.raises(ValueError, match=match):
        rle_decode(rle)


def test_rle_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 2, 2), bool))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2 copy keyword
def test_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    for mask in random_masks(seed=5):
        theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = rle_encode(mask)
        assert ours["counts"] == theirs["counts"].decode("ascii")
        assert ours["size"] == [int(s) for s in theirs["size"]]
        np.testing.assert_array_equal(rle_decode({"size": theirs["size"], "counts": theirs["counts"]}), mask)
        np.testing.assert_array_equal(mask_utils.decode({"size": ours["size"], "counts": ours["counts"]}), mask)
        # uncompressed (iscrowd) RLE: pycocotools' conversion agrees with ours
        h, w = mask.shape
        runs = uncompressed_runs(mask)
        converted = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
        assert compress_rle_counts(runs) == converted["counts"].decode("ascii")
        assert mask_utils.area(theirs) == int(mask.sum())
        if mask.any():
            assert list(mask_utils.toBbox(theirs)) == list(mask_bbox(mask))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_polygons_close_to_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    polys = [[10.0, 10.0, 60.0, 12.0, 55.0, 40.0, 12.0, 35.0], [70.0, 5.0, 90.0, 5.0, 80.0, 30.0]]
    ours = polygons_to_mask(polys, 50, 100)
    theirs = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 50, 100))).astype(bool)
    iou = (ours & theirs).sum() / (ours | theirs).sum()
    assert iou > 0.99  # same pixel-centre rule; COCO differs only on a few edge pixels


def test_polygon_square_area_matches_coco():
    m = polygons_to_mask([[2, 2, 6, 2, 6, 6, 2, 6]], 8, 8)
    assert int(m.sum()) == 16  # as pycocotools: mask.area(frPyObjects(...)) == 16


# ---------------------------------------------------------------------------------------------- polygons, bbox
def test_polygons_to_mask_union_and_errors():
    square = [2, 2, 6, 2, 6, 6, 2, 6]
    tri = [10, 0, 14, 0, 12, 3]
    m = polygons_to_mask([square, tri], 8, 16)
    assert m.dtype == bool and m.shape == (8, 16)
    assert m[4, 4] and m[1, 12] and not m[7, 0] and not m[4, 9]
    assert mask_bbox(m) == (2, 0, 12, 6)  # pixel centres inside: x 2..13, y 0..5
    outside = polygons_to_mask([[100, 100, 120, 100, 110, 120]], 8, 16)
    assert not outside.any()  # wholly outside: clipped to nothing, not an error here (the region is, when decoded)
    with pytest.raises(ValueError, match=r"no usable polygon part \(part 0: 2 point\(s\)"):
        polygons_to_mask([[1, 2, 3, 4]], 8, 8)
    with pytest.raises(ValueError, match=r"part 0: an odd number of coordinates \(7\)"):
        polygons_to_mask([[1, 2, 3, 4, 5, 6, 7]], 8, 8)
    with pytest.raises(ValueError, match="no polygon parts"):
        polygons_to_mask([], 8, 8)


def coco_reference(polys: list[list[float]], height: int, width: int) -> np.ndarray:
    """pycocotools' rasterisation of an annotation's polygon list (``frPyObjects`` + ``merge`` + ``decode``), as
    ``COCO.annToMask`` does it."""
    mask_utils = pytest.importorskip("pycocotools.mask")
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, height, width))).astype(bool)


BOX = [24.0, 18.0, 48.0, 18.0, 48.0, 54.0, 24.0, 54.0]  # 24 x 36 = 864 pixels in a 96 x 72 image


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("degenerate", "why"),
    [
        ([60, 10, 60, 12], "2 point(s)"),  # the field case: a 2-point "polygon"
        ([60.5, 30.2], "1 point(s)"),
        ([60, 10, 60, 12, 60, 14], "zero area"),  # three points on a vertical line
        ([10, 10, 20, 20, 30, 30, 40, 40], "zero area"),  # on a diagonal
        ([5, 5, 5, 5, 5, 5], "zero area"),  # one point three times
        ([1, 2, 3, 4, 5, 6, 7], "odd number of coordinates (7)"),
        ([1, 2, 3, float("nan"), 5, 6], "not a finite number"),
    ],
)
def test_degenerate_parts_are_dropped_and_valid_parts_kept(degenerate, why):
    for polys, bad_index in (([BOX, degenerate], 1), ([degenerate, BOX], 0)):
        dropped: list[tuple[int, str]] = []
        m = polygons_to_mask(polys, 72, 96, dropped=dropped)
        assert [k for k, _ in dropped] == [bad_index] and why in dropped[0][1]
        assert int(m.sum()) == 864 and mask_bbox(m) == (24, 18, 24, 36)
        np.testing.assert_array_equal(m, coco_reference([BOX], 72, 96))
    # where pycocotools takes the whole list (parts of ≥ 4 even coordinates after a real polygon), it agrees:
    # the degenerate part adds no pixel there either
    if len(degenerate) % 2 == 0 and len(degenerate) >= 4 and all(np.isfinite(degenerate)):
        np.testing.assert_array_equal(
            polygons_to_mask([BOX, degenerate], 72, 96), coco_reference([BOX, degenerate], 72, 96)
        )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "poly",
    [
        [10, 10, 30, 30, 30, 10, 10, 30],  # a self-crossing bow tie: signed area 0, yet two filled triangles
        [10, 10, 40, 10, 40, 40, 10, 40, 40, 10],  # a box with a point repeated on an edge
        [10, 10, 50, 12, 30, 40, 30, 40],  # a triangle with its last point repeated
    ],
)
def test_odd_but_real_parts_are_kept_as_pycocotools(poly):
    dropped: list[tuple[int, str]] = []
    ours = polygons_to_mask([poly], 72, 96, dropped=dropped)
    assert dropped == []
    theirs = coco_reference([poly], 72, 96)
    assert abs(int(ours.sum()) - int(theirs.sum())) <= max(2, 0.05 * theirs.sum())


def test_only_degenerate_parts_is_an_error_naming_each_part():
    with pytest.raises(ValueError) as e:
        polygons_to_mask([[60.5, 30.2], [60, 10, 60, 12, 60, 14]], 72, 96)
    assert "part 0: 1 point(s)" in str(e.value) and "part 1: zero area" in str(e.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "polys",
    [
        [[-10, -10, 20, -10, 20, 20, -10, 20]],  # over the top-left corner: 20 x 20 inside
        [[80, 60, 130, 60, 130, 100, 80, 100]],  # over the bottom-right corner
        [[-5, 30, 200, 30, 200, 40, -5, 40]],  # wider than the image
        [BOX, [200, 200, 220, 200, 220, 220, 200, 220]],  # one part wholly outside, one inside
        [[-50, -50, -20, -50, -20, -20, -50, -20]],  # wholly outside: no pixel
        [[90.0, 0.0, 100.0, 0.0, 100.0, 72.0, 90.0, 72.0], [0, 70, 96, 70, 96, 80, 0, 80]],  # overlapping, clipped
    ],
)
def test_parts_outside_the_image_are_clipped_as_pycocotools(polys):
    ours = polygons_to_mask(polys, 72, 96)
    theirs = coco_reference(polys, 72, 96)
    assert int(ours.sum()) == int(theirs.sum())
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pixel_counts_of_integer_boxes_match_pycocotools():
    rng = np.random.default_rng(3)
    for _ in range(50):
        x0, y0 = rng.integers(-20, 90, 2)
        x1, y1 = x0 + rng.integers(1, 60), y0 + rng.integers(1, 60)
        poly = [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]
        assert int(polygons_to_mask([poly], 72, 96).sum()) == int(coco_reference([poly], 72, 96).sum()), poly


def test_mask_bbox():
    m = np.zeros((10, 20), bool)
    assert mask_bbox(m) == (0, 0, 0, 0)
    m[3:5, 7:12] = True
    assert mask_bbox(m) == (7, 3, 5, 2)
    assert mask_bbox(np.ones((4, 3), bool)) == (0, 0, 3, 4)


# ---------------------------------------------------------------------------------------------- label maps
@pytest.mark.parametrize(("high", "dtype"), [(0, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16)])
def test_label_map_round_trip(high, dtype):
    rng = np.random.default_rng(high)
    labels = rng.integers(0, high + 1, size=(37, 53))
    labels[0, 0] = high
    data = encode_label_map(labels)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode_label_map(data)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, labels)


def test_label_map_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        encode_label_map(np.zeros((2, 2, 2), int))
    with pytest.raises(ValueError, match=r"\[0, 65535\]"):
        encode_label_map(np.full((2, 2), 70000))
    with pytest.raises(ValueError, match=r"\[0, 65535\]"):
        encode_label_map(np.full((2, 2), -1))


# ---------------------------------------------------------------------------------------------- heatmaps
def test_heatmap_png8_within_half_a_step():
    rng = np.random.default_rng(3)
    heat = rng.random((31, 47)).astype(np.float32)
    heat[0, 0], heat[0, 1] = 0.0, 1.0
    back = decode_heatmap(encode_heatmap(heat, "png8"), "png8", 31, 47)
    assert back.dtype == np.float32 and back.shape == heat.shape
    assert np.abs(back - heat).max() <= 1 / 510 + 1e-6
    clipped = decode_heatmap(encode_heatmap(np.array([[-1.0, 2.0, np.nan]]), "png8"), "png8", 1, 3)
    np.testing.assert_array_equal(clipped, [[0.0, 1.0, 0.0]])


def test_heatmap_float16_exact_to_half_precision():
    rng = np.random.default_rng(4)
    heat = (rng.standard_normal((19, 23)) * 100).astype(np.float32)
    data = encode_heatmap(heat, "float16")
    assert len(data) == 19 * 23 * 2
    back = decode_heatmap(data, "float16", 19, 23)
    np.testing.assert_array_equal(back, heat.astype(np.float16).astype(np.float32))


def test_heatmap_bad_encoding_and_shape():
    with pytest.raises(ValueError, match="png8"):
        encode_heatmap(np.zeros((2, 2)), "jpeg")
    with pytest.raises(ValueError, match="png8"):
        decode_heatmap(b"", "jpeg", 2, 2)
    with pytest.raises(ValueError, match="2-D"):
        encode_heatmap(np.zeros((2,)), "png8")
