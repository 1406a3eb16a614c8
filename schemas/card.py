"""The dataset card every output carries: a ``README.md`` whose YAML header tells Hugging Face ``datasets`` (and the
Hub's viewer) how the output is laid out.

``datasets.load_dataset(OUTPUT, "labels")`` loads one dataset by name: the header lists one ``configs`` entry per
dataset (``data_files: labels/*.parquet``, split ``train``) and, in ``dataset_info``, each dataset's features
translated from its Arrow schema (:mod:`clipmaps.schemas.datasets`, the single source of truth). PNG columns are
declared as ``image`` features so that viewers which know image columns show them: label maps (uint8/uint16 PNG,
0 = background), 8-bit heatmaps (when the job writes ``png8``; ``float16`` heatmaps stay ``binary``), the optional
label confidence and MaskInversion's explainability maps. ``datasets`` then decodes them with Pillow; read the bytes
instead with ``load_dataset(...).cast_column("label_map", Image(decode=False))``. A dataset without rows
cannot be loaded by ``datasets`` (it refuses an empty split, ``Instruction "train" corresponds to no data``).

The header uses the feature syntax of ``datasets`` ≥ 4 (``list:`` for list columns). Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import yaml

#: Binary columns holding PNG images (declared ``image``).
IMAGE_COLUMNS = ("label_map", "confidence", "expl_map")
#: The output's datasets, in the order the card lists them (``vocabulary`` first: the key to the label maps).
CARD_DATASETS = ("vocabulary", "labels", "heatmaps", "regions", "errors")

_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.binary(): "binary",
    pa.large_binary(): "large_binary",
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
}


def feature(arrow_type: pa.DataType, *, image: bool = False) -> dict:
    """One Arrow type as a ``datasets`` YAML feature (without its name).

    Raises:
        TypeError: a type the card has no translation for (a new column type needs one here)."""
    if image:
        return {"dtype": "image"}
    if arrow_type in _DTYPES:
        return {"dtype": _DTYPES[arrow_type]}
    if pa.types.is_fixed_size_list(arrow_type):
        return {**_inner(arrow_type.value_type), "length": arrow_type.list_size}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _inner(arrow_type.value_type)
    if pa.types.is_struct(arrow_type):
        return {"struct": [{"name": f.name, **feature(f.type)} for f in arrow_type]}
    raise TypeError(f"no datasets feature for Arrow type {arrow_type}")


def _inner(value_type: pa.DataType) -> dict:
    inner = feature(value_type)
    return {"list": inner["dtype"] if set(inner) == {"dtype"} else inner}


def features(schema: pa.Schema, *, image_columns: tuple[str, ...] = IMAGE_COLUMNS) -> list[dict]:
    """A dataset's Arrow schema as the ``features`` list of its card entry, PNG columns as ``image``."""
    return [{"name": f.name, **feature(f.type, image=f.name in image_columns)} for f in schema]


def dataset_card(schemas: Mapping[str, pa.Schema], *, heatmap_encoding: str, title: str, body: str = "") -> str:
    """The ``README.md`` text of an output holding ``schemas`` (dataset name → Arrow schema).

    Args:
        schemas: each dataset's schema (``regions/``'s depends on the model's embedding width).
        heatmap_encoding: the job's ``output.heatmap_encoding``: ``png8`` heatmaps are declared as images.
        title: the card's heading (the job's model and methods, say).
        body: Markdown after the heading.
    """
    names = [n for n in CARD_DATASETS if n in schemas] + [n for n in schemas if n not in CARD_DATASETS]
    images = IMAGE_COLUMNS + (("heatmap",) if heatmap_encoding == "png8" else ())
    header = {
        "configs": [{"config_name": n, "data_files": [{"split": "train", "path": f"{n}/*.parquet"}]} for n in names],
        "dataset_info": [{"config_name": n, "features": features(schemas[n], image_columns=images)} for n in names],
        "tags": ["clipmaps", "image-segmentation"],
    }
    text = yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
    lines = [f"# {title}", "", body.strip(), ""] if body.strip() else [f"# {title}", ""]
    usage = (
        'Each dataset loads by name, e.g. `datasets.load_dataset("<this folder>", "labels")`; or read the '
        "Parquet files directly (pyarrow, pandas, Polars, DuckDB). Label maps are PNGs whose pixel values are "
        "`class_index` in `vocabulary/` (0 = background). A dataset without rows holds only its schema file: "
        "pyarrow, pandas, Polars and DuckDB read it as an empty table, `datasets` refuses an empty split."
    )
    return "---\n" + text + "---\n\n" + "\n".join(lines) + usage + "\n"


__all__ = ["CARD_DATASETS", "IMAGE_COLUMNS", "dataset_card", "feature", "features"]
