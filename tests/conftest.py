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


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1:8333 with an empty bucket ``clipmaps``."""
    from tests.helpers import s3server

    proc, server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    s3server.stop(proc)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module (real Ray; 2 CPUs so pools and decode tasks must share)."""
    import ray

    # address="local": never join another Ray cluster that happens to run on the host
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Everything under ``tests/integration/`` is marked ``integration`` (``-m 'not integration'`` runs the unit
    tests alone, in about a minute); unit tests get a tight time bound, integration tests keep the default."""
    for item in items:
        parts = item.path.parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "unit" in parts and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(120))
