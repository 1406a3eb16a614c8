"""Images carried inside the input rows: an ``image`` column of encoded bytes (a plain binary column, or the Hugging
Face ``datasets`` image struct ``{bytes, path}``), in a Parquet manifest (``clipmaps run``) or in the rows given to
:func:`clipmaps.pipeline.annotate.annotate`.

A row with image bytes needs no ``image_uri`` (one it has anyway only names the row's image in messages). The row
checks are the manifest reader's (``clipmaps.pipeline.sources.row_problems``); a row with neither bytes nor a URI is
refused as ``MissingImage``. A shard's content digest covers each inline image by its SHA-256, so resume sees a
changed image as a changed row (:func:`image_digests`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from .decode.stage import IMAGE
from .sources import MANIFEST_READ, row_problems

#: The type the readers hand the ``image`` column on in (a refused or URI-only row: null).
IMAGE_TYPE = pa.binary()


def image_type_problem(t: pa.DataType) -> str | None:
    """Why an ``image`` column of type ``t`` cannot hold encoded images (None when it can: ``binary``,
    ``large_binary``, or a struct with a binary ``bytes`` field)."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t):
        return None
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        if i >= 0 and (pa.types.is_binary(t.field(i).type) or pa.types.is_large_binary(t.field(i).type)):
            return None
    return (
        f"column 'image' has type {t}; expected encoded image bytes (binary) or the Hugging Face image struct "
        "{bytes: binary, path: string}"
    )


def image_bytes(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The ``image`` column as ``binary`` (a struct's ``bytes`` field); empty values become null.

    Raises:
        ValueError: the column's type holds no image bytes (:func:`image_type_problem`)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    problem = image_type_problem(arr.type)
    if problem is not None:
        raise ValueError(problem)
    if pa.types.is_struct(arr.type):
        arr = pc.struct_field(arr, "bytes")
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), IMAGE_TYPE)
    arr = arr.cast(IMAGE_TYPE)
    empty = pc.fill_null(pc.equal(pc.binary_length(arr), 0), False)
    return pc.if_else(empty, pa.nulls(len(arr), IMAGE_TYPE), arr)


def check_rows(
    table: pa.Table,
    images: pa.Array | None,
    allowed_schemes: Iterable[str],
    *,
    duplicates: bool = False,
) -> list[tuple[str, str, str | None] | None]:
    """``row_problems`` for rows that may carry their image: per row of ``table`` (``MANIFEST_READ``), ``(error_type,
    message, region_id)`` or None. ``images`` (``binary``, null where a row has none) stands in for a missing
    ``image_uri``; without it the checks are exactly the manifest's."""
    allowed = tuple(allowed_schemes)
    if images is None:
        return row_problems(table, allowed_schemes=allowed, duplicates=duplicates)
    has = pc.is_valid(images)
    # a row with inline bytes stands in an allowed URI for the checks (never used: the decode stage reads the bytes)
    stand_in = pa.scalar(f"{allowed[0]}://inline-image", pa.string())
    i = table.schema.get_field_index("image_uri")
    checked = table.set_column(i, "image_uri", pc.if_else(has, stand_in, table["image_uri"].combine_chunks()))
    problems = row_problems(checked, allowed_schemes=allowed, duplicates=duplicates)
    return [
        ("MissingImage", "the row has neither image bytes nor an image_uri", None)
        if p is not None and p[0] == "MissingImageUri"
        else p
        for p in problems
    ]


def image_digests(images: pa.Array | None, n: int) -> list[str | None]:
    """Per row, the SHA-256 (32 hex digits) of its inline image, or None (no ``image`` column, or a null value)."""
    if images is None:
        return [None] * n
    return [hashlib.sha256(b).hexdigest()[:32] if b is not None else None for b in images.to_pylist()]


__all__ = ["IMAGE", "IMAGE_TYPE", "MANIFEST_READ", "check_rows", "image_bytes", "image_digests", "image_type_problem"]
