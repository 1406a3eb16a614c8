"""The method registry: every entry is complete and consistent with what the actors and the sink use; backbone
families are read from model configs without torch; methods run only on the families they are defined for."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clipmaps.actors.params import OPERATIONAL_FIELDS, ModelInfo
from clipmaps.actors.registry import (
    FAMILIES,
    METHODS,
    ORIGINAL_GEM,
    REGISTRY,
    UnknownModel,
    list_model_names,
    model_info,
    supported_methods,
)
from clipmaps.schemas import batches as cols


def test_every_method_entry_is_complete():
    assert METHODS == ("maskclip", "gem", "legrad", "maskinversion")
    for name, e in REGISTRY.items():
        assert e.name == name and e.display and e.paper and e.upstream and e.families <= set(FAMILIES)
        assert all(c in vars(cols).values() for c in e.inputs), name
        if e.parent is not None:  # GEM's baseline: produced by its parent's pass, configured by its settings
            assert e.settings is None and REGISTRY[e.parent].settings is not None
            continue
        assert issubclass(e.settings, e.params) and "resources" in e.settings.model_fields
        assert set(e.params.model_fields) <= set(e.settings.model_fields)
        assert set(e.settings.model_fields) >= OPERATIONAL_FIELDS
        predictor = e.load_predictor()
        assert predictor.method == name
        defaults = e.settings()
        kinds = e.output_kinds(defaults, vocabulary=True, write_expl_maps=True)
        assert kinds and all(cols.declared(cols.col(name, k)) for k in kinds)  # every output column is declared
        assert e.preprocess(defaults)["size"] == defaults.size


def test_outputs_include_the_gem_baseline_only_when_asked():
    gem = REGISTRY["gem"]
    assert gem.outputs(gem.settings()) == ("gem",)
    assert gem.outputs(gem.settings(original=True)) == ("gem", ORIGINAL_GEM)


@pytest.mark.parametrize(
    ("name", "family", "methods"),
    [
        ("ViT-B-16", "vit", ["maskclip", "gem", "legrad", "maskinversion"]),
        ("clipmaps-synth-vit", "vit", ["maskclip", "gem", "legrad", "maskinversion"]),
        ("RN50", "resnet", ["maskclip"]),
        ("clipmaps-tiny-rn", "resnet", ["maskclip"]),
        ("convnext_tiny", "timm", []),
        ("EVA02-B-16", "timm", []),
        ("MobileCLIP-B", "timm", []),
        ("ViT-B-16-SigLIP", "siglip", ["legrad", "maskinversion"]),
        ("ViT-B-16-SigLIP2", "siglip", ["legrad", "maskinversion"]),
        ("clipmaps-tiny-mappool", "siglip", ["legrad", "maskinversion"]),
        ("coca_ViT-B-32", "coca", ["legrad", "maskinversion"]),
        ("coca_ViT-L-14", "coca", ["legrad", "maskinversion"]),
        ("clipmaps-tiny-coca", "coca", ["legrad", "maskinversion"]),
        # a CoCa config without an attentional pooler has a plain CLIP ViT image tower
        ("coca_base", "vit", ["maskclip", "gem", "legrad", "maskinversion"]),
    ],
)
def test_families_and_what_runs_on_them(name, family, methods):
    info = model_info(name)
    assert info.family == family and supported_methods(info) == methods


def test_unknown_models_are_named_with_suggestions():
    with pytest.raises(UnknownModel, match=r"unknown model 'ViT-B16' \(did you mean 'ViT-B-16'"):
        model_info("ViT-B16")
    assert "ViT-B-16" in list_model_names() and "clipmaps-tiny-vit" in list_model_names()


def test_model_bounds_come_from_the_params():
    info = ModelInfo(name="m", family="vit", layers=4, patch_size=8)
    gem = REGISTRY["gem"]
    assert gem.model_problems(gem.settings(depth=5, size=64), info) == []
    assert [f for f, _ in gem.model_problems(gem.settings(depth=6, size=60), info)] == ["depth", "size"]
    resnet = ModelInfo(name="RN50", family="resnet")
    assert gem.model_problems(gem.settings(), resnet)[0][0] == ""
    assert REGISTRY["maskclip"].model_problems(REGISTRY["maskclip"].settings(), resnet) == []


def test_the_registry_imports_no_torch():
    code = (
        "import sys, clipmaps.actors.registry as r; r.model_info('ViT-B-16'); r.REGISTRY['gem'].settings(); "
        "bad = [m for m in ('torch', 'open_clip', 'ray') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pooled_families_read_their_patch_and_depth():
    siglip = model_info("ViT-B-16-SigLIP2")
    assert (siglip.patch_size, siglip.layers) == (16, 12)  # patch and depth from the timm trunk's name
    so400m = model_info("ViT-SO400M-14-SigLIP")
    assert (so400m.patch_size, so400m.layers) == (14, 27)
    tiny = model_info("clipmaps-tiny-mappool")
    assert (tiny.family, tiny.patch_size, tiny.context_length) == ("siglip", 32, 16)
    coca = model_info("clipmaps-tiny-coca")
    assert (coca.family, coca.layers, coca.patch_size) == ("coca", 4, 8)
    legrad = REGISTRY["legrad"]
    assert [f for f, _ in legrad.model_problems(legrad.settings(size=200), tiny)] == ["size"]  # not a multiple of 32
    assert legrad.model_problems(legrad.settings(size=224), tiny) == []
    ((field, reason),) = legrad.model_problems(legrad.settings(size=224, layers=13), tiny)
    assert field == "layers" and "out of range for the 12-layer image tower of clipmaps-tiny-mappool" in reason


@pytest.mark.parametrize("model", ["ViT-B-16-SigLIP", "clipmaps-tiny-coca"])
@pytest.mark.parametrize("method", ["gem", "maskclip", ORIGINAL_GEM])
def test_gem_and_maskclip_are_refused_on_attention_pooling_with_the_reason(method, model):
    info = model_info(model)
    e = REGISTRY[method]
    settings = REGISTRY[e.parent or method].settings()
    ((field, reason),) = e.model_problems(settings, info)
    assert field == "" and reason.startswith(f"{e.display} cannot run on {model} ({FAMILIES[info.family]}): ")
    assert ("GEM (paper and gem-torch)" if e.display.startswith("GEM") else "MaskCLIP (paper and code)") in reason
    assert "SigLIP" in reason if info.family == "siglip" else "CoCa" in reason


def test_the_spec_refuses_gem_on_a_siglip_model():
    from clipmaps.pipeline.spec import SpecError, load_spec

    raw = {
        "input": {"manifest": "data/manifest.parquet"},
        "output": {"uri": "results"},
        "model": {"name": "clipmaps-tiny-mappool", "seed": 0},
        "vocabulary": {"names": ["cat", "dog"]},
        "methods": {"gem": {"size": 64}, "legrad": {"size": 64}, "maskinversion": {"size": 64}},
    }
    with pytest.raises(SpecError) as err:
        load_spec(raw)
    lines = str(err.value).splitlines()
    assert any(line.strip().startswith("methods.gem: GEM cannot run on clipmaps-tiny-mappool") for line in lines)
    assert not any("legrad" in line or "maskinversion" in line for line in lines), lines
    raw["methods"].pop("gem")
    assert load_spec(raw).enabled_methods() == ["legrad", "maskinversion"]


def test_siglip_inputs_are_normalised_as_siglip_was_trained():
    legrad = REGISTRY["legrad"]
    settings = legrad.settings(size=224)
    assert legrad.preprocess(settings)["normalize"] == "clip"
    assert legrad.preprocess(settings, model_info("ViT-B-16-SigLIP"))["normalize"] == "inception"
    assert legrad.preprocess(settings, model_info("coca_ViT-B-32"))["normalize"] == "clip"
    assert legrad.preprocess(settings, model_info("ViT-B-16"))["normalize"] == "clip"
