"""The ``clipmaps`` command line: the entry point, the parser and the handlers of ``run``, ``schema`` and ``models``.

Each command's arguments are declared in :mod:`.commands`, which imports no library; a command's handler (there or
here) imports what it runs, so ``clipmaps --help`` and ``clipmaps k8s render`` start without torch or Ray.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .commands import COMMANDS


def printer(args: argparse.Namespace):
    """``print`` for a command's progress and summary lines, or a function that prints nothing under ``-q/--quiet``
    (errors only; errors go to stderr either way)."""
    return (lambda line: None) if getattr(args, "quiet", False) else print


def _run(args: argparse.Namespace) -> int:
    """``clipmaps run``: exit 0 done, 2 the job cannot run as configured (spec, manifest, weights, a refused
    output: nothing to resume), 3 too many images with errors, 4 a stage failed for good (re-run to resume)."""
    from clipmaps.pipeline.run import run
    from clipmaps.pipeline.spec import load_spec
    from clipmaps.schemas.errors import ClipmapsError

    overrides = [*(args.set or ()), *(["output.overwrite=true"] if args.overwrite else [])]
    try:
        spec = load_spec(args.spec, overrides=overrides)
        quiet = bool(args.quiet)
        result = run(
            spec,
            dry_run=args.dry_run,
            progress=(lambda line: None) if quiet else print,
            progress_bars=False if quiet else None,
        )
    except ClipmapsError as e:  # the family maps to its documented exit code (schemas/errors.py)
        print(f"clipmaps run: {e}", file=sys.stderr)
        return e.exit_code
    if args.quiet:  # errors only: the exit code says how it went
        if not result.ok:
            print(
                f"clipmaps run: error fraction {result.error_fraction:.2%} is above run.max_error_fraction",
                file=sys.stderr,
            )
        return 0 if result.ok or args.dry_run else 3
    if args.dry_run:
        print(result.plan_text)
        print("dry run: the spec is valid, the inputs resolve and the output accepts this job; no model was run")
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


def _schema(args: argparse.Namespace) -> int:
    """``clipmaps schema``: the job spec's JSON Schema, for editors (yaml-language-server)."""
    import json

    from clipmaps.pipeline.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def summary_table(result) -> str:
    """The end-of-run table of a ``RunResult`` (``clipmaps run`` and ``demo``): images, outputs, errors, time.

    Images this attempt processed are shown apart from the shards and images kept from earlier attempts, and
    images/s counts only this attempt's images over its execution time (a resumed run that redid one shard of ten
    would otherwise report ten shards' worth of speed). The output counts (label maps, heatmaps, regions, error
    rows) are the whole output's. A note line says how many manifest prompts were collapsed as duplicates, when
    any were."""
    rate = getattr(result, "images_per_second", None)
    attempt_images = getattr(result, "attempt_images", result.processed)
    rows = [
        ("images in manifest", result.total),
        ("images processed", result.processed),
        ("  by this run", attempt_images),
        ("  kept", f"{getattr(result, 'kept_images', 0)} ({getattr(result, 'kept_shards', 0)} shards of earlier runs)"),
        ("images with errors", result.errors),
        ("label maps", result.counts.get("labels", 0)),
        ("heatmaps", result.counts.get("heatmaps", 0)),
        ("regions", result.counts.get("regions", 0)),
        ("error rows", result.counts.get("errors", 0)),
        ("seconds", f"{result.seconds:.1f}"),
        ("images/s", f"{rate:.2f} (this run)" if rate else "-"),
        ("output", result.output_uri),
    ]
    collapsed = result.counts.get("prompts_collapsed", 0)
    if collapsed:  # only when it happened: most runs have no repeated prompts, and the table stays short
        rows.append(
            ("note", f"{collapsed} duplicate prompt(s) collapsed (the same tokens as an earlier prompt of the image)")
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _models(args: argparse.Namespace) -> int:
    """``clipmaps models``: each architecture, its backbone family, the methods that run on it (from the method
    registry, read from the model's config) and its pretrained tags."""
    from clipmaps.actors.registry import BUNDLED_WEIGHTS, FAMILIES, list_model_names, model_info, supported_methods

    names = [n for n in list_model_names() if not args.filter or args.filter.lower() in n.lower()]
    if not names:
        print(f"clipmaps models: no architecture name contains {args.filter!r}", file=sys.stderr)
        return 2
    tags: dict[str, list[str]] = {}
    for name, tag in BUNDLED_WEIGHTS:
        tags.setdefault(name, []).append(tag)
    if names and not args.no_tags:  # open_clip's tag registry needs open_clip (and torch): only when asked
        import open_clip

        for name, tag in open_clip.list_pretrained():
            tags.setdefault(name, []).append(tag)
    print(f"{'model':40s} {'family':7s} {'methods':34s} pretrained")
    for name in names:
        info = model_info(name)
        methods = ",".join(supported_methods(info)) or "-"
        print(f"{name:40s} {info.family:7s} {methods:34s} {','.join(tags.get(name, [])) or '-'}")
    if names:
        print("\nfamilies: " + "; ".join(f"{k}: {v}" for k, v in FAMILIES.items()))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipmaps")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _logging_flags(parser: argparse.ArgumentParser, default) -> None:
    """``-v``/``-q`` on ``parser``. Subcommands get them with ``SUPPRESS`` defaults, so ``clipmaps run -v`` and
    ``clipmaps -v run`` mean the same and a subcommand's absent flag never resets the top level's."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="errors only: no plan, progress or summary"
    )


def _add_flags_to_subcommands(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:  # argparse keeps subparsers only there
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _logging_flags(sub, argparse.SUPPRESS)
                _add_flags_to_subcommands(sub)


def build_parser() -> argparse.ArgumentParser:
    """The ``clipmaps`` parser with every command (imports no command's library); ``args.func(args)`` runs one."""
    parser = argparse.ArgumentParser(prog="clipmaps", description="Dense open-vocabulary annotations with CLIP.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _logging_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    _add_flags_to_subcommands(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``clipmaps`` with ``argv`` (default: the process's arguments); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:  # one given before the subcommand, the other after it
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `clipmaps models | head` ends quietly, as Unix tools do
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from clipmaps.schemas.storage import RedactingFilter

    for handler in logging.getLogger().handlers:  # one redaction rule wherever text leaves the process
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
