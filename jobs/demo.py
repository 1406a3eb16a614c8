"""``clipmaps demo``: the four methods on generated sample scenes, outputs written as images and JSON lines.

This is the in-process sample run; it needs no cluster and no downloads (a seeded random model by default).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import make_scene

logger = logging.getLogger(__name__)

PALETTE = np.array([[0, 0, 0]] + [[(37 * i) % 256, (91 * i) % 256, (173 * i) % 256] for i in range(1, 256)],
                   dtype=np.uint8)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: model, weights, input size and where outputs go."""

    output: Path
    model: str = "clipmaps-tiny-vit"
    pretrained: str | None = None
    weights: str | None = None
    seed: int = 0
    size: int = 224
    scenes: int = 3

    @property
    def random_weights(self) -> bool:
        return self.pretrained is None and self.weights is None


def run_demo(cfg: DemoConfig) -> dict:
    """Run GEM, MaskCLIP, LeGrad and MaskInversion on ``cfg.scenes`` scenes; return a summary dict."""
    import torch

    from clipmaps.actors.methods.common import BackgroundRule, label_map
    from clipmaps.actors.methods.gem import GEM
    from clipmaps.actors.methods.legrad import LeGrad
    from clipmaps.actors.methods.maskclip import MaskCLIP
    from clipmaps.actors.methods.maskinversion import MaskInversion, MaskInversionParams
    from clipmaps.actors.models import load_model
    from clipmaps.actors.preprocess import METHOD_PREPROCESS, Preprocess
    from clipmaps.actors.text import TextEncoder

    started = time.time()
    lm = load_model(cfg.model, pretrained=cfg.pretrained, weights=cfg.weights,
                    seed=cfg.seed if cfg.random_weights else None)
    text = TextEncoder(lm.model, lm.tokenizer)
    square = Preprocess(size=cfg.size)
    gem = GEM(lm.model, lm.tokenizer, text_encoder=text)
    legrad = LeGrad(lm.model, lm.tokenizer, text_encoder=text)
    maskclip = MaskCLIP(lm.model, lm.tokenizer, text_encoder=text)
    maskinv = MaskInversion(lm.model, MaskInversionParams(lr=0.5))
    mc_pre = Preprocess(**{**METHOD_PREPROCESS["maskclip"].__dict__, "size": cfg.size})
    background = ["background", "ground", "sky"]
    for sub in ("labels", "heatmaps", "images"):
        (cfg.output / sub).mkdir(parents=True, exist_ok=True)
    regions = []
    for i in range(cfg.scenes):
        scene = make_scene(i)
        image_id = f"scene-{i:03d}"
        scene.image.save(cfg.output / "images" / f"{image_id}.png")
        w, h = scene.image.size
        x = torch.from_numpy(square.image(scene.image))[None]
        vocabulary = scene.names + background
        rule = BackgroundRule(num_background=len(background))
        for name, logits in (
            ("gem", gem.class_logits(x, vocabulary, output_size=(h, w))),
            ("maskclip", maskclip.class_logits(torch.from_numpy(mc_pre.image(scene.image))[None], vocabulary,
                                               output_size=(h, w))),
        ):
            labels, _ = label_map(logits, rule)
            Image.fromarray(PALETTE[labels[0].numpy().astype(np.uint8)]).save(
                cfg.output / "labels" / f"{image_id}_{name}.png")
        for name, maps in (("gem", gem.heatmaps(x, [scene.names], output_size=(h, w))[0]),
                           ("legrad", legrad.heatmaps(x, [scene.names], output_size=(h, w))[0])):
            for prompt, m in zip(scene.names, maps):
                Image.fromarray((m.numpy() * 255).round().astype(np.uint8)).save(
                    cfg.output / "heatmaps" / f"{image_id}_{name}_{prompt.replace(' ', '-')}.png")
        masks = torch.from_numpy(np.stack([square.mask(m, (w, h)) for m in scene.masks]))
        result = maskinv.embed(x, [masks])[0]
        emb = torch.nn.functional.normalize(result.embeddings, dim=-1)
        captions = text.encode(scene.names, "photo")
        best = (emb @ captions.T).argmax(dim=-1)
        for r, (name, loss) in enumerate(zip(scene.names, result.loss.tolist())):
            regions.append({"image_id": image_id, "region_id": r, "mask_name": name,
                            "best_caption": scene.names[int(best[r])], "dice_loss": round(loss, 4),
                            "embedding": [round(v, 6) for v in emb[r].tolist()]})
    with open(cfg.output / "regions.jsonl", "w") as f:
        for row in regions:
            f.write(json.dumps(row) + "\n")
    summary = {"model": lm.name, "weights": lm.weights, "scenes": cfg.scenes, "size": cfg.size,
               "seconds": round(time.time() - started, 2), "output": str(cfg.output),
               "regions": len(regions), "random_weights": cfg.random_weights}
    (cfg.output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
