"""Ray's known healthy-run messages are dropped; everything else Ray logs still prints."""

from __future__ import annotations

import logging

import pytest

from clipmaps.pipeline.raylog import KnownNoiseFilter, quiet_known_noise


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_known_messages_are_dropped():
    pytest.importorskip("ray.data")
    # a handler of our own on Ray's logger (Ray's own handlers hold whatever stderr existed when Ray was imported,
    # which under pytest may be another test's capture)
    seen = Collect()
    logging.getLogger("ray").addHandler(seen)
    try:
        quiet_known_noise()
        quiet_known_noise()  # idempotent
        for name in ("ray", "ray.data"):
            for handler in logging.getLogger(name).handlers:
                assert sum(isinstance(f, KnownNoiseFilter) for f in handler.filters) == 1
        logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
        )
        logging.getLogger("ray.util").warning("Progress bars disabled. To enable, set `x`.")
        logging.getLogger("ray.util").warning("a real problem")
    finally:
        logging.getLogger("ray").removeHandler(seen)
    assert seen.messages == ["a real problem"]
