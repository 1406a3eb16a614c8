"""The job spec: loading, validation errors that name their field (all at once), --set overrides, redaction,
model-aware bounds from the registry, the JSON Schema, presets."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipmaps.actors.params import GEMParams, GEMSettings, LeGradParams, ModelSpec
from clipmaps.pipeline.fingerprint import params_hash
from clipmaps.pipeline.spec import (
    InputSpec,
    JobSpec,
    MethodsSpec,
    OutputSpec,
    PoolSpec,
    SpecError,
    VocabularySpec,
    apply_overrides,
    json_schema,
    load_spec,
)
from clipmaps.pipeline.vocabularies import PRESETS, parse_vocabulary_file, vocabulary_id
from clipmaps.schemas.storage import uri_scheme

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"

BASE = {
    "input": {"manifest": "data/manifest.parquet"},
    "output": {"uri": "results"},
    "model": {"name": "ViT-B-16", "pretrained": "openai"},
    "vocabulary": {"names": ["cat", "dog", "sofa"], "background": ["background"]},
    "methods": {"gem": {}, "maskclip": {}},
}


def spec_with(change=None, overrides=()) -> JobSpec:
    raw = copy.deepcopy(BASE)
    if change is not None:
        change(raw)
    return load_spec(raw, overrides)


def error_of(change=None, overrides=()) -> SpecError:
    with pytest.raises(SpecError) as info:
        spec_with(change, overrides)
    return info.value


# ------------------------------------------------------------------------------------------------ valid specs


def test_defaults_follow_the_methods_params():
    spec = spec_with(lambda d: d["methods"].update(legrad={}, maskinversion={}))
    gem, legrad, mi, mc = (spec.methods.gem, spec.methods.legrad, spec.methods.maskinversion, spec.methods.maskclip)
    assert (gem.depth, gem.ss_attn_iter, gem.ss_attn_temp, gem.size) == (7, 1, None, 448)
    assert (legrad.layers, legrad.size) == (2, 448)
    mi_values = (mi.iterations, mi.lr, mi.alpha, mi.wd, mi.optimizer, mi.layers, mi.size)
    assert mi_values == (10, 0.1, 0.0, 0.0, "adamw", 1, 448)
    assert (mc.templates, mc.ks_thresh, mc.pd_thresh, mc.size) == ("ensemble85", 0.0, 0.0, 512)
    assert spec.methods.gem.resources == PoolSpec(batch_size=8, num_gpus=0, num_cpus=0.25, min_actors=1, max_actors=1)
    assert spec.enabled_methods() == ["maskclip", "gem", "legrad", "maskinversion"]
    assert spec.resources.max_pixels == 89_478_485 and spec.run.ray_address is None
    # what the method modules get: their params, templates resolved (GEM's null → the vocabulary's)
    assert spec.method_params("gem") == GEMParams(depth=7, ss_attn_iter=1, ss_attn_temp=None, templates="photo")
    assert spec.method_params("legrad") == LeGradParams(layers=2, templates="raw")
    assert spec.method_params("maskclip").templates == "ensemble85"
    assert spec.requires_masks and not spec.methods.maskinversion.labels


def test_round_trip_through_dict_and_yaml(tmp_path):
    spec = spec_with(
        lambda d: d["methods"].update(
            legrad={"layers": 3, "templates": ["a photo of a {}.", "a {}"], "prompts": "manifest"},
            maskinversion={"lr": 0.5, "resources": {"batch_size": 2, "max_actors": 3}},
        )
    )
    assert load_spec(spec.to_dict(redact=False)) == spec
    path = tmp_path / "job.yaml"
    path.write_text(spec.to_yaml(redact=False))
    again = load_spec(path)
    assert again == spec
    assert again.methods.legrad.templates == ("a photo of a {}.", "a {}")  # lists become tuples
    assert again.to_dict(redact=False) == spec.to_dict(redact=False)
    assert "legrad" in again.to_dict()["methods"] and "gem" in again.to_dict()["methods"]


def test_python_api_validates_too():
    spec = JobSpec(
        input=InputSpec(manifest="m.jsonl"),
        output=OutputSpec(uri="out"),
        model=ModelSpec(name="clipmaps-tiny-vit", seed=0),
        methods=MethodsSpec(maskinversion={"size": 64}),  # mappings are accepted and built
    )
    assert spec.methods.maskinversion.size == 64 and spec.input.manifest_format == "jsonl"
    with pytest.raises(ValueError, match=r"min_actors 2 is more than max_actors 1"):
        PoolSpec(min_actors=2)
    with pytest.raises(ValueError, match=r"depth\n  Input should be a valid integer"):
        GEMSettings(depth="7")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_load(path):
    spec = load_spec(path)
    assert spec.enabled_methods()
    for m in spec.enabled_methods():
        assert len(params_hash(spec, m, manifest_has_prompts=True)) == 16


def test_examples_cover_what_they_promise():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"demo.yaml", "coco-gem-maskclip.yaml", "regions-maskinversion.yaml"} <= names
    demo = load_spec(EXAMPLES / "demo.yaml")
    assert demo.enabled_methods() == ["maskclip", "gem", "legrad", "maskinversion"]
    assert (demo.model.name, demo.model.pretrained) == ("clipmaps-synth-vit", "synth-shapes-v1")
    assert {demo.method(m).size for m in demo.enabled_methods()} == {96}
    coco = load_spec(EXAMPLES / "coco-gem-maskclip.yaml")
    assert coco.vocabulary.preset == "coco80" and coco.methods.gem.resources.num_gpus == 1
    assert uri_scheme(coco.input.uri) == "s3" and uri_scheme(coco.output.uri) == "s3"
    assert load_spec(EXAMPLES / "regions-maskinversion.yaml").enabled_methods() == ["maskinversion"]


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # unknown key, with a suggestion
        (lambda d: d["methods"]["gem"].update(dept=5), "methods.gem.dept: unknown key (did you mean 'depth'?)"),
        (lambda d: d.update(ouptut={}), "ouptut: unknown key (did you mean 'output'?)"),
        (lambda d: d["input"].update(zzz=1), "input.zzz: unknown key (expected one of: uri, manifest,"),
        # wrong type
        (
            lambda d: d["methods"]["gem"].update(depth="five"),
            "methods.gem.depth: Input should be a valid integer, got 'five'",
        ),
        (
            lambda d: d["methods"]["gem"].update(depth=5.5),
            "methods.gem.depth: Input should be a valid integer, got 5.5",
        ),
        (
            lambda d: d["output"].update(overwrite="yes please"),
            "output.overwrite: Input should be a valid boolean, got 'yes please'",
        ),
        (
            lambda d: d["vocabulary"].update(names=["cat", 7]),
            "vocabulary.names[1]: Input should be a valid string, got 7 (quote it in YAML",
        ),
        (
            lambda d: d["methods"].update(gem=3),
            "methods.gem: Input should be a valid dictionary or instance of GEMSettings, got 3",
        ),
        (lambda d: d["output"].update(heatmap_size=[64]), "output.heatmap_size[1]: required but missing"),
        (
            lambda d: d["output"].update(heatmap_encoding="png"),
            "output.heatmap_encoding: Input should be 'png8' or 'float16', got 'png' (did you mean 'png8'?)",
        ),
        # missing required
        (lambda d: d.pop("output"), "output: required but missing"),
        (lambda d: d["input"].pop("manifest"), "input.uri: required but missing"),
        # weight sources
        (lambda d: d["model"].update(seed=0), "model: give exactly one of pretrained"),
        (lambda d: d["model"].pop("pretrained"), "model: give exactly one of pretrained"),
        # methods
        (lambda d: d.update(methods={}), "methods: at least one method is required"),
        (lambda d: d["methods"].update(gem=None), "methods.gem: is empty (null): write 'gem: {}'"),
        (
            lambda d: d["methods"]["gem"].update(labels=False, heatmaps=False),
            "methods.gem: labels and heatmaps are both false",
        ),
        # ViT-only methods on a ResNet
        (lambda d: d["model"].update(name="RN50"), "methods.gem: GEM cannot run on RN50 (CLIP ModifiedResNet"),
        (
            lambda d: d["model"].update(name="clipmaps-tiny-rn") or d.update(methods={"legrad": {}}),
            "methods.legrad: LeGrad cannot run on clipmaps-tiny-rn",
        ),
        # vocabulary
        (
            lambda d: d.pop("vocabulary"),
            "2 problems in the job spec:\n  vocabulary: required by methods.maskclip.labels",
        ),
        (lambda d: d["vocabulary"].update(names=[]), "vocabulary.names: must not be empty"),
        (lambda d: d["vocabulary"].update(names=["cat", "dog", "cat"]), "vocabulary.names[2]: duplicate name 'cat'"),
        (lambda d: d["vocabulary"].update(names=["cat", " "]), "vocabulary.names[1]: must be a non-empty string"),
        (lambda d: d["vocabulary"].update(background=["dog"]), "vocabulary.background: 'dog' is both a class name"),
        (lambda d: d["vocabulary"].update(preset="voc20"), "vocabulary: give exactly one of names, preset or file"),
        (lambda d: d.update(vocabulary={"preset": "ade"}), "vocabulary.preset: unknown preset 'ade' (did you mean"),
        # thresholds
        (lambda d: d["vocabulary"].update(threshold=1.0), "vocabulary.threshold: Input should be less than 1"),
        (lambda d: d["vocabulary"].update(threshold=0), "vocabulary.threshold: Input should be greater than 0"),
        (
            lambda d: d["methods"]["maskclip"].update(pd_thresh=1.5),
            "methods.maskclip.pd_thresh: Input should be less than or equal to 1, got 1.5",
        ),
        (
            lambda d: d.update(run={"max_error_fraction": -0.1}),
            "run.max_error_fraction: Input should be greater than or equal to 0",
        ),
        # templates
        (lambda d: d["vocabulary"].update(templates=["a photo of a cat"]), "vocabulary.templates[0]: template"),
        (lambda d: d["vocabulary"].update(templates=["{} and {}"]), "vocabulary.templates[0]: template '{} and {}'"),
        (lambda d: d["vocabulary"].update(templates=["a {0}"]), "vocabulary.templates[0]:"),
        (lambda d: d["methods"]["maskclip"].update(templates="ensemble80"), "methods.maskclip.templates: unknown"),
        (lambda d: d["vocabulary"].update(templates=[]), "vocabulary.templates: the template list must not be empty"),
        # pools and devices
        (
            lambda d: d["methods"]["gem"].update(resources={"min_actors": 4, "max_actors": 2}),
            "methods.gem.resources: min_actors 4 is more than max_actors 2",
        ),
        (lambda d: d["methods"]["gem"].update(resources={"batch_size": 0}), "methods.gem.resources.batch_size"),
        (
            lambda d: d["model"].update(device="cuda"),
            "2 problems in the job spec:\n  methods.maskclip.resources.num_gpus: is 0 but model.device",
        ),
        (
            lambda d: d["model"].update(precision="bf16"),
            "2 problems in the job spec:\n  methods.maskclip.resources.num_gpus: is 0 but model.precis",
        ),
        # sizes, inputs and outputs
        (
            lambda d: d["methods"]["gem"].update(size=450),
            "methods.gem.size: 450 is not a multiple of the patch size 16",
        ),
        (
            lambda d: d["methods"].update(legrad={"size": 224}),
            "methods.legrad.size: 224 differs from methods.gem.size (448)",
        ),
        (
            lambda d: d["output"].update(uri="data/manifest.parquet"),
            "output.uri: 'data/manifest.parquet' and the input manifest 'data/manifest.parquet' overlap",
        ),
        (
            lambda d: d["output"].update(uri="./data"),
            "output.uri: './data' and the input manifest 'data/manifest.parquet' overlap",
        ),
        (lambda d: d["output"].update(write_expl_maps=True), "output.write_expl_maps: only MaskInversion"),
        (lambda d: d["input"].update(manifest="coco.json"), "input.format: cannot tell the format of 'coco.json'"),
        (lambda d: d["input"].update(allowed_schemes=["S3"]), "input.allowed_schemes[0]: 'S3' is not a lower-case"),
        (lambda d: d["input"].update(limit=0), "input.limit: Input should be greater than or equal to 1, got 0"),
        (
            lambda d: d["input"].update(annotation_frame="displayed"),
            "input.annotation_frame: Input should be 'auto', 'oriented' or 'stored'",
        ),
        # bounds that depend on the model, read from its configuration without weights
        (
            lambda d: d["methods"]["gem"].update(depth=40),
            "methods.gem.depth: 40 is out of range for the 12-layer image tower of ViT-B-16: must be in [2, 13]",
        ),
        (
            lambda d: d["methods"].update(legrad={"layers": 13}),
            "methods.legrad.layers: 13 is out of range for the 12-layer image tower of ViT-B-16",
        ),
        (lambda d: d["model"].update(name="ViT-B-61"), "model.name: unknown model 'ViT-B-61' (did you mean 'ViT-B-16'"),
        (
            lambda d: d["model"].update(name="convnext_base") or d.update(methods={"maskclip": {}}),
            "methods.maskclip: MaskCLIP cannot run on convnext_base (another timm image tower",
        ),
        (
            lambda d: d["model"].update(name="ViT-B-16-SigLIP") or d.update(methods={"gem": {}}),
            "methods.gem: GEM cannot run on ViT-B-16-SigLIP (SigLIP",
        ),
        (
            lambda d: d["model"].update(name="clipmaps-tiny-vit") or d["methods"]["gem"].update(size=60),
            "methods.gem.size: 60 is not a multiple of the patch size 8 of clipmaps-tiny-vit",
        ),
    ],
)
def test_errors_name_the_field(change, message):
    err = error_of(change)
    assert str(err).startswith(message), str(err)
    assert isinstance(err, ValueError)


def test_error_path_and_reason_are_separate():
    err = error_of(lambda d: d["methods"]["gem"].update(resources={"num_cpus": "two"}))
    assert err.path == ("methods", "gem", "resources", "num_cpus")
    assert err.field == "methods.gem.resources.num_cpus"
    assert err.reason == "Input should be a valid number, unable to parse string as a number, got 'two'"


def test_every_problem_is_reported_at_once():
    def change(d):
        d["methods"]["gem"].update(dept=5, ss_attn_iter=-1)
        d["output"].update(heatmap_encoding="png")
        d["run"] = {"max_error_fraction": 2}
        d["vocabulary"].update(templates=["a cat", "{} and {}"])

    err = error_of(change)
    assert err.fields == [
        "output.heatmap_encoding",
        "vocabulary.templates[0]",
        "vocabulary.templates[1]",
        "methods.gem.ss_attn_iter",
        "methods.gem.dept",
        "run.max_error_fraction",
    ]
    assert str(err).startswith("6 problems in the job spec:\n  output.heatmap_encoding: ")
    assert err.exit_code == 2 and isinstance(err, ValueError)


def test_resnet_runs_maskclip_and_models_are_read_without_weights():
    spec = spec_with(lambda d: d["model"].update(name="RN50") or d.update(methods={"maskclip": {}}))
    assert spec.enabled_methods() == ["maskclip"] and spec.model.info.family == "resnet"
    info = ModelSpec(name="clipmaps-tiny-vit", seed=0).info  # read from actors/model_configs
    assert (info.family, info.layers, info.patch_size) == ("vit", 8, 8)
    assert ModelSpec(name="ViT-L-14-336", pretrained="openai").info.patch_size == 14
    assert ModelSpec(name="coca_ViT-B-32", pretrained="x").info.family == "coca"


def test_scientific_floats_and_yaml_files(tmp_path):
    path = tmp_path / "job.yaml"
    raw = copy.deepcopy(BASE)
    raw["methods"]["maskinversion"] = {"lr": "1e-3"}  # PyYAML reads 1e-3 as a string
    path.write_text(yaml.safe_dump(raw))
    assert load_spec(path).methods.maskinversion.lr == pytest.approx(1e-3)
    path.write_text("input: [unclosed")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(path)
    path.write_text("")
    with pytest.raises(SpecError, match="empty"):
        load_spec(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(tmp_path / "missing.yaml")
    path.write_text("!!python/object/apply:os.system ['true']\n")  # safe_load only
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(path)


def test_manifest_checks_once_columns_are_known():
    spec = spec_with(lambda d: d["methods"].update(maskinversion={}, legrad={"prompts": "manifest"}))
    spec.check_manifest(has_masks=True, has_prompts=True)
    with pytest.raises(SpecError, match=r"^methods.maskinversion: needs region masks, but no row of the manifest"):
        spec.check_manifest(has_masks=False, has_prompts=True)
    with pytest.raises(SpecError, match=r"^methods.legrad.prompts: LeGrad heatmaps need prompts"):
        spec.check_manifest(has_masks=True, has_prompts=False)
    assert spec.prompt_source("gem", manifest_has_prompts=True) == "auto"  # each row's own, else the vocabulary
    assert spec.prompt_source("gem", manifest_has_prompts=False) == "vocabulary"
    no_vocab = load_spec({**BASE, "vocabulary": None, "methods": {"legrad": {}}})
    assert no_vocab.prompt_source("legrad", manifest_has_prompts=True) == "manifest"
    with pytest.raises(SpecError) as both:
        spec.check_manifest(has_masks=False, has_prompts=False)
    assert both.value.fields == ["methods.maskinversion", "methods.legrad.prompts"]
    with pytest.raises(SpecError, match="has no 'prompts' column"):
        no_vocab.check_manifest(has_masks=False, has_prompts=False)
    with pytest.raises(SpecError, match=r"^vocabulary: required by methods.legrad.prompts"):
        load_spec({**BASE, "vocabulary": None, "methods": {"legrad": {"prompts": "vocabulary"}}})


# ------------------------------------------------------------------------------------------------ overrides


def test_overrides_nested_list_and_new_sections():
    spec = spec_with(
        overrides=[
            "methods.gem.depth=5",
            "methods.gem.resources.num_gpus=0.5",
            "vocabulary.names=[cat, dog, red car]",
            "methods.legrad.layers=3",  # creates the section: LeGrad now runs
            "input.storage_options.client_kwargs.endpoint_url=http://minio:9000",
            "output.uri=s3://bucket/out",
            "vocabulary.threshold=0.25",
            "run.progress=false",
        ]
    )
    assert spec.methods.gem.depth == 5 and spec.methods.gem.resources.num_gpus == 0.5
    assert spec.vocabulary.names == ("cat", "dog", "red car")
    assert spec.methods.legrad.layers == 3 and "legrad" in spec.enabled_methods()
    assert spec.input.storage_options == {"client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert spec.output.uri == "s3://bucket/out" and spec.vocabulary.threshold == 0.25 and spec.run.progress is False


def test_override_switches_weight_source_and_removes_methods():
    spec = spec_with(overrides=["model.pretrained=null", "model.seed=0", "methods.maskclip=null"])
    assert spec.model.seed == 0 and spec.model.pretrained is None and spec.model.weights_id == "random:seed=0"
    assert spec.enabled_methods() == ["gem"]
    with pytest.raises(SpecError, match="at least one method"):
        spec_with(overrides=["methods.gem=null", "methods.maskclip="])
    assert spec_with(overrides=["methods.legrad={}"]).methods.legrad.layers == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("methods.gem.dept=5", "methods.gem: --set 'methods.gem.dept=5': unknown key 'dept' (did you mean 'depth'?)"),
        ("modle.name=RN50", "--set 'modle.name=RN50': unknown key 'modle' (did you mean 'model'?)"),
        ("model.name.x=1", "model.name: --set 'model.name.x=1': has no keys"),
        ("methods.gem.depth", "--set 'methods.gem.depth': expected key.path=value"),
        ("methods..depth=1", "--set 'methods..depth=1': expected key.path=value"),
        ("methods.gem.depth=five", "methods.gem.depth: Input should be a valid integer, got 'five'"),
        ("methods.gem.depth=[1", "methods.gem.depth: --set 'methods.gem.depth=[1': cannot parse the value as YAML"),
    ],
)
def test_bad_overrides(override, message):
    assert str(error_of(overrides=[override])).startswith(message)


def test_apply_overrides_does_not_touch_its_input():
    raw = copy.deepcopy(BASE)
    out = apply_overrides(raw, ["methods.gem.depth=3", "methods.maskclip=null"])
    assert raw == BASE and out["methods"] == {"gem": {"depth": 3}}


# ------------------------------------------------------------------------------------------------ redaction


def test_redaction_removes_planted_secrets():
    secrets = ["AKIAPLANTED1", "s3cr3t/with+slash", "SESSIONTOKEN9", "hunter2pw", "credblob77", "urlpass88",
               "sigvalue55", "raypw66", "weightspw44"]  # fmt: skip
    raw = copy.deepcopy(BASE)
    raw["input"] = {
        # userinfo only where it can be used: http basic auth (object stores refuse it, tested below)
        "manifest": f"https://AKIAPLANTED1:{secrets[1]}@bucket/m.parquet?X-Amz-Signature=sigvalue55&versionId=3",
        "storage_options": {
            "key": "AKIAPLANTED1",
            "secret": secrets[1],
            "client_kwargs": {"endpoint_url": "http://minio:9000", "aws_session_token": "SESSIONTOKEN9"},
        },
    }
    raw["output"] = {"uri": "https://user:urlpass88@bucket/out", "storage_options": {"Password": "hunter2pw"}}
    raw["model"] = {
        "name": "ViT-B-16",
        "weights": "https://u:weightspw44@models/vit.safetensors",
        "storage_options": {"credentials": {"private": "credblob77"}},
    }
    raw["run"] = {"ray_address": "ray://admin:raypw66@head:10001"}
    spec = load_spec(raw)
    text = json.dumps(spec.to_dict()) + spec.to_yaml() + spec.model.weights_id
    for s in secrets:
        assert s not in text, s
    redacted = spec.to_dict()
    assert redacted["input"]["storage_options"]["client_kwargs"]["endpoint_url"] == "http://minio:9000"
    assert redacted["input"]["uri"] == "https://***@bucket/m.parquet?X-Amz-Signature=***&versionId=3"
    assert redacted["output"]["uri"] == "https://***@bucket/out"
    assert "AKIAPLANTED1" in json.dumps(spec.to_dict(redact=False))  # the runner still has them
    # hashes do not depend on credentials in the weights URI
    other = load_spec({**raw, "model": {**raw["model"], "weights": "https://u:rotated@models/vit.safetensors"}})
    assert params_hash(other, "gem") == params_hash(spec, "gem")


def test_errors_do_not_echo_secrets_in_uris():
    err = error_of(lambda d: d["input"].update(manifest="s3://AK:SECRETX@b/m.json"))
    assert "SECRETX" not in str(err)
    err = error_of(
        lambda d: d["output"].update(uri="https://AK:SECRETY@b/o") or d["input"].update(manifest="https://b/o/m.pq")
    )
    assert "SECRETY" not in str(err) and "overlap" in str(err)


# ------------------------------------------------------------------------------------------------ vocabularies


def test_preset_counts():
    counts = {name: len(names) for name, names in PRESETS.items()}
    assert counts == {"voc20": 20, "context59": 59, "coco80": 80, "cocostuff171": 171, "ade150": 150}
    for names in PRESETS.values():
        assert len(set(names)) == len(names)
        assert all(n == n.strip() and n for n in names)
    assert PRESETS["cocostuff171"][:80] == PRESETS["coco80"]
    assert PRESETS["voc20"][0] == "aeroplane" and PRESETS["ade150"][0] == "wall" and PRESETS["coco80"][0] == "person"


def test_vocabulary_ids_and_file_vocabularies():
    v = VocabularySpec(names=("cat", "dog"), background=("sky",))
    assert v.vocabulary_id() == vocabulary_id(["cat", "dog"], ["sky"], "photo")
    assert len(v.vocabulary_id()) == 16
    assert VocabularySpec(names=("dog", "cat"), background=("sky",)).vocabulary_id() != v.vocabulary_id()
    assert VocabularySpec(names=("cat", "dog")).vocabulary_id() != v.vocabulary_id()
    assert VocabularySpec(names=("cat", "dog"), background=("sky",), templates="raw").vocabulary_id() != (
        v.vocabulary_id()
    )
    assert VocabularySpec(preset="voc20").class_names() == PRESETS["voc20"]

    spec = spec_with(lambda d: d.update(vocabulary={"file": "s3://b/classes.txt", "background": ["background"]}))
    with pytest.raises(SpecError, match="vocabulary.file: the names of a vocabulary file are read at plan time"):
        params_hash(spec, "gem")
    names = parse_vocabulary_file("# classes\ncat\n\n  dog \n")
    assert names == ["cat", "dog"]
    resolved = spec.with_vocabulary_names(names)
    assert resolved.vocabulary.names == ("cat", "dog") and resolved.vocabulary.file is None
    assert params_hash(resolved, "gem") == params_hash(spec, "gem", class_names=names)
    with pytest.raises(SpecError, match=r"^vocabulary.file\[1\]: duplicate name 'cat'"):
        spec.with_vocabulary_names(["cat", "cat"])
    with pytest.raises(SpecError, match=r"^vocabulary.background: 'background' is both"):
        spec.with_vocabulary_names(["cat", "background"])


def test_method_templates_and_vocabulary_ids():
    spec = spec_with(lambda d: d["vocabulary"].update(templates="ensemble85"))
    assert spec.templates("gem") == "ensemble85"  # GEM's null templates follow the vocabulary
    assert spec.templates("maskclip") == "ensemble85"
    assert spec.vocabulary_id("gem") == spec.vocabulary_id("maskclip") == spec.vocabulary.vocabulary_id()
    plain = spec_with()
    assert plain.templates("gem") == "photo" and plain.vocabulary_id("gem") != plain.vocabulary_id("maskclip")


# ------------------------------------------------------------------------------------------------ schema


def test_json_schema_describes_the_spec_for_editors():
    schema = json_schema()
    assert schema["title"] == "clipmaps job spec" and set(schema["required"]) == {"input", "output", "model", "methods"}
    gem = schema["$defs"]["GEMSettings"]
    assert gem["additionalProperties"] is False
    assert gem["properties"]["depth"]["minimum"] == 2 and gem["properties"]["depth"]["default"] == 7
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    bad = copy.deepcopy(BASE)
    bad["methods"]["gem"]["dept"] = 5
    assert list(validator.iter_errors(bad))  # an editor flags the typo too


def test_driver_modules_import_no_torch_or_ray():
    code = (
        "import sys; import clipmaps.pipeline.spec, clipmaps.pipeline.vocabularies, clipmaps.pipeline.fingerprint, "
        "clipmaps.actors.registry; clipmaps.pipeline.spec.load_spec('tests/helpers/job.yaml'); "
        "bad = [m for m in ('torch', 'ray', 'open_clip') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pool_torch_threads_are_validated(tmp_path):
    from clipmaps.jobs.demo import DEMO_SPEC, write_scenes

    spec = load_spec(
        DEMO_SPEC,
        overrides=[
            f"input.manifest={write_scenes(tmp_path, 1)}",
            f"output.uri={tmp_path / 'out'}",
            "methods.gem.resources.torch_threads=2",
        ],
    )
    assert spec.method("gem").resources.torch_threads == 2
    with pytest.raises(SpecError, match="torch_threads"):
        load_spec(DEMO_SPEC, overrides=["methods.gem.resources.torch_threads=0"])


# ------------------------------------------------------------------------------------------------ credentials in URIs
CREDENTIALS = "AKIAFAKE:SECRETXYZ1"


def _no_secret(text: str) -> None:
    assert "SECRETXYZ1" not in text and "AKIAFAKE" not in text


@pytest.mark.parametrize(
    "overrides, field",
    [
        ([f"input.uri=s3://{CREDENTIALS}@bucket/x/{{0..2}}.tar"], "input.uri:"),
        ([f"input.uri=gs://{CREDENTIALS}@bucket/x.jsonl"], "input.uri:"),
        ([f"input.uri=[s3://bucket/a.jsonl, abfss://{CREDENTIALS}@c/b.jsonl]"], "input.uri[1]:"),
        ([f"input.manifest=s3a://{CREDENTIALS}@bucket/m.parquet"], "input.uri:"),
        ([f"output.uri=s3://{CREDENTIALS}@bucket/out"], "output.uri:"),
        (["model.pretrained=null", f"model.weights=az://{CREDENTIALS}@c/w.safetensors"], "model.weights:"),
        (["vocabulary.names=null", f"vocabulary.file=gcs://{CREDENTIALS}@b/names.txt"], "vocabulary.file:"),
    ],
)
def test_object_store_uris_with_userinfo_are_refused(overrides, field):
    """s3fs, gcsfs and adlfs cannot use user:secret@ (s3fs quotes it in its errors as a bucket name): refused at
    load time, naming the field and where credentials go, without the secret."""
    raw = copy.deepcopy(BASE)
    if any(o.startswith("input.manifest=") for o in overrides):
        raw["input"] = {}
    else:
        del raw["input"]["manifest"]
        raw["input"]["uri"] = "data/manifest.parquet"
    with pytest.raises(SpecError) as info:
        load_spec(raw, overrides)
    text = str(info.value)
    _no_secret(text)
    assert field in text and "storage_options" in text and "***@" in text


def test_http_basic_auth_in_weights_is_kept():
    spec = spec_with(overrides=["model.pretrained=null", "model.weights=https://user:SECRETXYZ1@host/w.safetensors"])
    assert spec.model.weights == "https://user:SECRETXYZ1@host/w.safetensors"
    assert "SECRETXYZ1" not in json.dumps(spec.to_dict(redact=True))


@pytest.mark.parametrize(
    "sets",
    [
        ["input.uri=s3://AKIAFAKE:SECRETXYZ1@bucket/x/{0..2}.tar"],
        ["input.uri=s3://AKIAFAKE:SECRETXYZ1@bucket/x.jsonl"],
        ["input.uri=[s3://AKIAFAKE:SECRETXYZ1@bucket/x.jsonl, s3://bucket/y.jsonl]"],
        ["output.uri=s3://AKIAFAKE:SECRETXYZ1@bucket/out"],
    ],
)
def test_cli_dry_run_refuses_credentials_in_uris_with_exit_2(tmp_path, capsys, sets):
    from clipmaps.jobs.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**copy.deepcopy(BASE), "output": {"uri": str(tmp_path / "out")}}))
    assert main(["run", str(job), "--dry-run", *[a for s in sets for a in ("--set", s)]]) == 2
    out, err = capsys.readouterr()
    _no_secret(out + err)
    assert "Traceback" not in err and "storage_options" in err


def test_write_outputs_and_unwritten_refuse_credentials_in_the_output_uri():
    from clipmaps.pipeline.write import unwritten, write_outputs

    uri = f"s3://{CREDENTIALS}@bucket/out"
    for call in (lambda: write_outputs(None, uri, BASE), lambda: unwritten(None, uri)):
        with pytest.raises(ValueError, match="storage_options") as info:
            call()
        _no_secret(str(info.value))
