"""The ``clipmaps`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_MODEL, DEMO_TAG, HOW_TO_READ, DemoConfig, run_demo

    custom = args.weights is not None or args.seed is not None
    if args.model != DEMO_MODEL and not custom and args.pretrained is None:
        print(
            f"clipmaps demo: --model {args.model} needs its weights: --pretrained TAG, --weights URI or --seed N",
            file=sys.stderr,
        )
        return 2
    cfg = DemoConfig(
        folder=Path(args.output),
        scenes=args.scenes,
        model=args.model,
        pretrained=args.pretrained or (None if custom else DEMO_TAG),
        weights=args.weights,
        seed=args.seed,
        size=args.size,
    )
    spec, result = run_demo(cfg, progress=print)
    out = Path(spec.output.uri)
    print(summary_table(result))
    print(f"\noutputs under {out}:")
    for name in ("labels", "heatmaps", "regions", "errors", "vocabulary", "_job.json"):
        print(f"  {out / name}")
    print(HOW_TO_READ.format(out=out))
    if cfg.random_weights:
        print(
            "\nNOTE: the model has random weights, so these maps are meaningless noise; they only show that the\n"
            "      pipeline runs end to end."
        )
    elif cfg.pretrained == DEMO_TAG:
        from .evaluate import evaluate, format_table

        print(
            "\nThe model is clipmaps' tiny CLIP trained on scenes like these (not a real CLIP: it knows 18\n"
            "coloured shapes and nothing else). How well each method localises them, against baselines\n"
            f"(clipmaps eval {out}; more scenes: clipmaps demo --scenes 100):\n"
        )
        print(format_table(evaluate(str(out))))
        print(
            f"Pictures: clipmaps figures {out} --out figures; HTML: clipmaps report {out}\n"
            "With a real CLIP: clipmaps demo --model ViT-B-16 --pretrained openai (needs hub access) or\n"
            "  --weights s3://bucket/ViT-B-16.safetensors (or a local file)."
        )
    return 0 if result.ok else 3


def _run(args: argparse.Namespace) -> int:
    from clipmaps.pipeline.run import run
    from clipmaps.pipeline.spec import SpecError, load_spec

    overrides = [*(args.set or ()), *(["output.overwrite=true"] if args.overwrite else [])]
    try:
        spec = load_spec(args.spec, overrides=overrides)
    except (SpecError, OSError) as e:
        print(f"clipmaps run: invalid job spec: {e}", file=sys.stderr)
        return 2
    from clipmaps.pipeline.run import JobFailed

    try:
        result = run(spec, dry_run=args.dry_run, progress=print)
    except JobFailed as e:  # what is complete is kept: re-running the same command resumes
        print(f"clipmaps run: {e}", file=sys.stderr)
        return 4
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"clipmaps run: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(result.plan_text)
        print("dry run: the spec is valid and the inputs resolve; no model was run")
        return 0
    print(summary_table(result))
    if not result.ok:
        print(
            f"error fraction {result.error_fraction:.2%} is above run.max_error_fraction "
            f"{spec.run.max_error_fraction:.2%}",
            file=sys.stderr,
        )
        return 3
    return 0


def summary_table(result) -> str:
    """The end-of-run table: images, outputs, errors, time."""
    rows = [
        ("images in manifest", result.total),
        ("images processed", result.processed),
        ("images with errors", result.errors),
        ("label maps", result.counts.get("labels", 0)),
        ("heatmaps", result.counts.get("heatmaps", 0)),
        ("regions", result.counts.get("regions", 0)),
        ("error rows", result.counts.get("errors", 0)),
        ("seconds", f"{result.seconds:.1f}"),
        ("images/s", f"{result.processed / result.seconds:.2f}" if result.seconds else "-"),
        ("output", result.output_uri),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _models(args: argparse.Namespace) -> int:
    from clipmaps.actors.models import list_models, list_pretrained

    tags: dict[str, list[str]] = {}
    for name, tag in list_pretrained():
        tags.setdefault(name, []).append(tag)
    for name in list_models():
        if args.filter and args.filter.lower() not in name.lower():
            continue
        methods = "maskclip" if name.startswith("RN") or "-rn" in name else "gem,legrad,maskinversion,maskclip"
        print(f"{name:40s} {methods:34s} {','.join(tags.get(name, [])) or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipmaps", description="Dense open-vocabulary annotations with CLIP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole pipeline (local Ray, all four methods) on sample scenes")
    demo.add_argument("--output", default="clipmaps-demo", help="folder for the generated inputs and the outputs")
    demo.add_argument("--model", default="clipmaps-synth-vit", help="open_clip model name")
    demo.add_argument(
        "--pretrained",
        default=None,
        help="pretrained tag: synth-shapes-v1 (the default, shipped) or an open_clip tag (needs hub access)",
    )
    demo.add_argument("--seed", type=int, default=None, help="random weights from this seed instead (noise maps)")
    demo.add_argument("--weights", default=None, help="weights file or URI (safetensors or a torch state dict)")
    demo.add_argument("--size", type=int, default=None, help="input size in pixels (default: the demo spec's)")
    demo.add_argument("--scenes", type=int, default=8, help="number of sample scenes")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="run a job spec (YAML) on Ray")
    run.add_argument("spec", help="job spec YAML file")
    run.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="validate, resolve inputs and print the plan only")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what output.uri holds (same as --set output.overwrite=true); without it a re-run "
        "resumes, and a changed spec is refused",
    )
    run.set_defaults(func=_run)
    from .manifest import add_manifest_parser

    add_manifest_parser(sub)
    from .k8s import add_k8s_parser

    add_k8s_parser(sub)
    models = sub.add_parser("models", help="list model architectures, the methods they support and pretrained tags")
    models.add_argument("filter", nargs="?", default=None, help="substring of the name")
    models.set_defaults(func=_models)
    from .index import add_index_parser
    from .query import add_query_parser
    from .report import add_report_parser

    add_index_parser(sub)
    add_query_parser(sub)
    add_report_parser(sub)
    from .evaluate import add_eval_parser, run_eval_cli
    from .figures import add_figures_parser
    from .train import add_train_parser

    add_eval_parser(sub).set_defaults(func=run_eval_cli)
    add_train_parser(sub)
    add_figures_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
