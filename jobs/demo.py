"""``clipmaps demo``: the whole pipeline on generated sample scenes, on the embedded default.

Local Ray started in-process, local files, a small seeded model built at run time (or a real open_clip model),
all four methods; the job spec is ``jobs/examples/demo.yaml`` with the paths and model filled in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .scenes import make_scene

logger = logging.getLogger(__name__)

DEMO_SPEC = Path(__file__).parent / "examples" / "demo.yaml"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: where, how many scenes, which model."""

    folder: Path
    scenes: int = 6
    model: str = "clipmaps-tiny-vit"
    pretrained: str | None = None
    weights: str | None = None
    size: int | None = None

    @property
    def random_weights(self) -> bool:
        return self.pretrained is None and self.weights is None


def write_scenes(folder: Path, count: int) -> Path:
    """Generate ``count`` scenes as JPEGs with per-object masks (COCO RLE) and captions; return the manifest path."""
    from clipmaps.schemas.encodings import rle_encode

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with open(manifest, "w") as f:
        for i in range(count):
            scene = make_scene(i)
            path = images / f"scene-{i:03d}.jpg"
            scene.image.save(path, quality=92)
            masks = [{"region_id": name.replace(" ", "-"), "rle": rle_encode(m)}
                     for name, m in zip(scene.names, scene.masks)]
            f.write(json.dumps({"image_id": f"scene-{i:03d}", "image_uri": str(path.resolve()), "masks": masks,
                                "prompts": scene.names}) + "\n")
    return manifest


def demo_overrides(cfg: DemoConfig, manifest: Path) -> list[str]:
    """``--set`` overrides that point the packaged demo spec at ``cfg``."""
    out = cfg.folder / "output"
    sets = [f"input.manifest={manifest.resolve()}", f"output.uri={out.resolve()}", f"model.name={cfg.model}"]
    if not cfg.random_weights:
        sets.append("model.seed=null")
        sets.append(f"model.pretrained={cfg.pretrained}" if cfg.pretrained else f"model.weights={cfg.weights}")
    if cfg.size:
        sets += [f"methods.{m}.size={cfg.size}" for m in ("gem", "legrad", "maskinversion", "maskclip")]
    return sets


def run_demo(cfg: DemoConfig, progress=None):
    """Write the scenes, run the packaged demo spec on them; return ``(spec, RunResult)``."""
    from clipmaps.pipeline.run import run
    from clipmaps.pipeline.spec import load_spec

    manifest = write_scenes(cfg.folder / "input", cfg.scenes)
    spec = load_spec(DEMO_SPEC, overrides=demo_overrides(cfg, manifest))
    return spec, run(spec, progress=progress)


HOW_TO_READ = """\
Read the outputs with any Parquet reader, e.g.
  python -c "import pandas as pd; print(pd.read_parquet('{out}/regions').head())"
  duckdb -c "SELECT method, count(*) FROM '{out}/heatmaps/*.parquet' GROUP BY method"
Label maps and heatmaps are PNG bytes (label 0 = background; classes in vocabulary/):
  from clipmaps.schemas.encodings import decode_label_map, decode_heatmap"""
