"""Ray's known healthy-run messages are dropped; everything else Ray logs still prints."""

from __future__ import annotations

import logging

import pytest

from clipmaps.pipeline.raylog import KnownNoiseFilter, quiet_known_noise


def test_only_the_known_messages_are_dropped(capfd):
    pytest.importorskip("ray.data")
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            assert sum(isinstance(f, KnownNoiseFilter) for f in handler.filters) == 1
    logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    )
    logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set `x`.")
    logging.getLogger("ray.data._internal.progress").warning("a real problem")
    err = capfd.readouterr().err
    assert "Token authentication" not in err and "Progress bars disabled" not in err
    assert "a real problem" in err
