"""The result fingerprint: every result-affecting field, changed alone, is named with both values; operational
settings are not fingerprinted; shard digests cover ids, URIs, masks and prompts, shard by shard."""

from __future__ import annotations

import copy

import pyarrow as pa
import pytest

from clipmaps.pipeline.fingerprint import differences, job_fingerprint, params_hashes, shard_digests
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.datasets import MANIFEST

BASE = {
    "input": {"manifest": "data/manifest.parquet"},
    "output": {"uri": "results"},
    "model": {"name": "clipmaps-tiny-vit", "seed": 0},
    "vocabulary": {"names": ["cat", "dog", "sofa"], "background": ["background"]},
    "methods": {"gem": {"size": 64}, "maskclip": {}, "legrad": {"size": 64}, "maskinversion": {"size": 64}},
}


def fingerprint(overrides=(), *, prompts: bool = True) -> dict:
    return job_fingerprint(load_spec(copy.deepcopy(BASE), overrides), manifest_has_prompts=prompts)


# every setting that can change which rows exist or what they hold, and the field the refusal names
RESULT_AFFECTING = [
    ("methods.gem.depth=5", "methods.gem.depth: 7 → 5"),
    ("methods.gem.ss_attn_iter=2", "methods.gem.ss_attn_iter: 1 → 2"),
    ("methods.gem.ss_attn_temp=2.0", "methods.gem.ss_attn_temp: unset → 2.0"),
    ("methods.gem.original=true", "methods.gem.original: false → true"),
    ("methods.gem.heatmaps=false", "methods.gem.heatmaps: true → false"),
    ("methods.gem.labels=false", "methods.gem.labels: true → false"),
    ("methods.gem.templates=raw", 'methods.gem.templates: "photo" → "raw"'),
    ("methods.legrad.prompts=vocabulary", 'methods.legrad.prompts: "auto" → "vocabulary"'),
    ("methods.legrad.layers=3", "methods.legrad.layers: 2 → 3"),
    ("methods.maskclip.ks_thresh=0.5", "methods.maskclip.ks_thresh: 0.0 → 0.5"),
    ("methods.maskclip.normalize=clip", 'methods.maskclip.normalize: "imagenet" → "clip"'),
    ("methods.maskclip.size=256", "methods.maskclip.size: 512 → 256"),
    ("methods.maskinversion.lr=0.5", "methods.maskinversion.lr: 0.1 → 0.5"),
    ("methods.maskinversion.optimizer=sgd", 'methods.maskinversion.optimizer: "adamw" → "sgd"'),
    ("output.heatmap_encoding=float16", 'methods.gem.heatmap_encoding: "png8" → "float16"'),
    ("output.heatmap_size=[32, 32]", "methods.gem.heatmap_size: unset → [32,32]"),
    ("output.write_expl_maps=true", "methods.maskinversion.write_expl_maps: false → true"),
    ("input.annotation_frame=stored", 'methods.maskinversion.annotation_frame: "auto" → "stored"'),
    ("vocabulary.names=[cat, dog]", "methods.gem.vocabulary_id:"),
    ("vocabulary.templates=raw", 'methods.gem.templates: "photo" → "raw"'),
    ("vocabulary.threshold=0.5", "methods.gem.threshold: unset → 0.5"),
    ("model.seed=1", 'model.weights: "random:seed=0" → "random:seed=1"'),
    ("model.name=clipmaps-synth-vit", 'model.name: "clipmaps-tiny-vit" → "clipmaps-synth-vit"'),
    ("output.shard_rows=10", "output.shard_rows: 64 → 10"),
    ("methods.legrad=null", "methods.legrad: removed"),
]


@pytest.mark.parametrize(("override", "named"), RESULT_AFFECTING, ids=[o for o, _ in RESULT_AFFECTING])
def test_each_result_affecting_field_is_named(override, named):
    lines = differences(fingerprint(), fingerprint([override]))
    assert any(line.startswith(named) for line in lines), lines
    assert all(line.startswith(("methods.", "model.", "output.")) for line in lines)


def test_gem_size_is_shared_so_all_square_methods_change():
    sizes = [f"methods.{m}.size=128" for m in ("gem", "legrad", "maskinversion")]
    lines = differences(fingerprint(), fingerprint(sizes))
    assert {line.split(":")[0] for line in lines} >= {"methods.gem.size", "methods.gem.preprocess.size"}


def test_a_new_implementation_version_is_refused(monkeypatch):
    import dataclasses

    from clipmaps.actors import registry

    before, old = fingerprint(), registry.REGISTRY["legrad"].version
    monkeypatch.setitem(registry.REGISTRY, "legrad", dataclasses.replace(registry.REGISTRY["legrad"], version=99))
    assert differences(before, fingerprint()) == [f"methods.legrad.implementation: {old} → 99"]


def test_prompt_source_of_auto_follows_the_manifest():
    lines = differences(fingerprint(prompts=True), fingerprint(prompts=False))
    assert 'methods.gem.prompt_source: "auto" → "vocabulary"' in lines


@pytest.mark.parametrize(
    "override",
    [
        "methods.gem.resources.batch_size=32",
        "methods.gem.resources.max_actors=8",
        "methods.maskinversion.resources.torch_threads=2",
        "methods.maskinversion.resources.memory=2GiB",
        "resources.decode_cpus=2",
        "resources.retries=0",
        "run.max_error_fraction=0.5",
        "run.progress=false",
        "output.overwrite=true",
    ],
)
def test_operational_settings_are_not_fingerprinted(override):
    assert differences(fingerprint(), fingerprint([override])) == []


def test_params_hash_per_output_and_baseline():
    fp = fingerprint(["methods.gem.original=true"])
    hashes = params_hashes(fp)
    assert set(hashes) == {"gem", "gem_original", "maskclip", "legrad", "maskinversion"}
    assert hashes["gem"] == hashes["gem_original"] and len(set(hashes.values())) == 4
    assert params_hashes(fingerprint(["methods.maskclip.pd_thresh=0.5"]))["gem"] == params_hashes(fingerprint())["gem"]


def test_shard_digests_cover_every_row_field_shard_by_shard():
    rows = [
        {"image_id": f"i{k}", "image_uri": f"/d/{k}.png", "prompts": ["a cat"], "masks": [
            {"region_id": "r", "rle": {"size": [2, 2], "counts": "04"}, "uri": None, "polygon": None}]}
        for k in range(10)
    ]  # fmt: skip
    base = shard_digests(pa.Table.from_pylist(rows, schema=MANIFEST), 4)
    assert sorted(base) == [0, 1, 2]
    changes = (("prompts", ["a dog"]), ("image_uri", "/d/x.png"), ("masks", []), ("image_id", "z"), ("width", 640))
    for field, value in changes:
        changed = copy.deepcopy(rows)
        changed[5][field] = value
        digests = shard_digests(pa.Table.from_pylist(changed, schema=MANIFEST), 4)
        assert [s for s in base if base[s] != digests[s]] == [1], field
    appended = shard_digests(pa.Table.from_pylist(rows + rows[:3], schema=MANIFEST), 4)
    assert appended[0] == base[0] and appended[1] == base[1] and appended[2] != base[2] and 3 in appended


def test_an_output_without_complete_shards_accepts_a_changed_job():
    """Nothing finished, nothing to mix: a failed first attempt (bad weights digest, say) may be re-run with the
    fix; once a shard is complete, the same change is refused by name."""
    from types import SimpleNamespace

    from clipmaps.pipeline.resume import OutputState, conflicts

    spec = load_spec(copy.deepcopy(BASE))
    plan = SimpleNamespace(spec=spec, fingerprint=fingerprint(["model.seed=1"]))
    assert conflicts(OutputState(job={"fingerprint": fingerprint()}, complete={}), plan) == []
    done = OutputState(job={"fingerprint": fingerprint()}, complete={0: {"digest": "d0"}})
    assert conflicts(done, plan) == ['model.weights: "random:seed=0" → "random:seed=1"']
    plan.fingerprint = fingerprint()
    assert conflicts(done, plan) == []  # changed rows of complete shards: tests/unit/test_shards.py


def test_a_changed_vocabulary_is_named_by_its_names():
    lines = differences(fingerprint(), fingerprint(["vocabulary.names=[cat, dog, chair]"]))
    assert 'methods.gem.vocabulary.names: ["cat","dog","sofa"] → ["cat","dog","chair"]' in lines


def test_where_tar_samples_prompts_and_masks_come_from_is_named_with_both_values():
    """``input.webdataset`` changes the prompts heatmaps use and the masks MaskInversion reads: a re-run with another
    source is refused naming the field and both values (the default filled in where the fingerprint leaves it out)."""
    from types import SimpleNamespace

    from clipmaps.pipeline.resume import OutputState, conflicts

    lines = differences(fingerprint(), fingerprint(["input.webdataset.prompts=caption"]))
    assert lines == [
        'methods.gem.input.webdataset.prompts: "json:prompts" → "caption"',
        'methods.legrad.input.webdataset.prompts: "json:prompts" → "caption"',
    ]  # the methods whose heatmaps read the input's prompts (prompts: auto with prompts present)
    lines = differences(fingerprint(["input.webdataset.prompts=json:tags"]), fingerprint(["input.webdataset={}"]))
    assert 'methods.legrad.input.webdataset.prompts: "json:tags" → "json:prompts"' in lines
    lines = differences(fingerprint(), fingerprint(["input.webdataset.masks=segments"]))
    assert lines == ['methods.maskinversion.input.webdataset.masks: "masks" → "segments"']
    assert differences(fingerprint(["methods.legrad.prompts=vocabulary", "methods.gem.prompts=vocabulary"]),
                       fingerprint(["methods.legrad.prompts=vocabulary", "methods.gem.prompts=vocabulary",
                                    "input.webdataset.prompts=caption"])) == []  # fmt: skip
    done = OutputState(job={"fingerprint": fingerprint()}, complete={0: {"digest": "d0"}})
    plan = SimpleNamespace(spec=None, fingerprint=fingerprint(["input.webdataset.prompts=caption"]))
    assert 'methods.legrad.input.webdataset.prompts: "json:prompts" → "caption"' in conflicts(done, plan)


def test_the_default_webdataset_section_hashes_as_before_it_existed():
    """Outputs written before ``input.webdataset`` existed stay resumable: the defaults, given or not, leave the
    fingerprint and every ``params_hash`` as they were."""
    before = fingerprint()
    for given in (["input.webdataset={}"], ["input.webdataset.prompts=json:prompts", "input.webdataset.masks=masks"]):
        assert fingerprint(given) == before
        assert params_hashes(fingerprint(given)) == params_hashes(before)
    assert "input" not in before["methods"]["legrad"]
    changed = params_hashes(fingerprint(["input.webdataset.prompts=caption"]))
    assert (
        changed["legrad"] != params_hashes(before)["legrad"]
        and changed["maskclip"] == params_hashes(before)["maskclip"]
    )
