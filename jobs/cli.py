"""The ``clipmaps`` command line: the entry point, the parser and the handlers of ``run`` and ``models``.

Each command's arguments are declared in :mod:`.commands`, which imports no library; a command's handler (there or
here) imports what it runs, so ``clipmaps --help`` and ``clipmaps k8s render`` start without torch or Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import COMMANDS


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
    """The end-of-run table of a ``RunResult`` (``clipmaps run`` and ``demo``): images, outputs, errors, time."""
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
    """The ``clipmaps`` parser with every command (imports no command's library); ``args.func(args)`` runs one."""
    parser = argparse.ArgumentParser(prog="clipmaps", description="Dense open-vocabulary annotations with CLIP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``clipmaps`` with ``argv`` (default: the process's arguments); returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
