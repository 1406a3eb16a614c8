"""Model loading: seeded init, safetensors and torch files from paths and URIs, safe refusal of bad weights."""

from __future__ import annotations

import pickle

import pytest
import torch

from clipmaps.actors.models import load_model, read_state_dict, save_weights, state_dict_sha256


def test_seeded_init_is_reproducible(tiny_vit):
    again = load_model("clipmaps-tiny-vit", seed=0)
    other = load_model("clipmaps-tiny-vit", seed=1)
    assert state_dict_sha256(again.model) == state_dict_sha256(tiny_vit.model)
    assert state_dict_sha256(other.model) != state_dict_sha256(tiny_vit.model)
    assert tiny_vit.weights == "random:seed=0"
    assert not any(p.requires_grad for p in tiny_vit.model.parameters())
    assert not tiny_vit.model.training


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip(tmp_path, tiny_vit, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_weights(tiny_vit.model, path)
    else:
        torch.save({"state_dict": tiny_vit.model.state_dict()}, path)
    for uri in (str(path), f"file://{path}"):
        loaded = load_model("clipmaps-tiny-vit", weights=uri)
        assert state_dict_sha256(loaded.model) == state_dict_sha256(tiny_vit.model)
        assert loaded.weights == uri


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="not a safetensors file or a plain state dict"):
        read_state_dict(str(path))


def test_wrong_architecture_is_named(tmp_path, tiny_rn):
    path = save_weights(tiny_rn.model, tmp_path / "rn.safetensors")
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_model("clipmaps-tiny-vit", weights=str(path))


def test_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of"):
        load_model("clipmaps-tiny-vit")
    with pytest.raises(ValueError, match="exactly one of"):
        load_model("clipmaps-tiny-vit", seed=0, weights="x.safetensors")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("no-such-model", seed=0)
