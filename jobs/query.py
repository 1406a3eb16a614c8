"""``clipmaps query``: text-to-region and region-to-region search over ``OUTPUT_URI/index/``.

Queries are embedded with the model and weights that wrote the region embeddings: the index names them
(``model``, ``weights``, ``params_hash`` of its one provenance group), and ``_job.json``'s spec says how to load
them (``model.name`` and ``pretrained``/``weights``/``seed``). Anything that disagrees is refused:

* ``--model X`` that is not the index's model;
* a ``_job.json`` whose model or weights are not those of the index (the output was rewritten by another job);
* for region queries, a ``_job.json`` whose MaskInversion parameters do not hash to the index's ``params_hash``.

Text queries: the CLIP text encoder, L2-normalised, on the raw text (``--template "a photo of a {}."`` to wrap
it). Region queries (``--image IMG --mask MASK.png``): the image and mask are decoded as the pipeline decodes
them, preprocessed with the job's MaskInversion input size and optimised with the job's MaskInversion
parameters, so a region that the job embedded gets the same embedding again (up to float rounding; bf16 jobs
differ by ~1e-3 in cosine from the fp32 that runs here). Torch is imported only when a query is embedded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import redact_text, redact_uri

from .index import INDEX_DIR, LoadedIndex, load_index
from .outputs import JOB_FILE, JobOutputs, parse_storage_options, usable_options


class QueryError(ConfigError):
    """A query that cannot be answered as asked (mismatched model, missing job spec, unreadable mask…); the CLI
    exits with 2."""

    default_stage = "query"


@dataclass
class Hit:
    rank: int
    score: float
    row: int
    image_id: str | None
    region_id: str | None
    image_uri: str | None
    method: str | None
    model: str | None
    weights: str | None
    params_hash: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------- the model
def job_model(job: dict) -> dict:
    """``spec.model`` of ``_job.json`` (refused when missing)."""
    model = ((job.get("spec") or {}).get("model")) or None
    if not model or not model.get("name"):
        raise QueryError("_job.json has no spec.model: cannot tell which model wrote the embeddings")
    return model


def weights_id(model: dict) -> str:
    """The ``weights`` value result rows carry for a ``spec.model`` (as ``ModelSpec.weights_id``)."""
    if model.get("pretrained") is not None:
        return str(model["pretrained"])
    if model.get("weights") is not None:
        return redact_uri(str(model["weights"]))
    return f"random:seed={model.get('seed')}"


def check_model(index: LoadedIndex, job: dict, requested: str | None) -> dict:
    """Refuse a model that is not the one that wrote the indexed embeddings; return ``spec.model``."""
    src = index.source
    if requested is not None and requested != src["model"]:
        raise QueryError(
            f"--model {requested} differs from the model that wrote the indexed embeddings "
            f"({src['model']}, weights {src['weights']}): the query would be embedded in another "
            "space and match nothing meaningful"
        )
    model = job_model(job)
    if model["name"] != src["model"] or weights_id(model) != src["weights"]:
        raise QueryError(
            f"_job.json names model {model['name']} with weights {weights_id(model)}, but the index "
            f"was built from embeddings of {src['model']} with weights {src['weights']}: the output "
            "was rewritten since; rebuild the index (clipmaps index) or point at the right output"
        )
    return model


def load_job_model(model: dict, device: str = "cpu", storage_options: dict | None = None):
    """``load_model`` with the spec's weight source (torch imported here)."""
    from clipmaps.actors.models import load_model

    so = {**usable_options(model.get("storage_options")), **(storage_options or {})}
    quiet = _QuietRandomInit()
    logging.getLogger().addFilter(quiet)  # open_clip warns that a seeded model has random weights: it is meant to
    try:
        return load_model(
            model["name"],
            pretrained=model.get("pretrained"),
            weights=model.get("weights"),
            seed=model.get("seed"),
            device=device,
            storage_options=so or None,
        )
    except Exception as e:  # noqa: BLE001 - hub unreachable, weights unreadable…
        detail = redact_text(str(e), storage_options=so, uris=[model.get("weights")])
        raise QueryError(f"cannot load {model['name']} ({weights_id(model)}): {type(e).__name__}: {detail}") from None
    finally:
        logging.getLogger().removeFilter(quiet)


class _QuietRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


# ---------------------------------------------------------------------------------------------- embeddings
def text_embedding(lm, text: str, template: str | None = None) -> np.ndarray:
    """CLIP text embedding of ``text`` (``template.format(text)`` with a template), L2-normalised ``[D]``.

    Raises:
        QueryError: the text is empty, or has more tokens than the text tower's context (with the template): it is
            refused, never cut, as the message says with its token count and the limit.
    """
    from clipmaps.actors.text import RAW_TEMPLATE, TextEncoder

    templates = (template,) if template else RAW_TEMPLATE
    try:
        vec = TextEncoder(lm.model, lm.tokenizer).encode([text], templates)[0]
    except ValueError as e:
        raise QueryError(str(e)) from e
    return vec.float().cpu().numpy()


def job_spec(job: dict):
    """The validated ``JobSpec`` of ``_job.json``."""
    from clipmaps.pipeline.spec import SpecError, load_spec

    try:
        return load_spec(job["spec"])
    except (SpecError, KeyError, TypeError) as e:
        raise QueryError(f"_job.json's spec cannot be read back: {e}") from e


def region_embedding(
    lm, job: dict, index: LoadedIndex, image_uri: str, mask_uri: str, storage_options: dict | None = None
) -> np.ndarray:
    """MaskInversion embedding of the region ``mask_uri`` (a PNG or any image; non-zero = inside) of the image
    ``image_uri``, with the job's MaskInversion parameters and input size; L2-normalised ``[D]``."""
    import fsspec
    import torch
    import torch.nn.functional as F

    from clipmaps.actors.methods.maskinversion import MaskInversion
    from clipmaps.pipeline.decode import decode_mask, load_image
    from clipmaps.pipeline.fingerprint import params_hash

    spec = job_spec(job)
    if "maskinversion" not in spec.enabled_methods():
        raise QueryError("_job.json's spec has no methods.maskinversion: no parameters to embed a region with")
    phash = params_hash(spec, "maskinversion")
    if phash != index.source["params_hash"]:
        raise QueryError(
            f"_job.json's MaskInversion parameters hash to {phash}, the index holds embeddings with "
            f"params_hash {index.source['params_hash']}: a region embedded now would not be "
            "comparable; rebuild the index or point at the right output"
        )
    so = storage_options or {}
    try:
        with fsspec.open(image_uri, "rb", **so) as f:
            data = f.read()
        img = load_image(data, uri=image_uri)
    except Exception as e:  # noqa: BLE001 - RowError, FileNotFoundError…
        raise QueryError(f"cannot read the image {redact_uri(image_uri)}: {getattr(e, 'message', e)}") from e
    width, height = img.size
    try:
        with fsspec.open(mask_uri, "rb", **so) as f:
            mask_bytes = f.read()
        mask = decode_mask({"uri": mask_uri}, height, width, fetched=mask_bytes)
    except Exception as e:  # noqa: BLE001 - the pipeline's mask errors carry a message
        raise QueryError(f"cannot use the mask {redact_uri(mask_uri)}: {getattr(e, 'message', e)}") from e
    if not mask.any():
        raise QueryError(f"the mask {redact_uri(mask_uri)} is empty (no non-zero pixel)")
    pre = spec.preprocess("maskinversion")
    x = torch.from_numpy(pre.image(img))[None].to(lm.device)
    m = torch.from_numpy(pre.mask(mask, (width, height)))[None].to(lm.device)
    result = MaskInversion(lm.model, spec.method_params("maskinversion")).embed(x, [m])[0]
    return F.normalize(result.embeddings.float(), dim=-1)[0].cpu().numpy()


# ---------------------------------------------------------------------------------------------- search
def search(index: LoadedIndex, vector: np.ndarray, k: int) -> list[Hit]:
    rows, scores = index.search(vector[None], k)
    ids = index.lookup(rows[0])
    hits = []
    for rank, (row, score, info) in enumerate(zip(rows[0], scores[0], ids), start=1):
        if row < 0:
            continue
        hits.append(
            Hit(
                rank=rank,
                score=float(score),
                row=int(row),
                image_id=info.get("image_id"),
                region_id=info.get("region_id"),
                image_uri=info.get("image_uri"),
                method=info.get("method"),
                model=info.get("model"),
                weights=info.get("weights"),
                params_hash=info.get("params_hash"),
            )
        )
    return hits


def query(
    output_uri: str,
    text: str | None = None,
    *,
    image: str | None = None,
    mask: str | None = None,
    k: int = 20,
    model: str | None = None,
    template: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    input_storage_options: dict | None = None,
) -> dict:
    """Run one query; returns ``{"query": …, "index": …, "results": [Hit dicts]}``.

    Exactly one of ``text`` and (``image`` with ``mask``) is given. See the module docstring for the checks.
    """
    if (text is None) == (image is None and mask is None):
        raise QueryError("give either a text query or --image with --mask")
    if (image is None) != (mask is None):
        raise QueryError("--image and --mask go together")
    if k < 1:
        raise QueryError(f"-k must be >= 1, got {k}")
    index = load_index(output_uri, storage_options=storage_options)
    src = index.source
    if model is not None and model != src["model"]:  # before reading anything else
        check_model(index, {}, model)
    outputs = JobOutputs(output_uri, storage_options)
    job = outputs.job
    if not job:
        raise QueryError(
            f"{outputs.shown(JOB_FILE)} is missing: cannot tell how to load the model that wrote the embeddings"
        )
    spec_model = check_model(index, job, model)
    lm = load_job_model(spec_model, device=device)
    if text is not None:
        vec = text_embedding(lm, text, template)
        what = {"text": text, "template": template or "{}"}
    else:
        vec = region_embedding(lm, job, index, image, mask, input_storage_options)
        what = {"image": image, "mask": mask}
    if vec.shape[0] != index.meta["dim"]:
        raise QueryError(f"the model embeds into {vec.shape[0]} dimensions, the index holds {index.meta['dim']}")
    hits = search(index, vec, k)
    return {
        "query": {**what, "k": k},
        "index": {
            "uri": outputs.shown(INDEX_DIR),
            "kind": index.meta["kind"],
            "count": index.meta["count"],
            "model": src["model"],
            "weights": src["weights"],
            "params_hash": src["params_hash"],
            "method": src["method"],
        },
        "results": [h.as_dict() for h in hits],
    }


def format_results(result: dict) -> str:
    """A plain table of the results."""
    idx = result["index"]
    q = result["query"]
    head = (
        f"query {json.dumps(q['text'])}" if "text" in q else f"region {q['mask']} of {q['image']}"
    ) + f" — {idx['count']} regions ({idx['kind']}), {idx['model']} / {idx['weights']}, params {idx['params_hash']}"
    rows = [("rank", "score", "image_id", "region_id", "image_uri")]
    rows += [
        (str(h["rank"]), f"{h['score']:.4f}", str(h["image_id"]), str(h["region_id"]), h["image_uri"] or "-")
        for h in result["results"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    if not result["results"]:
        lines.append("(no results)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def run_query_cli(args: argparse.Namespace) -> int:
    """``clipmaps query`` (arguments: :func:`clipmaps.jobs.commands.add_query_parser`); returns the exit code."""
    so: dict = {}
    try:
        so = parse_storage_options(args.storage_option)
        result = query(
            args.output_uri,
            args.text,
            image=args.image,
            mask=args.mask,
            k=args.k,
            model=args.model,
            template=args.template,
            device=args.device,
            storage_options=so,
            input_storage_options=so,
        )
    except (ConfigError, OSError) as e:  # QueryError, RegionIndexError, a bad --storage-option
        uris = [args.output_uri, args.image, args.mask]
        print(f"clipmaps query: error: {redact_text(str(e), storage_options=so, uris=uris)}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_results(result))
    return 0


__all__ = ["Hit", "QueryError", "format_results", "query", "run_query_cli"]
