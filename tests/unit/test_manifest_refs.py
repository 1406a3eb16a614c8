"""``clipmaps manifest`` adapters writing masks by reference (``masks_uri``), and those manifests through the decode
stage: the same masks as the inline manifest gives."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipmaps.jobs.commands import add_manifest_parser
from clipmaps.jobs.manifest import AnnotationReport, from_sa1b, write_manifest
from clipmaps.pipeline.decode import DecodeConfig, decode_batch
from clipmaps.schemas import batches as B
from clipmaps.schemas.encodings import rle_decode, rle_encode
from tests.helpers.data_images import sa1b_file


def sa1b_folder(tmp_path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    masks1 = [rng.random((12, 16)) < 0.3, rng.random((12, 16)) < 0.6]
    masks2 = [rng.random((12, 16)) < 0.5]
    sa1b_file(tmp_path, 1, masks1, rle_encode)
    sa1b_file(tmp_path, 2, masks2, rle_encode)
    return masks1, masks2


def test_sa1b_adapter_writes_references(tmp_path):
    masks1, masks2 = sa1b_folder(tmp_path)
    report = AnnotationReport()
    table = from_sa1b(str(tmp_path / "sa_*.json"), report=report)
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == ["1", "2"]
    assert [r[B.MASKS_URI] for r in rows] == [str(tmp_path / "sa_1.json"), str(tmp_path / "sa_2.json")]
    assert all(r["masks"] is None for r in rows)  # no RLE copied into the manifest
    assert [(r["width"], r["height"]) for r in rows] == [(16, 12), (16, 12)]
    assert report.masks == 3 and (report.duplicates, report.missing) == (0, 0)
    inline = from_sa1b(str(tmp_path / "sa_*.json"), inline_masks=True)
    assert inline.column(B.MASKS_URI).null_count == 2 and len(inline["masks"].to_pylist()[0]) == 2
    write_manifest(table, str(tmp_path / "ref.parquet"))
    back = pq.read_table(tmp_path / "ref.parquet")
    assert back.column(B.MASKS_URI).to_pylist() == [r[B.MASKS_URI] for r in rows]


def test_sa1b_references_report_id_problems(tmp_path):
    rle = rle_encode(np.ones((4, 4), bool))
    doc = {
        "image": {"image_id": 5, "file_name": "sa_5.jpg"},
        "annotations": [{"id": 1, "segmentation": rle}, {"id": 1, "segmentation": rle}, {"segmentation": rle}],
    }
    (tmp_path / "sa_5.json").write_text(json.dumps(doc))
    report = AnnotationReport()
    table = from_sa1b(str(tmp_path / "sa_5.json"), report=report)
    assert table.column(B.MASKS_URI).to_pylist() == [str(tmp_path / "sa_5.json")]
    assert (report.duplicates, report.missing, report.masks) == (1, 1, 3)


@pytest.mark.parametrize("inline", [False, True])
def test_sa1b_manifest_decodes_to_the_masks(tmp_path, inline):
    """The manifest as written, through the decode stage: by reference and inline give the same regions."""
    masks1, masks2 = sa1b_folder(tmp_path)
    table = from_sa1b(str(tmp_path / "sa_*.json"), inline_masks=inline)
    out = decode_batch(table, DecodeConfig(square_size=8, need_masks=True, io_threads=2))
    assert out[B.MASK_IDS].tolist() == [["1000", "1001"], ["2000"]]
    for rles, truth in zip(out[B.MASK_RLE], (masks1, masks2)):
        for rle, m in zip(rles, truth):
            np.testing.assert_array_equal(rle_decode(rle), m)


def test_manifest_cli_sa1b(tmp_path, capsys):
    sa1b_folder(tmp_path)
    parser = argparse.ArgumentParser(prog="clipmaps")
    add_manifest_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.jsonl"
    args = parser.parse_args(["manifest", "sa1b", str(tmp_path / "sa_*.json"), "-o", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"clipmaps manifest: 2 images, 3 masks (2 image(s) with masks by reference, masks_uri) -> {out}"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line[B.MASKS_URI] for line in lines] == [str(tmp_path / "sa_1.json"), str(tmp_path / "sa_2.json")]
    assert all("masks" not in line for line in lines)
    out2 = tmp_path / "inline.jsonl"
    args = parser.parse_args(["manifest", "sa1b", str(tmp_path / "sa_*.json"), "--inline-masks", "-o", str(out2)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == f"clipmaps manifest: 2 images, 3 masks -> {out2}"
    assert all(len(json.loads(line)["masks"]) for line in out2.read_text().splitlines())


def test_folder_adapter_writes_mask_folder_references(tmp_path):
    from PIL import Image

    from clipmaps.jobs.manifest import from_folder
    from tests.helpers.data_images import png_mask

    root = tmp_path / "photos"
    (root / "masks" / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    Image.new("RGB", (8, 6)).save(root / "cat.jpg")
    Image.new("RGB", (8, 6)).save(root / "dog.jpg")
    Image.new("RGB", (8, 6)).save(root / "bird.jpg")  # no mask folder: no masks
    truth = {}
    for stem, folder in (("cat", root / "cat"), ("dog", root / "masks" / "dog")):
        m1, m2 = np.zeros((6, 8), bool), np.zeros((6, 8), bool)
        m1[1:3, 1:4], m2[3:6, 2:8] = True, True
        png_mask(folder / "b.png", m1)
        png_mask(folder / "a.png", m2)
        truth[stem] = [m2, m1]
    beside = from_folder(str(root), mask_folders="{stem}/", recursive=True).to_pylist()
    assert [r["image_id"] for r in beside] == ["bird.jpg", "cat.jpg", "dog.jpg", "masks/dog/a.png", "masks/dog/b.png"]
    assert [r[B.MASKS_URI] for r in beside[:3]] == [None, str(root / "cat") + "/", None]
    under = from_folder(str(root), mask_folders="masks/{stem}/").to_pylist()
    assert [r["image_id"] for r in under] == ["bird.jpg", "cat.jpg", "dog.jpg"]
    assert [r[B.MASKS_URI] for r in under] == [None, None, str(root / "masks" / "dog") + "/"]
    assert all(r["masks"] is None for r in under)
    # through the decode stage: one mask per PNG, region_id = the stem, in name order
    import pyarrow as pa

    out = decode_batch(pa.Table.from_pylist(beside[:3]), DecodeConfig(square_size=8, need_masks=True, io_threads=1))
    assert out[B.MASK_IDS].tolist() == [[], ["a", "b"], []]
    for rle, m in zip(out[B.MASK_RLE][1], truth["cat"]):
        np.testing.assert_array_equal(rle_decode(rle), m)
    with pytest.raises(ValueError, match="stem"):
        from_folder(str(root), mask_folders="masks/")


def test_manifest_cli_folder_references(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "cat.jpg")
    Image.new("L", (8, 6), 255).save(tmp_path / "cat" / "0.png")
    parser = argparse.ArgumentParser(prog="clipmaps")
    add_manifest_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.parquet"
    args = parser.parse_args(["manifest", "folder", str(tmp_path), "--mask-folders", "{stem}/", "-o", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip()
    assert (
        printed
        == f"clipmaps manifest: 1 images, masks in folders (1 image(s) with masks by reference, masks_uri) -> {out}"
    )
    assert pq.read_table(out).column(B.MASKS_URI).to_pylist() == [str(tmp_path / "cat") + "/"]
