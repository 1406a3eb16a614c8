"""Write a set of generated scenes as pipeline input: JPEGs, a JSON-lines manifest, and their ground truth.

Used by ``clipmaps demo``, the evaluation and the Kubernetes smoke job (local paths or any fsspec URI). The layout
beside the manifest::

    images/scene-000.jpg …
    manifest.jsonl          image_id, image_uri, masks (COCO RLE, region id "red-circle"), prompts (class names)
    truth.parquet           per image: instance map, class names, region ids (:data:`.truth.TRUTH`)
"""

from __future__ import annotations

import io
import json
import posixpath

import pyarrow.parquet as pq

from .scenes import make_scene


def region_id(name: str) -> str:
    """The manifest's region id of an object of class ``name`` (``"red circle"`` → ``"red-circle"``)."""
    return name.replace(" ", "-")


def write_scene_set(
    manifest_uri: str,
    count: int,
    *,
    storage_options: dict | None = None,
    first: int = 0,
    size: tuple[int, int] = (320, 240),
) -> str:
    """Write scenes ``first … first + count - 1`` (:func:`.scenes.make_scene` seeds) at ``size=(w, h)``; returns
    the manifest URI. The manifest is written last, so its presence means the set is complete."""
    import fsspec
    import numpy as np

    from clipmaps.schemas.encodings import rle_encode

    from .truth import TRUTH_FILE, Truth, truth_table

    fs, path = fsspec.core.url_to_fs(manifest_uri, **(storage_options or {}))
    root = posixpath.dirname(path)
    fs.makedirs(posixpath.join(root, "images"), exist_ok=True)
    lines, truths = [], {}
    for i in range(first, first + count):
        scene = make_scene(i, size=size)
        image_id = f"scene-{i:03d}"
        buf = io.BytesIO()
        scene.image.save(buf, format="JPEG", quality=92)
        image = posixpath.join(root, "images", f"{image_id}.jpg")
        fs.pipe_file(image, buf.getvalue())
        ids = [region_id(n) for n in scene.names]
        masks = [{"region_id": rid, "rle": rle_encode(m)} for rid, m in zip(ids, scene.masks)]
        lines.append(
            json.dumps(
                {"image_id": image_id, "image_uri": fs.unstrip_protocol(image), "masks": masks, "prompts": scene.names}
            )
        )
        instances = np.zeros(scene.label_map.shape, np.uint8)
        for k, m in enumerate(scene.masks):
            instances[m] = k + 1
        truths[image_id] = Truth(instances, list(scene.names), ids)
    buf = io.BytesIO()
    pq.write_table(truth_table(truths), buf)
    fs.pipe_file(posixpath.join(root, TRUTH_FILE), buf.getvalue())
    fs.pipe_file(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return fs.unstrip_protocol(path) if "://" in manifest_uri else manifest_uri
