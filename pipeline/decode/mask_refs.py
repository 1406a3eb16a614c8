"""Masks by reference: a manifest row's ``masks_uri`` resolved on the worker to the mask structs inline ``masks``
hold (dicts with ``region_id`` and one of ``rle``/``polygon``/``uri``), which the decode stage then decodes as it
decodes inline masks (same frame rules, same per-mask errors).

**Which form a reference is** (by its name first, so that most references cost no extra request):

1. a name ending in ``.json`` (any case): an **SA-1B per-image JSON** — ``{"image": {…, "width", "height"},
   "annotations": [{"id", "segmentation": {"size": [h, w], "counts": str}, …}]}``. ``region_id`` = the annotation's
   ``id`` as a string (none: named by position, as inline masks are); a ``segmentation`` that is a polygon list is
   read as a polygon, uncompressed counts as COCO does. ``image.width``/``height`` are the row's declared frame when
   the manifest declares none. A file with an empty ``annotations`` list gives the image 0 masks (it says so).
2. a name ending in ``.parquet`` or ``.pq``, with or without a trailing ``/``: a **side Parquet** table (one file,
   or a folder of Parquet files read as one dataset) with a string column ``image_id``, an optional ``region_id``
   and the mask in the manifest's ``MASK`` layout: columns ``rle`` (struct ``size``, ``counts``) and/or ``polygon``
   (list of coordinate lists), or one struct column ``mask`` with those fields. Rows are read with a filter on
   ``image_id`` (pyarrow's dataset scan prunes row groups by their statistics, so a table sorted by ``image_id``
   costs one image a row group, never the whole file); the rows of one batch that share a table are read in one
   scan. Masks keep the table's row order. **An image with no row in the table is an error row**
   (``NoMasksForImage``): the manifest asked for its masks, and a missing key cannot be told from a wrong table.
3. anything else is a **folder** (``…/image123/``, or a folder URI without the slash). A folder holding ``.parquet``
   files is a side-Parquet folder (rule 2); otherwise each ``.png`` file in it (not in sub-folders) is one binary
   mask (non-zero = inside, the rules of mask images in :mod:`.masks`), ``region_id`` = the file's stem, in order of
   file name. A folder without a PNG is an error row (``NoMasksForImage``; on object stores a missing folder and an
   empty one look alike).

A reference that cannot be read (missing, permission, a transient error that outlasted the retries of
:func:`.fetch.with_retries`), is not what its name says (bad JSON, a Parquet table without ``image_id`` or a mask
column) or names a file of another kind is a :class:`~clipmaps.schemas.errors.RowError` of stage ``mask`` whose
message names the redacted URI; the image then fails as a whole (its masks are unknown). One bad mask inside a good
reference (a malformed RLE, a PNG of another size) costs that mask only, as inline.

All access goes through :mod:`clipmaps.schemas.storage` (``filesystem``, ``read_bytes``) with the reads and retries of
:mod:`.fetch`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from clipmaps.schemas.errors import RowError
from clipmaps.schemas.storage import filesystem, join_uri, read_bytes, redact_uri

from .fetch import fetch_bytes, with_retries

if TYPE_CHECKING:
    from .stage import DecodeConfig

log = logging.getLogger(__name__)

ReferenceForm = Literal["sa1b-json", "parquet", "folder"]
#: Side-Parquet tables whose dataset (file list and footers) a worker process keeps open between batches.
MAX_OPEN_TABLES = 8
_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class Resolved:
    """What a reference holds for one image.

    Attributes:
        masks: mask structs as inline ``masks`` holds them (dicts: ``region_id`` and one of ``rle``/``polygon``/
            ``uri``), in order.
        fetched: the bytes (or the read error) of mask images by their index in ``masks`` (PNG folders).
        declared: the frame ``(height, width)`` the reference declares (SA-1B ``image``), or ``None``.
    """

    masks: list[dict]
    fetched: dict[int, bytes | RowError] = field(default_factory=dict)
    declared: tuple[int, int] | None = None


def reference_form(uri: str) -> ReferenceForm:
    """The form of a reference by its name alone (module docstring): ``sa1b-json``, ``parquet`` or ``folder``
    (a folder may still turn out to be a side-Parquet folder when listed)."""
    path = _path_part(uri).rstrip("/").lower()
    if _path_part(uri).lower().endswith(".json"):
        return "sa1b-json"
    if path.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "folder"


def _path_part(uri: str) -> str:
    """``uri`` without an ``http(s)`` query (a presigned URL's signature is not part of the name)."""
    return uri.split("?", 1)[0] if uri.lower().startswith(("http://", "https://")) else uri


def _error(error_type: str, message: str) -> RowError:
    return RowError("mask", error_type, message)


def _as_mask_error(e: RowError, shown: str) -> RowError:
    """A read error (stage ``read``) of a reference → the row's ``mask`` error, naming the reference."""
    if e.error_type == "FileNotFoundError":
        return _error("MasksNotFound", f"masks_uri {shown}: not found")
    return _error(e.error_type, f"masks_uri {e.message}" if shown in e.message else f"masks_uri {shown}: {e.message}")


# Side-Parquet datasets with their footers read, per worker process (the stage runs as a function, one instance per
# batch, so an instance's cache would be lost): later lookups read only the row groups they select. Keyed by URI and
# storage options; the least recently used beyond MAX_OPEN_TABLES is dropped.
_TABLES: OrderedDict[tuple[str, str], pads.Dataset] = OrderedDict()
_TABLES_LOCK = threading.Lock()


class MaskReferences:
    """Resolves ``masks_uri`` values for the decode stage (thread-safe: the stage resolves on its fetch threads).
    Up to :data:`MAX_OPEN_TABLES` side-Parquet datasets stay open per worker process, footers included."""

    def __init__(self, config: DecodeConfig):
        self.config = config

    # -- one image
    def resolve(self, uri: str, image_id: str) -> Resolved:
        """The masks ``uri`` holds for ``image_id`` (any form; a side Parquet is scanned for this image alone).

        Raises:
            RowError: stage ``mask``, naming the redacted URI (module docstring).
        """
        shown = redact_uri(uri)
        form = reference_form(uri)
        if form == "sa1b-json":
            try:
                data = fetch_bytes(uri, self.config, what="masks")
            except RowError as e:
                raise _as_mask_error(e, shown) from None
            return sa1b_masks(data, shown)
        if form == "parquet":
            return self.lookup(uri, [image_id])[image_id]
        return self._folder(uri, image_id)

    # -- many images of one side table
    def lookup(self, uri: str, image_ids: Iterable[str]) -> dict[str, Resolved]:
        """One scan of the side Parquet ``uri`` for ``image_ids`` → their masks, by image id.

        Raises:
            RowError: stage ``mask``: the table cannot be read or lacks its columns (the whole group fails), or
                ``NoMasksForImage`` when *every* image is missing; an image missing while others are found is not
                raised but left out of the result (the caller reports it).
        """
        shown = redact_uri(uri)
        ids = list(dict.fromkeys(str(i) for i in image_ids))
        if not ids:
            return {}
        dataset = self._dataset(uri, shown)
        names = set(dataset.schema.names)
        mask_columns = [c for c in ("mask", "rle", "polygon") if c in names]
        if "image_id" not in names or not mask_columns:
            raise _error(
                "MalformedMaskReference",
                f"masks_uri {shown}: a side Parquet needs the columns image_id and rle/polygon (or a struct column "
                f"mask); it has {', '.join(sorted(names)) or 'none'}",
            )
        columns = ["image_id", *(["region_id"] if "region_id" in names else []), *mask_columns]
        id_type = dataset.schema.field("image_id").type
        try:
            keys = pa.array(ids).cast(id_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise _error(
                "MalformedMaskReference",
                f"masks_uri {shown}: column image_id is {id_type}, not comparable with {ids[0]!r}",
            ) from None
        expr = pc.field("image_id").isin(keys)
        table = self._io(lambda: dataset.to_table(columns=columns, filter=expr), uri, shown)
        found: dict[str, Resolved] = {}
        for row in table.to_pylist():
            mask = row.pop("mask", None) or {}
            entry = {
                "region_id": _region_id(row.get("region_id", mask.get("region_id"))),
                "rle": row.get("rle", mask.get("rle")),
                "polygon": row.get("polygon", mask.get("polygon")),
            }
            found.setdefault(str(row["image_id"]), Resolved([])).masks.append(entry)
        if not found:
            raise no_rows_error(uri, ids)
        return {i: found[i] for i in ids if i in found}

    def _dataset(self, uri: str, shown: str) -> pads.Dataset:
        key = (uri, json.dumps(self.config.options_for(uri), sort_keys=True, default=str))
        with _TABLES_LOCK:
            if key in _TABLES:
                _TABLES.move_to_end(key)
                return _TABLES[key]

        def open_dataset() -> pads.Dataset:
            fs, path = filesystem(uri, self.config.options_for(uri))
            dataset = pads.dataset(path.rstrip("/"), filesystem=fs, format="parquet")
            for fragment in dataset.get_fragments():
                # keep each file's footer: a scan then reads only the row groups its statistics select
                fragment.ensure_complete_metadata()
            return dataset

        dataset = self._io(open_dataset, uri, shown)
        with _TABLES_LOCK:
            _TABLES[key] = dataset
            while len(_TABLES) > MAX_OPEN_TABLES:
                _TABLES.popitem(last=False)
        return dataset

    def _io(self, op, uri: str, shown: str):
        """``op`` with the stage's retries; read errors as the row's ``mask`` error, Arrow's as a malformed table."""
        try:
            return with_retries(op, uri, self.config, what="masks")
        except RowError as e:
            if e.error_type.startswith("Arrow"):
                raise _error(
                    "MalformedMaskReference", f"masks_uri {shown}: not a readable Parquet table ({e.message})"
                ) from None
            raise _as_mask_error(e, shown) from None

    # -- folders
    def _folder(self, uri: str, image_id: str) -> Resolved:
        shown = redact_uri(uri)
        fs, path = self._io(lambda: filesystem(uri, self.config.options_for(uri)), uri, shown)
        path = path.rstrip("/")
        entries = self._io(lambda: fs.ls(path, detail=True), uri, shown)
        files = [e for e in entries if e.get("type") == "file"]
        if (
            len(files) == 1
            and files[0]["name"].rstrip("/") == path
            and not any(e.get("type") == "directory" for e in entries)
        ):
            raise _error(
                "MalformedMaskReference",
                f"masks_uri {shown}: a file that is neither .json nor .parquet; a folder of PNG masks ends in '/'",
            )
        names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in files)
        if any(n.lower().endswith(_PARQUET_SUFFIXES) for n in names):
            found = self.lookup(uri, [image_id])
            if image_id not in found:
                raise no_rows_error(uri, [image_id])
            return found[image_id]
        pngs = [n for n in names if n.lower().endswith(".png")]
        if not pngs:
            raise _error("NoMasksForImage", f"masks_uri {shown}: no .png mask in the folder (missing or empty)")
        out = Resolved([])
        for k, name in enumerate(pngs):
            mask_uri = join_uri(uri, name)
            out.masks.append({"region_id": posixpath.splitext(name)[0], "uri": mask_uri})
            try:
                # the listing named it: read it as listed, literally (a name may hold glob characters)
                out.fetched[k] = with_retries(
                    lambda p=f"{path}/{name}": read_bytes(fs, p), mask_uri, self.config, what="mask"
                )
            except RowError as e:
                out.fetched[k] = e
        return out


def no_rows_error(uri: str, image_ids: list[str]) -> RowError:
    """``NoMasksForImage`` (stage ``mask``): the side table ``uri`` has no row for ``image_ids``, named."""
    which = f"image {image_ids[0]!r}" if len(image_ids) == 1 else "images " + ", ".join(map(repr, image_ids[:5]))
    more = ", …" if len(image_ids) > 5 else ""
    return _error("NoMasksForImage", f"masks_uri {redact_uri(uri)}: the side table has no row for {which}{more}")


def _region_id(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def sa1b_masks(data: bytes, shown: str) -> Resolved:
    """The bytes of an SA-1B per-image JSON → its masks (module docstring, rule 1).

    Raises:
        RowError: stage ``mask``, ``MalformedMaskReference``: not JSON, or not an object with an ``annotations`` list.
    """
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise _error("MalformedMaskReference", f"masks_uri {shown}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise _error(
            "MalformedMaskReference", f"masks_uri {shown}: not valid JSON ({e.msg}, line {e.lineno})"
        ) from None
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(annotations, list):
        raise _error(
            "MalformedMaskReference", f"masks_uri {shown}: not an SA-1B per-image JSON (no 'annotations' list)"
        )
    image = doc.get("image") if isinstance(doc.get("image"), dict) else {}
    h, w = image.get("height"), image.get("width")
    declared = (h, w) if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)) else None
    masks = []
    for ann in annotations:
        if not isinstance(ann, dict):
            masks.append(None)  # a null mask: the decode stage reports it as MalformedMask, by position
            continue
        mask: dict[str, Any] = {"region_id": _region_id(ann.get("id"))}
        seg = ann.get("segmentation")
        if isinstance(seg, dict) and "counts" in seg:
            mask["rle"] = {"size": seg.get("size"), "counts": seg.get("counts")}
        elif isinstance(seg, list) and seg:
            mask["polygon"] = [seg] if all(isinstance(v, (int, float)) for v in seg) else seg
        # anything else has none of rle/polygon: the decode stage names it a MalformedMask of this region
        masks.append(mask)
    return Resolved(masks, declared=declared)
