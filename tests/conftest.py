"""Shared test set-up: one thread for torch (two collapse when the other core is busy), seeded tiny models."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_vit():
    from clipmaps.actors.models import load_model

    return load_model("clipmaps-tiny-vit", seed=0)


@pytest.fixture(scope="session")
def tiny_rn():
    from clipmaps.actors.models import load_model

    return load_model("clipmaps-tiny-rn", seed=0)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 64, 64, generator=g)
