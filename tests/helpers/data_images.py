"""Test data written on the fly: images in many modes, broken files, a PNG that claims huge dimensions, a COCO
instances file, SA-1B files, and a flaky fsspec filesystem. Numpy and Pillow only."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import fsspec
import numpy as np
from fsspec.spec import AbstractFileSystem
from PIL import Image

RED = (255, 0, 0)


def marked_rgb(width: int, height: int, block: int = 8) -> Image.Image:
    """Mid-grey RGB image with a red ``block × block`` square in the top-left corner."""
    arr = np.full((height, width, 3), 128, np.uint8)
    arr[:block, :block] = RED
    return Image.fromarray(arr, "RGB")


def save(img: Image.Image, path: Path, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


def jpeg_with_orientation(path: Path, width: int, height: int, orientation: int) -> str:
    """JPEG stored as ``width × height`` with the red mark top-left, and EXIF ``Orientation`` = ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(marked_rgb(width, height), path, format="JPEG", quality=95, exif=exif.tobytes())


#: The object drawn by :func:`jpeg_with_box`: pure-ish green, told from the dark background by colour alone.
BOX_COLOUR = (30, 220, 30)


def jpeg_with_box(path: Path, width: int, height: int, orientation: int, box: tuple[int, int, int, int]) -> str:
    """JPEG stored as ``width × height`` (dark grey) with a :data:`BOX_COLOUR` rectangle at ``box`` = ``(x0, y0, x1,
    y1)`` (pixels ``x0 ≤ x < x1``, ``y0 ≤ y < y1``) of the **stored** pixels, and EXIF ``Orientation`` =
    ``orientation``. Keep the box on the 8-pixel JPEG block grid so its edges stay sharp after compression."""
    arr = np.full((height, width, 3), 40, np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = BOX_COLOUR
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(arr, "RGB"), path, format="JPEG", quality=95, exif=exif.tobytes())


def find_box(img: Image.Image) -> np.ndarray:
    """``bool [h, w]``: the pixels of an RGB image that show :data:`BOX_COLOUR` (green high, red low)."""
    arr = np.asarray(img.convert("RGB")).astype(np.int16)
    return (arr[..., 1] > 130) & (arr[..., 0] < 130)


def png_claiming_size(path: Path, width: int, height: int) -> str:
    """A tiny PNG whose header claims ``width × height`` (a decompression bomb that never gets decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    Path(path).write_bytes(body)
    return str(path)


def truncated_jpeg(path: Path, width: int = 64, height: int = 48) -> str:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    Path(path).write_bytes(data[: len(data) // 2])
    return str(path)


def png_mask(path: Path, mask: np.ndarray) -> str:
    """Binary mask → 8-bit PNG (0 / 255)."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------- COCO / SA-1B
def coco_instances(path: Path, rle_encode) -> dict:
    """Write a COCO instances JSON with a polygon (two parts), a compressed RLE, an uncompressed crowd RLE and an
    image without annotations. Returns the dict (and ground-truth masks under ``"_truth"``, not in the file)."""
    crowd = np.zeros((20, 30), bool)
    crowd[5:10, 2:12] = True
    flat = crowd.flatten(order="F")
    runs, cur, n = [], False, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    solid = np.zeros((40, 50), bool)
    solid[10:30, 20:45] = True
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 50, "height": 40},
            {"id": 2, "file_name": "sub/b.jpg", "width": 30, "height": 20},
            {"id": 3, "file_name": "c.jpg", "width": 10, "height": 10},
        ],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[1.5, 1.0, 10.0, 1.0, 10.0, 8.25, 1.5, 8.25], [20, 20, 30, 20, 25, 30]],
            },
            {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": rle_encode(solid)},
            {
                "id": 21,
                "image_id": 2,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": {"size": [20, 30], "counts": runs},
            },
            {"id": 99, "image_id": 404, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    Path(path).write_text(json.dumps(data))
    data["_truth"] = {"12": solid, "21": crowd}
    return data


def sa1b_file(folder: Path, image_id: int, masks: list[np.ndarray], rle_encode) -> str:
    name = f"sa_{image_id}"
    h, w = masks[0].shape
    Image.new("RGB", (w, h), (10, 20, 30)).save(folder / f"{name}.jpg")
    data = {
        "image": {"image_id": image_id, "file_name": f"{name}.jpg", "width": w, "height": h},
        "annotations": [
            {
                "id": 1000 * image_id + k,
                "segmentation": rle_encode(m),
                "area": int(m.sum()),
                "bbox": [0, 0, 1, 1],
                "predicted_iou": 0.9,
            }
            for k, m in enumerate(masks)
        ],
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


# ---------------------------------------------------------------------------------------------- flaky storage
class FlakyFileSystem(AbstractFileSystem):
    """In-memory ``flaky://`` filesystem: ``files`` maps path → bytes; the first ``fail_times`` opens of a path
    raise ``error`` (default a connection reset). ``opens`` counts open attempts per path."""

    protocol = "flaky"
    cachable = False
    files: dict[str, bytes] = {}
    fail_times: dict[str, int] = {}
    error: BaseException = ConnectionResetError(104, "Connection reset by peer")
    opens: dict[str, int] = {}

    @classmethod
    def reset(cls) -> None:
        cls.files, cls.fail_times, cls.opens = {}, {}, {}
        cls.error = ConnectionResetError(104, "Connection reset by peer")

    @classmethod
    def _strip_protocol(cls, path):
        return path[len("flaky://") :] if path.startswith("flaky://") else path

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        FlakyFileSystem.opens[path] = FlakyFileSystem.opens.get(path, 0) + 1
        if FlakyFileSystem.opens[path] <= FlakyFileSystem.fail_times.get(path, 0):
            raise FlakyFileSystem.error
        if path not in FlakyFileSystem.files:
            raise FileNotFoundError(path)
        return io.BytesIO(FlakyFileSystem.files[path])


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
