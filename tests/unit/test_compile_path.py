"""``model.compile: true``: the actor hands each method's hot path to ``torch.compile``; the setting is operational.

Compiling itself is exercised by the slow parity test (``tests/parity/test_parity.py``,
``test_compiled_methods_match_the_fixtures``); here only the wiring, which costs no compilation (torch.compile is
lazy), and one small compiled call of GEM checked against eager.
"""

from __future__ import annotations

import pytest
import torch

from clipmaps.actors.actor import ActorConfig, MethodActor
from clipmaps.actors.methods.gem import GEM
from clipmaps.actors.params import ModelSpec
from clipmaps.actors.predictors import OutputOptions, Vocabulary
from clipmaps.actors.registry import REGISTRY
from clipmaps.pipeline.fingerprint import model_fingerprint

HOT_PATHS = {"gem": "_forward", "maskclip": "_forward", "legrad": "_maps", "maskinversion": "_objective"}


@pytest.mark.parametrize("method", sorted(HOT_PATHS))
@pytest.mark.parametrize("compile_", [False, True])
def test_the_actor_compiles_the_hot_path_only_when_asked(method, compile_):
    entry = REGISTRY[method]
    config = ActorConfig(
        method=method,
        model=ModelSpec(name="clipmaps-tiny-vit", seed=0, compile=compile_),
        settings=entry.settings(size=64),
        templates="photo" if entry.encodes_text else None,
        vocabulary=Vocabulary(names=("red circle", "blue square")),
        options=OutputOptions(prompt_source="auto" if entry.settings().heatmaps else None),
    )
    predictor = MethodActor(config).predictor
    hot = getattr(getattr(predictor, predictor.method_attr), HOT_PATHS[method])
    # eager: the method object's own bound method; compiled: torch.compile's wrapper around it
    assert (getattr(hot, "__self__", None) is None) == compile_, hot


def test_compile_is_not_fingerprinted():
    from clipmaps.pipeline.spec import JobSpec

    base = {
        "input": {"manifest": "m.parquet"},
        "output": {"uri": "out"},
        "methods": {"gem": {}},
        "vocabulary": {"names": ["cat"]},
    }
    a = JobSpec.model_validate({**base, "model": {"name": "clipmaps-tiny-vit", "seed": 0}})
    b = JobSpec.model_validate({**base, "model": {"name": "clipmaps-tiny-vit", "seed": 0, "compile": True}})
    assert b.model.compile and not a.model.compile
    assert model_fingerprint(a) == model_fingerprint(b)


def test_compiled_gem_matches_eager(tiny_vit, images):
    gem = GEM(tiny_vit.model, tiny_vit.tokenizer)
    eager = gem.features(images)[0]
    gem.compile(fullgraph=True, backend="aot_eager")  # traced whole (no graph break), without inductor's C++ build
    torch.testing.assert_close(gem.features(images)[0], eager, atol=1e-6, rtol=1e-5)
