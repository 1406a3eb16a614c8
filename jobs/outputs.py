"""A finished job's outputs, read back: what ``clipmaps index``, ``query``, ``report``, ``eval`` and ``figures`` read.

Under a job's output URI (a local path or any fsspec URI) the pipeline writes ``_job.json`` (the spec, counts,
attempts) and one Parquet dataset per output kind, ``labels/``, ``heatmaps/``, ``regions/``, ``errors/`` and
``vocabulary/`` (schemas in :mod:`clipmaps.schemas.datasets`). Rows name their input image by ``image_id``; the
image's URI is in the job's manifest (``spec.input.uri``; ``manifest`` in older ``_job.json`` files).

Storage options: the output is read with the options the caller gives (``--storage-option``). The input (manifest,
images, files beside the manifest) is read with ``_job.json``'s ``spec.input.storage_options`` updated with the
caller's; secrets are stored there as ``***``, so those values are left out. Imports no torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from clipmaps.schemas.datasets import DATASETS, regions_schema
from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import REDACTED, filesystem, join_uri, redact_uri

logger = logging.getLogger(__name__)

JOB_FILE = "_job.json"
#: The datasets of an output, in the order reports list them.
DATASET_NAMES = ("labels", "heatmaps", "regions", "errors", "vocabulary")


def dataset_schema(name: str, dim: int | None = None) -> pa.Schema:
    """The schema clipmaps writes the dataset ``name`` with (``regions`` needs the embedding dimension ``dim``)."""
    if name == "regions":
        if dim is None:
            raise ValueError("the regions/ schema depends on the embedding dimension: pass dim")
        return regions_schema(dim)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------- URIs and options
def parse_storage_options(values: Sequence[str] | None) -> dict:
    """``KEY=VALUE`` strings (``--storage-option``) → fsspec options; values parsed as JSON when they can be."""
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option needs KEY=VALUE, got {item!r}", stage="output")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def usable_options(options: dict | None) -> dict:
    """Storage options from ``_job.json`` without the redacted (``***``) values, which would only fail."""

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x != REDACTED}
        return v

    return clean(dict(options or {}))


def is_local(fs) -> bool:
    """Whether the fsspec filesystem ``fs`` is this machine's."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


# ---------------------------------------------------------------------------------------------- inputs
def read_manifest_columns(
    uri: str | Sequence[str],
    columns: Sequence[str],
    storage_options: dict | None = None,
    image_ids: Sequence[str] | None = None,
    *,
    fmt: str = "auto",
    split: str | None = None,
) -> pa.Table:
    """Some columns of a job's input (``input.uri``: one entry or a list, brace patterns expanded; listed as the
    pipeline lists it, :func:`clipmaps.pipeline.manifests.list_manifest_files`). Parquet files: only those columns
    and, with ``image_ids``, only those rows are read. Other files are read whole and normalised as a run reads them
    (:func:`clipmaps.pipeline.manifests.read_rows`; a WebDataset tar's images are read too)."""
    from clipmaps.pipeline.manifests import count_file, list_manifest_files, read_rows

    options = dict(storage_options or {})
    _, files = list_manifest_files(uri, options, fmt, split=split)
    if all(f.format == "parquet" for f in files):
        fs, _ = filesystem(files[0].uri, options)
        ds = pads.dataset([filesystem(f.uri, options)[1] for f in files], filesystem=fs, format="parquet")
        cols = [c for c in columns if c in ds.schema.names]
        flt = pc.field("image_id").isin(list(image_ids)) if image_ids is not None else None
        return ds.to_table(columns=cols, filter=flt)
    parts = []
    for f in files:
        count = count_file(f, 1 << 30, options)
        parts.append(read_rows(f, count.header, None, 0, 0, count.rows, options).table)
    table = pa.concat_tables(parts)
    if image_ids is not None:
        table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(list(image_ids), pa.string())))
    return table.select([c for c in columns if c in table.column_names])


def read_image(uri: str, storage_options: dict | None = None):
    """An input image as the pipeline reads it (a PIL image, EXIF orientation applied, RGB)."""
    import fsspec

    from clipmaps.pipeline.decode import load_image

    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        data = f.read()
    return load_image(data, uri=uri)


# ---------------------------------------------------------------------------------------------- the outputs
class JobOutputs:
    """The outputs under one output URI.

    Args:
        uri: the job's output URI (local path or fsspec URI).
        storage_options: fsspec options for ``uri``; also applied, last, to the input.
        input_storage_options: options for the manifest and images instead of those of ``_job.json`` (above).
    """

    def __init__(
        self, uri: str, storage_options: dict | None = None, *, input_storage_options: dict | None = None
    ) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self._input_storage_options = input_storage_options
        self.fs, self.root = filesystem(uri, self.storage_options)

    def path(self, *names: str) -> str:
        """The filesystem path of ``names`` under the output (for :attr:`fs`)."""
        return join_uri(self.root, *names)

    def shown(self, *names: str) -> str:
        """The URI of ``names`` under the output, without credentials (for messages)."""
        return redact_uri(join_uri(self.uri, *names))

    def exists(self, *names: str) -> bool:
        """Whether the output (or ``names`` under it) exists."""
        return self.fs.exists(self.path(*names))

    @cached_property
    def job(self) -> dict:
        """``_job.json`` as a dict (``{}`` when the file is missing)."""
        path = self.path(JOB_FILE)
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    @property
    def spec(self) -> dict:
        """The job spec recorded in ``_job.json`` (``{}`` when there is none)."""
        return self.job.get("spec") or {}

    @property
    def input_uri(self) -> str | list[str] | None:
        """The job's input as its spec gives it (``spec.input.uri``, or ``manifest`` in older ``_job.json`` files):
        one entry or a list; None when ``_job.json`` names none."""
        section = self.spec.get("input") or {}
        return section.get("uri") or section.get("manifest") or None

    @property
    def manifest_uri(self) -> str | None:
        """The job's input as one string, for messages and the files beside it: :attr:`input_uri`, or a list's first
        entry."""
        value = self.input_uri
        return value if value is None or isinstance(value, str) else value[0]

    @cached_property
    def input_options(self) -> dict:
        """fsspec options for the job's input (see the module docstring)."""
        if self._input_storage_options is not None:
            return dict(self._input_storage_options)
        return {**usable_options((self.spec.get("input") or {}).get("storage_options")), **self.storage_options}

    def dataset(self, name: str) -> pads.Dataset | None:
        """The Parquet dataset ``name`` (one of :data:`DATASET_NAMES`), or ``None`` when the output has none."""
        if name not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
        path = self.path(name)
        if not self.fs.exists(path):
            return None
        return pads.dataset(path, filesystem=self.fs, format="parquet")

    def table(self, name: str, columns: Sequence[str] | None = None) -> pa.Table | None:
        """The whole dataset ``name`` in memory, or ``None`` when it is missing or holds no rows."""
        ds = self.dataset(name)
        if ds is None:
            return None
        table = ds.to_table(columns=list(columns) if columns is not None else None)
        return table if table.num_rows else None

    def manifest(self, columns: Sequence[str], image_ids: Sequence[str] | None = None) -> pa.Table:
        """Columns of the job's manifest (only the rows of ``image_ids`` when given); raises when ``_job.json``
        names no manifest or it cannot be read."""
        if self.input_uri is None:
            raise ConfigError(f"{self.shown(JOB_FILE)} names no input manifest", stage="output")
        section = self.spec.get("input") or {}
        return read_manifest_columns(
            self.input_uri,
            columns,
            self.input_options,
            image_ids,
            fmt=section.get("format") or "auto",
            split=section.get("split"),
        )

    def image_uris(self) -> pa.Table:
        """``image_id → image_uri`` from the job's manifest: one row per id (its first), null ids left out."""
        table = self.manifest(["image_id", "image_uri"])
        table = table.filter(pc.is_valid(table["image_id"]))
        first = table.group_by("image_id", use_threads=False).aggregate([("image_uri", "first")])
        return pa.table({"image_id": first["image_id"], "image_uri": first["image_uri_first"]})

    def image_uri_map(self) -> dict[str, str]:
        """:meth:`image_uris` as a dict."""
        table = self.image_uris()
        return dict(zip(table["image_id"].to_pylist(), table["image_uri"].to_pylist()))


__all__ = [
    "DATASET_NAMES",
    "JOB_FILE",
    "JobOutputs",
    "dataset_schema",
    "is_local",
    "parse_storage_options",
    "read_image",
    "read_manifest_columns",
    "usable_options",
]
