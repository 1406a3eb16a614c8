"""Every ``clipmaps`` command's arguments, declared without importing what the command runs.

Building the parser imports only the standard library, so ``clipmaps --help`` or a mistyped option answers at once
and ``clipmaps k8s render`` never loads torch or Ray. Each command names its handler as ``"module:function"``
(:class:`Handler`), imported when the command runs; the handler takes the parsed arguments and returns the exit code.

Defaults that a library also defines (the index's HNSW parameters, :class:`clipmaps.jobs.k8s.RenderOptions`,
:class:`clipmaps.jobs.train.TrainConfig`) are repeated here so that no library is imported;
``tests/unit/test_cli.py`` checks that they agree.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass

# the index (clipmaps.jobs.index): exhaustive search below this many vectors, HNSW parameters
EXACT_BELOW, HNSW_M, EF_CONSTRUCTION, EF_SEARCH = 50_000, 32, 100, 128
# the RayJob (clipmaps.jobs.k8s.RenderOptions)
K8S_NAME, K8S_IMAGE, K8S_SECRET = "clipmaps", "registry.example.com/clipmaps:0.1.0", "clipmaps-s3"
K8S_GPUS_PER_WORKER, K8S_MIN_WORKERS, K8S_MAX_WORKERS, K8S_HEAD_CPUS, K8S_HEAD_MEMORY = 1, 1, 4, "4", "16Gi"
K8S_BACKOFF_LIMIT, K8S_ACTIVE_DEADLINE_S, K8S_TTL_AFTER_FINISHED_S = 2, 86400, 600
# the tiny CLIP's training (clipmaps.jobs.train.TrainConfig)
TRAIN_SEED, TRAIN_STEPS, TRAIN_BATCH_SIZE, TRAIN_LR, TRAIN_THREADS = 0, 1700, 128, 1e-3, 2

STORAGE_OPTION_HELP = "fsspec storage option for the output URI (repeatable; VALUE parsed as JSON if it can be)"


@dataclass(frozen=True)
class Handler:
    """A command's handler, ``"package.module:function"``, imported only when the command runs."""

    target: str

    def __call__(self, args: argparse.Namespace) -> int:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(args)


def _storage_option(p: argparse.ArgumentParser, help: str = STORAGE_OPTION_HELP) -> None:
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help=help)


# ---------------------------------------------------------------------------------------------- running jobs
def add_demo_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps demo``: the whole pipeline on generated scenes."""
    p = sub.add_parser("demo", help="run the whole pipeline (local Ray, all four methods) on sample scenes")
    p.add_argument("--output", default="clipmaps-demo", help="folder for the generated inputs and the outputs")
    p.add_argument("--model", default="clipmaps-synth-vit", help="open_clip model name")
    p.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag: synth-shapes-v1 (the default, shipped) or an open_clip tag (needs hub access)",
    )
    p.add_argument("--seed", type=int, default=None, help="random weights from this seed instead (noise maps)")
    p.add_argument("--weights", default=None, help="weights file or URI (safetensors or a torch state dict)")
    p.add_argument("--size", type=int, default=None, help="input size in pixels (default: the demo spec's)")
    p.add_argument("--scenes", type=int, default=8, help="number of sample scenes")
    p.set_defaults(func=Handler("clipmaps.jobs.demo:run_demo_cli"))
    return p


def add_run_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps run SPEC``: run a job spec on Ray."""
    p = sub.add_parser("run", help="run a job spec (YAML) on Ray")
    p.add_argument("spec", help="job spec YAML file")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate, resolve inputs and print the plan only")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what output.uri holds (same as --set output.overwrite=true); without it a re-run "
        "resumes, and a changed spec is refused",
    )
    p.set_defaults(func=Handler("clipmaps.jobs.cli:_run"))
    return p


def add_manifest_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps manifest {coco,sa1b,folder} … -o OUT``: write a manifest."""
    parser = sub.add_parser("manifest", help="write a manifest from COCO, SA-1B or a folder of images")
    sources = parser.add_subparsers(dest="source", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-o", "--output", required=True, help="manifest to write (.parquet, .jsonl or .csv)")
        _storage_option(p, "fsspec storage option (repeatable; VALUE parsed as JSON when it can be)")
        p.set_defaults(func=Handler("clipmaps.jobs.manifest_cli:run_manifest_cli"))

    coco = sources.add_parser("coco", help="COCO instances JSON (polygons and RLE masks)")
    coco.add_argument("instances_json", help="instances JSON file or URI")
    coco.add_argument("images_root", help="folder or URI prefix that holds the images' file_name")
    common(coco)
    sa1b = sources.add_parser("sa1b", help="SA-1B per-image JSON files (image next to each JSON)")
    sa1b.add_argument("json", nargs="+", help="JSON files, URIs or globs")
    sa1b.add_argument(
        "--inline-masks",
        action="store_true",
        help="copy every annotation's RLE into the manifest instead of pointing to each JSON (masks_uri)",
    )
    common(sa1b)
    folder = sources.add_parser("folder", help="a folder or glob of images, with per-instance PNG masks")
    folder.add_argument("path", help="folder, file glob or URI (s3://bucket/dir/*.jpg)")
    folder.add_argument(
        "--mask-pattern",
        default="{stem}_mask_*.png",
        help="mask file names next to each image; * is the region id (default: %(default)s)",
    )
    folder.add_argument("--recursive", action="store_true", help="include sub-folders of a folder")
    folder.add_argument(
        "--mask-folders",
        default=None,
        metavar="PATTERN",
        help="each image's masks are the PNGs of this folder beside it, e.g. '{stem}/' or 'masks/{stem}/', written "
        "by reference (masks_uri) instead of --mask-pattern",
    )
    common(folder)
    return parser


def add_models_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps models [FILTER]``: list architectures, methods and pretrained tags."""
    p = sub.add_parser("models", help="list model architectures, the methods they support and pretrained tags")
    p.add_argument("filter", nargs="?", default=None, help="substring of the name")
    p.add_argument("--no-tags", action="store_true", help="skip open_clip's pretrained tags (no torch import)")
    p.set_defaults(func=Handler("clipmaps.jobs.cli:_models"))
    return p


def add_schema_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps schema``: the job spec's JSON Schema."""
    p = sub.add_parser("schema", help="print the job spec's JSON Schema (for editors: yaml-language-server)")
    p.add_argument("-o", "--output", default=None, help="write it to this file instead of stdout")
    p.set_defaults(func=Handler("clipmaps.jobs.cli:_schema"))
    return p


# ---------------------------------------------------------------------------------------------- Kubernetes
def add_k8s_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps k8s {render,sample-input}``: KubeRay manifests for a job spec, and sample input."""
    parser = sub.add_parser("k8s", help="KubeRay RayJob manifests for a job spec")
    commands = parser.add_subparsers(dest="k8s_command", required=True)
    p = commands.add_parser(
        "render",
        help="write the RayJob, ConfigMap and ServiceAccount that run a job spec on KubeRay",
        description="Write the ServiceAccount, ConfigMap (the job spec) and RayJob that run `clipmaps run` on the "
        "spec on a KubeRay cluster. Credentials come from a Secret with AWS_* keys, not from the spec.",
    )
    p.add_argument("spec", help="job spec YAML file")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override a spec field before it goes into the ConfigMap (repeatable)",
    )
    p.add_argument(
        "--image", default=K8S_IMAGE, help="clipmaps image, built from k8s/Dockerfile (default: %(default)s)"
    )
    p.add_argument(
        "--name", default=K8S_NAME, help="name of the RayJob, ConfigMap and ServiceAccount (default: %(default)s)"
    )
    p.add_argument("--namespace", default=None, help="namespace of every object (default: kubectl's)")
    p.add_argument(
        "--gpus-per-worker",
        type=int,
        default=K8S_GPUS_PER_WORKER,
        help="nvidia.com/gpu per worker pod; 0 = CPU-only workers (default: %(default)s)",
    )
    p.add_argument("--min-workers", type=int, default=K8S_MIN_WORKERS, help="default: %(default)s")
    p.add_argument("--max-workers", type=int, default=K8S_MAX_WORKERS, help="default: %(default)s")
    p.add_argument("--worker-cpus", default=None, help="CPUs per worker pod (default: 8 per GPU, 4 without)")
    p.add_argument("--worker-memory", default=None, help="memory per worker pod (default: 48Gi per GPU, 8Gi without)")
    p.add_argument("--head-cpus", default=K8S_HEAD_CPUS, help="default: %(default)s")
    p.add_argument("--head-memory", default=K8S_HEAD_MEMORY, help="default: %(default)s")
    p.add_argument("--secret", default=K8S_SECRET, help="Secret with the AWS_* credentials (default: %(default)s)")
    p.add_argument(
        "--no-secret",
        action="store_true",
        help="take no credentials from a Secret (IRSA / workload identity on the ServiceAccount)",
    )
    p.add_argument(
        "--backoff-limit",
        type=int,
        default=K8S_BACKOFF_LIMIT,
        help="retries of a failed job, each resuming the same output (default: %(default)s)",
    )
    p.add_argument(
        "--active-deadline-seconds",
        type=int,
        default=K8S_ACTIVE_DEADLINE_S,
        help="time limit of each attempt (default: %(default)s)",
    )
    p.add_argument(
        "--ttl-seconds-after-finished",
        type=int,
        default=K8S_TTL_AFTER_FINISHED_S,
        help="keep the finished cluster this long (default: %(default)s)",
    )
    p.add_argument(
        "--sample-input",
        type=int,
        default=0,
        metavar="SCENES",
        help="first write SCENES generated scenes to input.uri (smoke test)",
    )
    p.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    p.set_defaults(func=Handler("clipmaps.jobs.k8s:_render_cli"))
    sample = commands.add_parser(
        "sample-input",
        help="write generated scenes and their manifest to a job spec's input.uri",
        description="Write generated scenes (JPEGs with masks and prompts) beside input.uri and the JSON-lines "
        "manifest itself; nothing is written when the manifest exists.",
    )
    sample.add_argument("spec", help="job spec YAML file")
    sample.add_argument("--scenes", type=int, default=6, help="number of scenes (default: %(default)s)")
    sample.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field")
    sample.set_defaults(func=Handler("clipmaps.jobs.k8s:_sample_input_cli"))
    return parser


# ---------------------------------------------------------------------------------------------- reading outputs
def add_index_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps index OUTPUT_URI``: a nearest-neighbour index over ``regions/``."""
    p = sub.add_parser("index", help="build a nearest-neighbour index over a job's regions/ embeddings")
    p.add_argument("output_uri", help="the job's output URI (local path or s3://…)")
    p.add_argument(
        "--params-hash",
        default=None,
        help="index only the regions with this params_hash (needed when regions/ mixes several)",
    )
    p.add_argument(
        "--kind",
        choices=("auto", "exact", "hnsw"),
        default="auto",
        help="exact (exhaustive) or HNSW search; auto: exact below --exact-below vectors",
    )
    p.add_argument("--exact-below", type=int, default=EXACT_BELOW, help="default: %(default)s")
    p.add_argument("--batch-rows", type=int, default=16_384, help="rows per Parquet scanner batch")
    p.add_argument("--m", type=int, default=HNSW_M, help="HNSW links per node (default: %(default)s)")
    p.add_argument(
        "--ef-construction",
        type=int,
        default=EF_CONSTRUCTION,
        help="HNSW candidates when adding (default: %(default)s)",
    )
    p.add_argument(
        "--ef-search",
        type=int,
        default=EF_SEARCH,
        help="HNSW candidates when searching, stored as the index's default (default: %(default)s)",
    )
    p.add_argument("--no-image-uris", action="store_true", help="do not join image URIs from the manifest")
    _storage_option(p)
    p.set_defaults(func=Handler("clipmaps.jobs.index:run_index_cli"))
    return p


def add_query_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps query OUTPUT_URI [TEXT]``: search the region index by text or by a region."""
    p = sub.add_parser("query", help="search the region index by text or by a region of an image")
    p.add_argument("output_uri", help="the job's output URI (with index/ built by `clipmaps index`)")
    p.add_argument("text", nargs="?", default=None, help="text query (leave out with --image/--mask)")
    p.add_argument("--image", default=None, help="image (path or URI) for a region-to-region query")
    p.add_argument("--mask", default=None, help="mask image of the region (same size as the image; non-zero = in)")
    p.add_argument("-k", type=int, default=20, help="number of results (default: %(default)s)")
    p.add_argument("--model", default=None, help="refuse unless the index was built with this model")
    p.add_argument("--template", default=None, help='prompt template for the text, e.g. "a photo of a {}."')
    p.add_argument("--device", default="cpu", help="torch device for embedding the query (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _storage_option(p, "fsspec storage option for the output URI and the query image (repeatable)")
    p.set_defaults(func=Handler("clipmaps.jobs.query:run_query_cli"))
    return p


def add_report_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps report OUTPUT_URI``: a static HTML report."""
    p = sub.add_parser("report", help="write a static HTML report of a job's outputs (opens from disk)")
    p.add_argument("output_uri", help="the job's output URI (local path or s3://…)")
    p.add_argument("-o", "--output", default=None, help="report folder (default: OUTPUT_URI/report)")
    p.add_argument("--sample", type=int, default=12, help="images shown (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default: %(default)s)")
    p.add_argument(
        "--select",
        default="random",
        metavar="KIND",
        help="which images: random (default), errors, class:NAME, high-loss (MaskInversion), low-confidence",
    )
    p.add_argument("--max-heatmaps", type=int, default=24, help="heatmaps shown per image at most")
    _storage_option(p)
    p.set_defaults(func=Handler("clipmaps.jobs.report:run_report_cli"))
    return p


def add_export_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps export coco OUTPUT_URI --method M -o FILE``: outputs in the formats review and training tools read."""
    parser = sub.add_parser("export", help="export a job's outputs (COCO JSON, FiftyOne)")
    formats = parser.add_subparsers(dest="format", required=True)
    coco = formats.add_parser(
        "coco",
        help="one method's label maps as COCO annotations (RLE per class region; pycocotools loads it)",
        description="Write one method's label maps as a COCO JSON file: images, categories and one annotation per "
        "class present in an image (compressed RLE, bbox, area, score).",
    )
    coco.add_argument("output", help="the job's output URI")
    coco.add_argument(
        "--method", help="whose label maps: maskclip, gem or gem_original (default: the only one the output has)"
    )
    coco.add_argument("-o", "--out", required=True, help="the JSON file to write")
    coco.add_argument(
        "--categories-from",
        default=None,
        metavar="INSTANCES_JSON",
        help="take category ids by name from this COCO file (e.g. the source's), for COCOeval",
    )
    _storage_option(coco)
    coco.set_defaults(func=Handler("clipmaps.jobs.export:run_export_cli"))
    fo = formats.add_parser(
        "fiftyone",
        help="label maps as segmentations and heatmaps as heatmaps in a FiftyOne dataset (needs clipmaps[fiftyone])",
    )
    fo.add_argument("output", help="the job's output URI")
    fo.add_argument("--name", required=True, help="the FiftyOne dataset's name")
    fo.add_argument("--overwrite", action="store_true", help="replace a FiftyOne dataset of that name")
    _storage_option(fo)
    fo.set_defaults(func=Handler("clipmaps.jobs.export_fiftyone:run_export_fiftyone_cli"))
    return parser


# ---------------------------------------------------------------------------------------------- the tiny CLIP
def add_eval_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps eval OUTPUT_URI``: scores against the ground truth of generated scenes."""
    p = sub.add_parser(
        "eval",
        help="score a job's outputs on generated scenes against their ground truth",
        description="Score a job's outputs (OUTPUT_URI) against the ground truth of generated scenes.",
    )
    p.add_argument("output", help="the job's output URI (e.g. clipmaps-demo/output)")
    p.add_argument("--truth", help="truth.parquet (default: beside the job's manifest)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baselines")
    p.set_defaults(func=Handler("clipmaps.jobs.evaluate:run_eval_cli"))
    return p


def add_train_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps train``: train the demo's tiny CLIP from a seed."""
    p = sub.add_parser(
        "train",
        help="train the tiny CLIP of the demo (clipmaps-synth-vit) from a seed on generated scenes",
        description="Train clipmaps-synth-vit on generated scenes and save fp16 safetensors. The defaults reproduce "
        "the shipped checkpoint (about 25 minutes on 2 CPU cores).",
    )
    p.add_argument("--out", default="clipmaps-synth-vit.safetensors", help="where to write the weights")
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--steps", type=int, default=TRAIN_STEPS)
    p.add_argument("--batch-size", type=int, default=TRAIN_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=TRAIN_LR)
    p.add_argument(
        "--threads",
        type=int,
        default=TRAIN_THREADS,
        help="torch threads (the shipped checkpoint used the default; other counts change the bits)",
    )
    p.set_defaults(func=Handler("clipmaps.jobs.train:run_train_cli"))
    return p


def add_figures_parser(sub) -> argparse.ArgumentParser:
    """``clipmaps figures OUTPUT_URI``: one picture per method (the README's)."""
    p = sub.add_parser("figures", help="one picture per method from a job over generated scenes (README)")
    p.add_argument("output", help="the job's output URI (e.g. clipmaps-demo/output)")
    p.add_argument("--out", default="figures", help="folder for the JPEGs")
    p.add_argument("--images", type=int, default=3, help="scenes per picture")
    p.set_defaults(func=Handler("clipmaps.jobs.figures:run_figures_cli"))
    return p


#: The commands in the order ``clipmaps --help`` lists them.
COMMANDS: tuple[Callable[..., argparse.ArgumentParser], ...] = (
    add_demo_parser,
    add_run_parser,
    add_manifest_parser,
    add_k8s_parser,
    add_models_parser,
    add_schema_parser,
    add_index_parser,
    add_query_parser,
    add_report_parser,
    add_export_parser,
    add_eval_parser,
    add_train_parser,
    add_figures_parser,
)
