"""Seeded random-init tiny models and their state_dict fingerprint.

Importable from any environment that has torch + open_clip (2.24 in the reference venv, 3.x in the
main venv), so the clipmaps-side tests can rebuild exactly the same weights:

    torch.manual_seed(0); model = open_clip.create_model(name, pretrained=None)

Run as a script to print the fingerprints of the current environment as JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_CONFIG_DIR = REPO / "actors" / "model_configs"
MODEL_SEED = 0
TINY_VIT = "clipmaps-tiny-vit"
TINY_RN = "clipmaps-tiny-rn"
#: SigLIP family: open_clip timm tower ``vit_base_patch32_siglip_256`` (map head) + a tiny text tower. The name
#: avoids "siglip": open_clip would fetch SigLIP's tokenizer from the model hub for such a name.
TINY_SIGLIP = "clipmaps-tiny-mappool"
TINY_COCA = "clipmaps-tiny-coca"
#: The empty-text correction's token ids, fixed offline (the hub tokenizer upstream uses is unreachable): open_clip's
#: bundled SimpleTokenizer on upstream's text "a photo of a" (start, a, photo, of, a, end), zero-padded to the tiny
#: SigLIP's context of 16. Both sides compute ``normalize(encode_text(ids))`` from these.
EMPTY_TEXT_IDS = [49406, 320, 1125, 539, 320, 49407] + [0] * 10


def register_configs():
    import open_clip

    if TINY_VIT not in open_clip.list_models():
        open_clip.add_model_config(str(MODEL_CONFIG_DIR))


def build_model(name: str, seed: int = MODEL_SEED):
    """fp32, CPU, eval-mode, seeded random-init open_clip model."""
    import open_clip
    import torch

    register_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)  # keyword: positional order differs across versions
    return model.float().eval()


def state_dict_sha256(model) -> str:
    """sha256 over the state_dict tensors in sorted key order (fp32 bytes, keys not hashed)."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for key in sorted(sd):
        h.update(sd[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def visual_sha256(model) -> str:
    """sha256 over the image tower's tensors (``visual.*``) only: CoCa's text decoder has a projection open_clip
    leaves uninitialised (``torch.empty``), so the full state dict is not reproducible; the parity cases feed text
    as embeddings and need only the image tower."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for key in sorted(k for k in sd if k.startswith("visual.")):
        h.update(sd[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def state_dict_keys_sha256(model) -> str:
    """sha256 of the sorted key names joined by newlines (diagnostic only)."""
    return hashlib.sha256("\n".join(sorted(model.state_dict())).encode()).hexdigest()


def fingerprints() -> dict:
    from importlib.metadata import version

    import torch

    out = {"open_clip": version("open_clip_torch"), "torch": torch.__version__, "models": {}}
    for name in (TINY_VIT, TINY_RN):
        m = build_model(name)
        out["models"][name] = {
            "state_dict_sha256": state_dict_sha256(m),
            "state_dict_keys_sha256": state_dict_keys_sha256(m),
            "num_tensors": len(m.state_dict()),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(fingerprints(), indent=1, sort_keys=True))
