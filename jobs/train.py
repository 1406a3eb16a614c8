"""``clipmaps train``: train the tiny CLIP that the demo and the quality tests use, from a seed, on CPU.

The model (``clipmaps-synth-vit``, ``actors/model_configs``) is an ordinary open_clip CLIP with a class-token
pooled ViT, trained with a plain contrastive (InfoNCE) loss on scenes from :mod:`clipmaps.jobs.synth.scenes`. Two
choices depart from the textbook recipe, both to make the model's *dense* behaviour usable at this scale without a
dense loss:

* Captions name a random non-empty subset of the objects (half the time all of them), and the loss treats every
  caption whose objects all appear in an image as a positive for it (multi-positive InfoNCE, both directions). With
  captions that always name everything, the model can match a caption by any one salient object and never learns to
  bind a phrase to its object; partial captions force it to.
* A few scenes are empty, captioned "background" and the like, so that background prompts mean something.

No dense or mask-level loss is used: the model only ever sees image–caption pairs, like a real CLIP, so what the
methods get out of it is what they would get out of CLIP's training signal.

Images go through the pipeline's own square preprocessing (``pipeline.decode.preprocess.Preprocess``: render larger
with a random aspect ratio, bicubic resize to the model's input size), so training sees what the methods see.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .synth.scenes import caption_for, render, sample_spec

logger = logging.getLogger(__name__)

MODEL_NAME = "clipmaps-synth-vit"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (with the torch build and thread count).

    Attributes:
        seed: seeds the initial weights and the scene stream.
        steps: optimizer steps of ``batch_size`` fresh scenes each.
        lr: peak AdamW learning rate after ``warmup`` linear steps, then cosine decay to 0.
        weight_decay: AdamW decay on matrices (not on gains, biases, embeddings or the temperature).
        empty_fraction: share of scenes with no objects (background captions).
        partial_fraction: share of captions that name a strict subset of the objects.
        render_size: the short side the scenes are drawn at before the resize to the model's input size.
        threads: torch intra-op threads (results are reproducible for one thread count and torch build).
    """

    seed: int = 0
    steps: int = 1700
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    max_objects: int = 3
    empty_fraction: float = 0.1
    partial_fraction: float = 0.5
    render_size: int = 80
    threads: int = 2
    model: str = MODEL_NAME

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"steps must be ≥ 1 and batch_size ≥ 2, got {self.steps} and {self.batch_size}")
        if not 0 <= self.empty_fraction < 1 or not 0 <= self.partial_fraction <= 1:
            raise ValueError("empty_fraction must be in [0, 1) and partial_fraction in [0, 1]")


@dataclass
class Batch:
    """``images`` float32 ``[B, 3, S, S]`` (CLIP-normalised), ``captions`` ``B`` strings, ``positives`` bool
    ``[B, B]``: ``positives[i, j]`` when every object caption ``j`` names is in image ``i`` (an empty caption
    matches only empty images)."""

    images: torch.Tensor
    captions: list[str]
    positives: torch.Tensor
    contents: list[set[str]]  # the classes visible in each image
    named: list[set[str]]  # the classes each caption names


def make_batch(rng: np.random.Generator, cfg: TrainConfig, image_size: int) -> Batch:
    """Draw ``cfg.batch_size`` scenes and their captions (see :class:`Batch`)."""
    from PIL import Image

    from clipmaps.pipeline.decode.preprocess import Preprocess

    pre = Preprocess(size=image_size)
    images, captions, contents, named = [], [], [], []
    for _ in range(cfg.batch_size):
        n = 0 if rng.random() < cfg.empty_fraction else int(rng.integers(1, cfg.max_objects + 1))
        spec = sample_spec(rng, objects=n)
        aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.34))))
        size = (
            (round(cfg.render_size * aspect), cfg.render_size)
            if aspect >= 1
            else (cfg.render_size, round(cfg.render_size / aspect))
        )
        pixels, index = render(spec, size)
        visible = [o.name for k, o in enumerate(spec.objects) if (index == k + 1).any()]
        names = list(visible)
        if names and len(names) > 1 and rng.random() < cfg.partial_fraction:
            names = list(rng.choice(names, size=int(rng.integers(1, len(names))), replace=False))
        rng.shuffle(names)
        images.append(pre.image(Image.fromarray(pixels)))
        captions.append(caption_for(names, rng))
        contents.append(set(visible))
        named.append(set(names))
    positives = torch.tensor([[(nj <= ci) if nj else not ci for nj in named] for ci in contents])
    return Batch(torch.from_numpy(np.stack(images)), captions, positives, contents, named)


def multi_positive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where a row may have several positives: ``-log Σ_pos softmax``, averaged over both
    directions. ``logits`` ``[B, B]`` image × caption; ``positives`` bool ``[B, B]`` with a true diagonal."""
    neg = torch.finfo(logits.dtype).min
    img = torch.logsumexp(logits.masked_fill(~positives, neg), 1) - torch.logsumexp(logits, 1)
    txt = torch.logsumexp(logits.t().masked_fill(~positives.t(), neg), 1) - torch.logsumexp(logits.t(), 1)
    return -(img.mean() + txt.mean()) / 2


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, *, progress_every: int = 50) -> torch.nn.Module:
    """Train ``cfg.model`` from ``cfg.seed``; returns the fp32 model in eval mode."""
    import open_clip

    from clipmaps.actors.models import register_model_configs

    register_model_configs()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(cfg.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    image_size = int(
        model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    )
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(cfg.seed)
    started, seen = time.time(), 0.0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = make_batch(rng, cfg, image_size)
        image = F.normalize(model.encode_image(batch.images), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(batch.captions)), dim=-1)
        logits = model.logit_scale.exp() * image @ text.t()
        loss = multi_positive_loss(logits, batch.positives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        seen = 0.9 * seen + 0.1 * loss.item() if step else loss.item()
        if progress_every and (step % progress_every == 0 or step == cfg.steps - 1):
            logger.info(
                "step %d/%d  loss %.3f  scale %.1f  lr %.2e  %.1f min",
                step + 1,
                cfg.steps,
                seen,
                model.logit_scale.exp().item(),
                lr_at(step, cfg),
                (time.time() - started) / 60,
            )
    model.eval()
    return model


def save_checkpoint(model: torch.nn.Module, path: str | Path, cfg: TrainConfig) -> Path:
    """Write the weights as fp16 safetensors with the training config in the file's metadata."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"clipmaps.train_config": json.dumps(asdict(cfg), sort_keys=True)})
    return path


def file_sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_train_cli(args: argparse.Namespace) -> int:
    """``clipmaps train`` (arguments: :func:`clipmaps.jobs.commands.add_train_parser`); returns the exit code."""
    from clipmaps.actors.models import BUNDLED_WEIGHTS

    logging.getLogger(__name__).setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig()
    cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads)
    started = time.time()
    path = save_checkpoint(train(cfg), args.out, cfg)
    digest = file_sha256(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {(time.time() - started) / 60:.1f} min")
    print(f"sha256 {digest}")
    shipped = {sha for (name, _), (_, sha) in BUNDLED_WEIGHTS.items() if name == cfg.model}
    if shipped:
        same = digest in shipped
        print(
            "identical to the shipped checkpoint"
            if same
            else "differs from the shipped checkpoint (another seed/config, torch build or thread count); "
            "compare their quality with clipmaps eval"
        )
    return 0
