"""Ground truth of generated scenes: ``truth.parquet`` beside a scene set's manifest (:mod:`.scene_set` writes it,
``clipmaps eval`` reads it)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .scenes import CLASSES

TRUTH_FILE = "truth.parquet"
TRUTH = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        # PNG uint8: k + 1 on the visible pixels of object k, 0 on the background
        pa.field("instance_map", pa.binary(), nullable=False),
        pa.field("names", pa.list_(pa.string()), nullable=False),  # class name of object k ("red circle")
        pa.field("region_ids", pa.list_(pa.string()), nullable=False),  # its region id in the manifest
    ],
    metadata={"classes": json.dumps(CLASSES)},
)


@dataclass
class Truth:
    """Ground truth of one image: ``instances`` ``uint8 [H, W]`` (k + 1 = object k), names and region ids."""

    instances: np.ndarray
    names: list[str]
    region_ids: list[str]

    def classes(self) -> np.ndarray:
        """``int [H, W]`` class labels: 0 background, ``CLASSES.index(name) + 1`` on objects."""
        lut = np.array([0] + [CLASSES.index(n) + 1 for n in self.names], np.int64)
        return lut[self.instances]


def truth_table(truths: dict[str, Truth]) -> pa.Table:
    """``{image_id: Truth}`` → a :data:`TRUTH` table."""
    from PIL import Image

    rows = []
    for image_id, t in truths.items():
        buf = io.BytesIO()
        Image.fromarray(t.instances.astype(np.uint8)).save(buf, format="PNG")
        h, w = t.instances.shape
        rows.append(
            {
                "image_id": image_id,
                "height": h,
                "width": w,
                "instance_map": buf.getvalue(),
                "names": t.names,
                "region_ids": t.region_ids,
            }
        )
    return pa.Table.from_pylist(rows, schema=TRUTH)


def read_truth(fs, path: str) -> dict[str, Truth]:
    """A :data:`TRUTH` file at ``path`` on the fsspec filesystem ``fs`` → ``{image_id: Truth}``."""
    from PIL import Image

    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    out = {}
    for r in table.to_pylist():
        inst = np.asarray(Image.open(io.BytesIO(r["instance_map"])))
        out[r["image_id"]] = Truth(inst, list(r["names"]), list(r["region_ids"]))
    return out
