"""Masks by reference read from S3 (the SeaweedFS server) by the decode stage inside Ray tasks: SA-1B per-image JSON,
a folder of per-instance PNGs and a side Parquet, with the error rows of a missing reference and of an image the
side table has no row for. The full pipeline with references is exercised by the pipeline tests."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipmaps.pipeline.decode import DecodeConfig, decode_batch
from clipmaps.schemas import batches as B
from clipmaps.schemas.encodings import rle_decode, rle_encode

H, W = 30, 40


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def blobs(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((H, W), bool)
        y, x = rng.integers(0, H - 6), rng.integers(0, W - 6)
        m[y : y + rng.integers(3, 7), x : x + rng.integers(3, 7)] = True
        out.append(m)
    return out


@pytest.mark.timeout(300)
def test_masks_by_reference_from_s3_in_ray_tasks(ray_local, s3):
    fs = s3.filesystem()
    root = f"{s3.bucket}/mask-refs"
    rng = np.random.default_rng(0)
    image = png_bytes(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    truth: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    rows = []
    # SA-1B per-image JSON (two images, one with an annotation whose RLE is broken: that region only)
    for k in range(2):
        masks = blobs(k, 3)
        anns = [{"id": 100 * k + j, "segmentation": rle_encode(m), "area": int(m.sum())} for j, m in enumerate(masks)]
        if k == 1:
            anns.append({"id": 199, "segmentation": {"size": [H, W], "counts": "0"}})
        fs.pipe(f"{root}/sa/sa_{k}.jpg.png", image)
        fs.pipe(
            f"{root}/sa/sa_{k}.json", json.dumps({"image": {"width": W, "height": H}, "annotations": anns}).encode()
        )
        rows.append(
            {
                "image_id": f"sa{k}",
                "image_uri": f"s3://{root}/sa/sa_{k}.jpg.png",
                "masks_uri": f"s3://{root}/sa/sa_{k}.json",
            }
        )
        truth[f"sa{k}"] = ([str(100 * k + j) for j in range(3)], masks)
    # a folder of per-instance PNGs
    masks = blobs(5, 2)
    fs.pipe(f"{root}/png/img.png", image)
    for name, m in zip(("b", "a"), masks):
        fs.pipe(f"{root}/png/img/{name}.png", png_bytes(np.where(m, 255, 0).astype(np.uint8)))
    rows.append({"image_id": "png", "image_uri": f"s3://{root}/png/img.png", "masks_uri": f"s3://{root}/png/img/"})
    truth["png"] = (["a", "b"], [masks[1], masks[0]])
    # a side Parquet keyed by image_id (p0, p1 present; p2 listed with the table but without rows)
    side = []
    for k in range(2):
        masks = blobs(10 + k, 2)
        side += [{"image_id": f"p{k}", "region_id": f"r{j}", "rle": rle_encode(m)} for j, m in enumerate(masks)]
        truth[f"p{k}"] = (["r0", "r1"], masks)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(side), buf)
    fs.pipe(f"{root}/side/masks.parquet", buf.getvalue())
    for k in range(3):
        fs.pipe(f"{root}/side/p{k}.png", image)
        rows.append(
            {
                "image_id": f"p{k}",
                "image_uri": f"s3://{root}/side/p{k}.png",
                "masks_uri": f"s3://{root}/side/masks.parquet",
            }
        )
    # a reference that does not exist, and a row without masks
    rows.append({"image_id": "gone", "image_uri": f"s3://{root}/png/img.png", "masks_uri": f"s3://{root}/nope/x.json"})
    rows.append({"image_id": "plain", "image_uri": f"s3://{root}/png/img.png", "masks_uri": None})

    config = DecodeConfig(square_size=16, need_masks=True, storage_options=s3.storage_options, retry_backoff_s=0.05)
    ds = ray_local.data.from_items(rows, override_num_blocks=3).map_batches(
        decode_batch, fn_kwargs={"config": config}, batch_format="numpy", batch_size=3
    )
    out = {r["image_id"]: r for r in ds.take_all()}
    assert set(out) == {r["image_id"] for r in rows}  # every input row comes out
    for image_id, (ids, masks) in truth.items():
        r = out[image_id]
        assert not B.present(r[B.ERROR_STAGE]), (image_id, r[B.ERROR_MESSAGE])
        assert list(r[B.MASK_IDS]) == ids, image_id
        assert list(r[B.MASK_AREA]) == [int(m.sum()) for m in masks]
        for rle, m in zip(r[B.MASK_RLE], masks):
            np.testing.assert_array_equal(rle_decode({"size": list(rle["size"]), "counts": rle["counts"]}), m)
    [bad] = out["sa1"][B.MASK_ERRORS]
    assert bad["region_id"] == "199" and bad["error_type"] == "MalformedRLE"
    p2, gone = out["p2"], out["gone"]
    assert (p2[B.ERROR_STAGE], p2[B.ERROR_TYPE]) == ("mask", "NoMasksForImage")
    assert f"s3://{root}/side/masks.parquet" in p2[B.ERROR_MESSAGE] and "'p2'" in p2[B.ERROR_MESSAGE]
    assert (gone[B.ERROR_STAGE], gone[B.ERROR_TYPE]) == ("mask", "MasksNotFound")
    assert f"s3://{root}/nope/x.json" in gone[B.ERROR_MESSAGE]
    assert not B.present(out["plain"][B.ERROR_STAGE]) and len(out["plain"][B.MASK_IDS]) == 0
    assert s3.secret not in json.dumps({k: str(v) for r in out.values() for k, v in r.items()})
