"""``clipmaps demo``: the whole pipeline on generated sample scenes, on the embedded default.

Local Ray started in-process, local files, all four methods on generated scenes with the tiny CLIP trained on such
scenes and shipped in the package (``clipmaps-synth-vit``, tag ``synth-shapes-v1``; see ``clipmaps train``), or a
real open_clip model. The job spec is ``jobs/examples/demo.yaml`` with the paths and model filled in; the scenes
come with ground truth, so ``clipmaps eval`` scores the result.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from .synth.scene_set import write_scene_set

logger = logging.getLogger(__name__)

DEMO_SPEC = Path(__file__).parent / "examples" / "demo.yaml"
DEMO_MODEL, DEMO_TAG = "clipmaps-synth-vit", "synth-shapes-v1"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: where, how many scenes, which model."""

    folder: Path
    scenes: int = 8
    model: str = DEMO_MODEL
    pretrained: str | None = DEMO_TAG
    weights: str | None = None
    seed: int | None = None
    size: int | None = None

    def __post_init__(self):
        if sum(v is not None for v in (self.pretrained, self.weights, self.seed)) != 1:
            raise ValueError("the demo needs exactly one of pretrained, weights or seed")

    @property
    def random_weights(self) -> bool:
        return self.seed is not None


def write_scenes(folder: Path, count: int) -> Path:
    """Generate ``count`` scenes with masks, prompts and ground truth (``jobs.synth.scene_set``); returns the
    manifest."""
    manifest = folder / "manifest.jsonl"
    write_scene_set(str(manifest.resolve()), count)
    return manifest


def demo_overrides(cfg: DemoConfig, manifest: Path) -> list[str]:
    """``--set`` overrides that point the packaged demo spec at ``cfg``."""
    out = cfg.folder / "output"
    sets = [f"input.uri={manifest.resolve()}", f"output.uri={out.resolve()}", f"model.name={cfg.model}"]
    if (cfg.pretrained, cfg.weights, cfg.seed) != (DEMO_TAG, None, None):
        sets += ["model.pretrained=null", "model.weights=null", "model.seed=null"]
        sets.append(
            f"model.pretrained={cfg.pretrained}"
            if cfg.pretrained
            else f"model.weights={cfg.weights}"
            if cfg.weights
            else f"model.seed={cfg.seed}"
        )
    size = cfg.size or (None if cfg.model == DEMO_MODEL else 224)  # the spec's sizes suit the 64 px tiny model
    if size:
        sets += [f"methods.{m}.size={size}" for m in ("gem", "legrad", "maskinversion", "maskclip")]
    return sets


def run_demo(cfg: DemoConfig, progress=None, progress_bars: bool | None = None):
    """Write the scenes, run the packaged demo spec on them; return ``(spec, RunResult)`` (``progress`` and
    ``progress_bars`` as :func:`clipmaps.pipeline.run.run`'s)."""
    from clipmaps.pipeline.run import run
    from clipmaps.pipeline.spec import load_spec

    manifest = write_scenes(cfg.folder / "input", cfg.scenes)
    spec = load_spec(DEMO_SPEC, overrides=demo_overrides(cfg, manifest))
    return spec, run(spec, progress=progress, progress_bars=progress_bars)


HOW_TO_READ = """\
Read the outputs with any Parquet reader, e.g.
  python -c "import pandas as pd; print(pd.read_parquet('{out}/regions').head())"
  duckdb -c "SELECT method, count(*) FROM '{out}/heatmaps/*.parquet' GROUP BY method"
Label maps and heatmaps are PNG bytes (label 0 = background; classes in vocabulary/):
  from clipmaps.schemas.encodings import decode_label_map, decode_heatmap"""


def run_demo_cli(args: argparse.Namespace) -> int:
    """``clipmaps demo`` (arguments: :func:`clipmaps.jobs.commands.add_demo_parser`); returns the exit code: 0, 2 for
    a model without weights, 3 when the error fraction is above the spec's limit."""
    from .cli import summary_table

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
    if args.quiet:  # errors only, as `clipmaps run -q`: the exit code says how it went
        _, result = run_demo(cfg, progress=lambda line: None, progress_bars=False)
        if not result.ok:
            print(f"clipmaps demo: error fraction {result.error_fraction:.2%} is above the limit", file=sys.stderr)
        return 0 if result.ok else 3
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
