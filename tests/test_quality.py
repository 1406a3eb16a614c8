"""Quality pinned in CI: the shipped tiny CLIP, through the real pipeline, localises what it is asked for.

Generated scenes → manifest → local Ray → the four method pools → Parquet → ``clipmaps eval`` against the scenes'
exact ground truth. Each method must beat its baselines by a margin the shipped model clears with room to spare, so
a method or pipeline change that breaks localisation (a transposed label map, a shifted heatmap, regions paired with
the wrong mask) fails here. The margins and the measured figures are in the README's evaluation section.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipmaps.jobs.demo import DEMO_SPEC
from clipmaps.jobs.evaluate import Truth, evaluate
from clipmaps.jobs.scene_set import write_scene_set
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import load_spec

SCENES = 24
FIRST = 900  # scenes the demo (0…) does not show; training draws from another stream altogether

# score ≥ best baseline + margin (about half of what the shipped model achieves over its best baseline)
MARGINS = {
    ("segmentation", "gem"): 0.05,
    ("segmentation", "maskclip"): 0.05,
    ("pointing", "gem"): 0.25,
    ("pointing", "legrad"): 0.25,
    ("region top-1", "maskinversion"): 0.10,
}


@pytest.fixture(scope="module")
def scored(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality")
    manifest = write_scene_set(str(folder / "input" / "manifest.jsonl"), SCENES, first=FIRST)
    spec = load_spec(DEMO_SPEC, overrides=[f"input.manifest={manifest}", f"output.uri={folder / 'out'}"])
    result = run(spec)
    assert result.ok and result.errors == 0
    rows = evaluate(str(folder / "out"))
    return {(r.task, r.method): r for r in rows}, folder


def _best_baseline(rows: dict, task: str) -> float:
    return max(r.value for (t, _), r in rows.items() if t == task and r.baseline)


@pytest.mark.parametrize("task, method", list(MARGINS))
def test_each_method_beats_its_baselines(scored, task, method):
    rows, _ = scored
    row = rows[(task, method)]
    best = _best_baseline(rows, task)
    assert row.count >= SCENES
    assert row.value >= best + MARGINS[(task, method)], f"{method} {task} {row.value:.3f} vs best baseline {best:.3f}"


def test_gem_beats_the_raw_patch_text_similarity_it_modifies(scored):
    rows, _ = scored
    assert rows[("segmentation", "gem")].extra["fg_iou"] > rows[("segmentation", "gem_original")].extra["fg_iou"]


def test_a_mirrored_ground_truth_is_caught(scored, tmp_path):
    """The evaluation itself can tell aligned outputs from misaligned ones: mirror the truth and scores collapse."""
    import pyarrow.parquet as pq

    from clipmaps.jobs.evaluate import read_truth, truth_table

    rows, folder = scored
    import fsspec

    truths = read_truth(fsspec.filesystem("file"), str(folder / "input" / "truth.parquet"))
    mirrored = {k: Truth(np.ascontiguousarray(t.instances[:, ::-1]), t.names, t.region_ids) for k, t in truths.items()}
    path = tmp_path / "mirrored.parquet"
    pq.write_table(truth_table(mirrored), path)
    flipped = {(r.task, r.method): r for r in evaluate(str(folder / "out"), truth_uri=str(path))}
    for key in [("pointing", "gem"), ("pointing", "legrad"), ("segmentation", "gem")]:
        assert flipped[key].value < rows[key].value - MARGINS.get(key, 0.05), key
