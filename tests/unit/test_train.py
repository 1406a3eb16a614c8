"""Training the tiny CLIP: the loss, the batches, determinism and the checkpoint format (a few steps, not a run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipmaps.jobs.train import TrainConfig, make_batch, multi_positive_loss, save_checkpoint, train


def test_with_one_positive_per_row_the_loss_is_clips():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=g) * 3
    eye = torch.eye(6, dtype=torch.bool)
    clip = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    torch.testing.assert_close(multi_positive_loss(logits, eye), clip)


def test_extra_positives_are_not_pushed_away():
    logits = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    both = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert multi_positive_loss(logits, both) < multi_positive_loss(logits, torch.eye(3, dtype=torch.bool))


def test_batch_positives_follow_the_named_objects():
    cfg = TrainConfig(batch_size=48, empty_fraction=0.2, threads=1)
    batch = make_batch(np.random.default_rng(1), cfg, 64)
    assert batch.images.shape == (48, 3, 64, 64) and batch.positives.diagonal().all()
    for j, caption in enumerate(batch.captions):
        assert all(name in caption for name in batch.named[j])
        for i in range(48):
            want = batch.named[j] <= batch.contents[i] if batch.named[j] else not batch.contents[i]
            assert bool(batch.positives[i, j]) == want
    assert any(batch.named[j] < batch.contents[j] for j in range(48))  # some captions name only some objects
    empty = [i for i, c in enumerate(batch.captions) if c in ("background", "an empty background", "nothing")]
    assert empty, "an empty_fraction of 0.2 gives empty scenes"
    for i in empty:  # an empty caption matches exactly the empty images
        assert {j for j in range(48) if batch.positives[j, i]} == set(empty)


def test_training_is_reproducible_and_the_checkpoint_loads(tmp_path):
    from clipmaps.actors.models import load_model, state_dict_sha256

    cfg = TrainConfig(steps=2, batch_size=8, warmup=1, threads=1)
    a, b = train(cfg, progress_every=0), train(cfg, progress_every=0)
    assert state_dict_sha256(a) == state_dict_sha256(b)
    path = save_checkpoint(a, tmp_path / "w.safetensors", cfg)
    lm = load_model("clipmaps-synth-vit", weights=str(path))
    for (name, p), q in zip(a.state_dict().items(), lm.model.state_dict().values()):
        torch.testing.assert_close(q, p.half().float(), msg=name)  # fp16 on disk, fp32 in memory


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="empty_fraction"):
        TrainConfig(empty_fraction=1.0)
