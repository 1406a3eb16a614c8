"""A finished output refuses what would mix results: each result-affecting setting changed alone, and manifest rows
changed in a complete shard, are refused before Ray starts, naming the method and field (or the shard) and both
values; ``--dry-run`` says what the output holds; rows appended after the last complete shard resume."""

from __future__ import annotations

import json

import pytest

from clipmaps.jobs.demo import write_scenes
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.errors import OutputConflict
from tests.helpers.specs import JOB_SPEC

SCENES = 6
SHARD_ROWS = 2


def _spec(manifest, out, *overrides):
    return load_spec(
        JOB_SPEC,
        overrides=[
            f"input.manifest={manifest}",
            f"output.uri={out}",
            "output.overwrite=false",
            f"output.shard_rows={SHARD_ROWS}",
            "methods.maskclip=null",
            *[f"methods.{m}.size=64" for m in ("gem", "legrad", "maskinversion")],
            "methods.maskinversion.iterations=1",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusals")
    manifest = write_scenes(folder / "input", SCENES)
    result = run(_spec(manifest, folder / "out"))
    assert result.ok and result.processed == SCENES
    return manifest, folder / "out"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("methods.gem.original=true", "methods.gem.original: false → true"),
        ("methods.gem.heatmaps=false", "methods.gem.heatmaps: true → false"),
        ("methods.gem.depth=3", "methods.gem.depth: 7 → 3"),
        ("methods.legrad.prompts=vocabulary", 'methods.legrad.prompts: "auto" → "vocabulary"'),
        ("vocabulary.threshold=0.5", "methods.gem.threshold: unset → 0.5"),
        ("output.heatmap_encoding=float16", 'methods.gem.heatmap_encoding: "png8" → "float16"'),
        ("methods.maskinversion.lr=0.1", "methods.maskinversion.lr: 0.5 → 0.1"),
        ("model.seed=1", 'model.weights: "random:seed=0" → "random:seed=1"'),
        ("methods.maskclip={}", "methods.maskclip: added"),
    ],
)
def test_a_changed_setting_is_refused_by_name(finished, override, named):
    manifest, out = finished
    with pytest.raises(OutputConflict) as info:
        run(_spec(manifest, out, override))
    assert named in str(info.value) and "--overwrite" in str(info.value)
    assert info.value.exit_code == 2


def _rewrite(manifest, path, change):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_changed_rows_are_refused_naming_their_shard(finished, tmp_path):
    manifest, out = finished

    def prompt(rows):
        rows[3]["prompts"] = ["a purple moon"]

    def mask(rows):
        rows[4]["masks"] = rows[4]["masks"][:1]

    for change, shard in ((prompt, 1), (mask, 2)):
        edited = _rewrite(manifest, tmp_path / f"{change.__name__}.jsonl", change)
        with pytest.raises(OutputConflict, match=rf"complete shard\(s\) {shard} \(manifest rows {2 * shard}-"):
            run(_spec(edited, out))


def test_dry_run_reports_the_output_and_appended_rows_resume(finished, tmp_path):
    manifest, out = finished
    assert "output    3 of 3 shards complete" in run(_spec(manifest, out), dry_run=True).plan_text
    extra = write_scenes(tmp_path / "more", 2).read_text().replace('"scene-', '"extra-')
    appended = tmp_path / "appended.jsonl"
    appended.write_text(manifest.read_text() + extra)
    text = run(_spec(appended, out), dry_run=True).plan_text
    assert "output    3 of 4 shards complete (resumed); 1 (2 images) to do" in text


def test_an_attempt_that_finished_no_shard_is_replaced(finished, tmp_path):
    """A first attempt of another job that completed no shard (it failed on its weights, say) leaves nothing to mix
    with: the corrected job runs, and nothing of the old attempt (its vocabulary file) stays."""
    manifest, _ = finished
    out = tmp_path / "out"
    (out / "vocabulary").mkdir(parents=True)
    (out / "vocabulary" / "0000000000000000.parquet").write_bytes(b"a vocabulary of the failed attempt")
    old = {"fingerprint": {"version": 2, "model": {}, "methods": {}, "shard_rows": 1}, "attempts": []}
    (out / "_job.json").write_text(json.dumps(old))
    result = run(_spec(manifest, out, "input.limit=2"))
    assert result.ok and result.processed == 2
    assert not (out / "vocabulary" / "0000000000000000.parquet").exists()
    assert json.loads((out / "_job.json").read_text())["fingerprint"]["version"] == 2
