"""The CPU stage: fetch image bytes, decode, orient, convert to RGB, preprocess per method, decode region masks.

Usable as a Ray Data callable class or as a plain function (no Ray, no torch imported here)::

    ds.map_batches(DecodeStage, fn_constructor_kwargs={"config": cfg}, batch_format="numpy", concurrency=…)
    out = decode_batch(batch, cfg)

Input: a batch of manifest rows (``dict`` of numpy arrays or lists, or a ``pa.Table``) with ``image_id``,
``image_uri`` or ``image`` (the encoded image's bytes, or a Hugging Face ``{bytes, path}`` struct: such a row is
decoded from them, not fetched; its ``image_uri``, if any, names it in messages, else ``image bytes of <image_id>``)
and optionally ``masks`` (inline) or ``masks_uri`` (masks by reference, resolved on the worker:
:mod:`.mask_refs`), ``prompts``. Output: a ``dict[str, np.ndarray]`` with the same number of rows in the same order —
every input column except ``image``, ``masks`` and ``masks_uri`` (the raw inputs, heavy and no longer needed) passed
through unchanged, plus the decode columns of :mod:`clipmaps.schemas.batches`
(:func:`output_columns` lists them for a config). Per row:

==================== ============================================== ===========================================
column               good row                                       failed row
==================== ============================================== ===========================================
``height``/``width`` ``int64`` array: size after EXIF orientation   ``0``
``error_stage``      ``None``                                       ``read`` | ``decode`` | ``mask`` |
                                                                    ``preprocess`` (object array of str/None),
                                                                    or an earlier stage's (``manifest``)
``error_type``       ``None``                                       e.g. ``FileNotFoundError``,
                                                                    ``DecompressionBomb``, ``TruncatedImage``
``error_message``    ``None``                                       short; names the URI (credentials redacted)
``prompts``          ``list[str] | None`` (``None`` = the job's vocabulary), normalised from the input
``pixels_square``    ``float32 [3, S, S]`` (OpenAI mean/std,         ``float32 [3, 0, 0]``
                     bicubic) — only when ``square_size`` is set
``pixels_maskclip``  ``float32 [3, h, w]`` — only with ``maskclip``  ``float32 [3, 0, 0]``
``mask_ids``         ``list[str]``: valid masks, manifest order     ``None``
``masks_square``     ``float32 [M, S, S]`` in [0, 1]                ``float32 [0, S, S]``
``mask_area``        ``int64 [M]``: pixels at the image's size       ``int64 [0]``
``mask_bbox``        ``int32 [M, 4]``: x, y, w, h at the image size ``int32 [0, 4]``
``mask_rle``         ``list[dict(size=[h, w], counts=str)]``: each   ``None``
                     mask's COCO compressed RLE at the image's
                     decoded size (the frame of area and bbox)
``mask_errors``      ``list[dict(region_id, error_type, message)]`` ``None``
==================== ============================================== ===========================================

Rows that arrive failed (``error_stage`` set, e.g. ``manifest`` by the reader's validation) are passed through:
nothing of theirs is fetched, their error columns are kept and every other column holds the fill above.

The mask columns exist only with ``need_masks`` (``masks_square`` also needs ``square_size``); a good row
without masks has ``M = 0``. Array-valued columns are 1-D ``object`` arrays of ``np.ndarray``.

Why failed rows hold empty arrays and ``0`` rather than ``None``: Ray Data turns a numpy column into an Arrow
tensor column when every value is an array, but into pickled Python objects when one is ``None``, and then
refuses to concatenate the two kinds ("Found columns with both objects and tensors"). Arrays of one ``ndim``
(fixed or variable shape) always unify. **Always test ``error_stage`` to tell failed rows**, with
:func:`failed_rows`: after Ray's Arrow round trip a column that is ``None`` on every row of a block comes back as
``float32`` NaN, not ``None`` (this also hits ``error_*`` and ``prompts``).


One module per job: :mod:`.fetch` (reads with retries; errors named by redacted URI), :mod:`.image` (decoding,
orientation, transparency, bit depths, bomb guard), :mod:`.masks` (RLE, polygon and mask-image decoding),
:mod:`.mask_refs` (masks by reference: SA-1B JSON, PNG folders, side Parquet), :mod:`.preprocess` (resize and
normalise per method), :mod:`.stage` (the stage and its columns). Errors are
``clipmaps.schemas.errors.RowError``: a row's carries its stage, a mask's also its ``region_id``.
"""

from clipmaps.schemas.batches import failed_rows

from .fetch import fetch_bytes, is_transient
from .image import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, load_image, to_rgb
from .masks import decode_mask
from .stage import IMAGE, OUTPUT_COLUMNS, DecodeConfig, DecodeStage, decode_batch, output_columns

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE",
    "OUTPUT_COLUMNS",
    "DecodeConfig",
    "DecodeStage",
    "decode_batch",
    "decode_mask",
    "failed_rows",
    "fetch_bytes",
    "is_transient",
    "load_image",
    "output_columns",
    "to_rgb",
]
