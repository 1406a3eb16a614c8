"""Ray's messages that every healthy run prints, kept out of the run's output.

A run on Ray 2.60 printed three lines to stderr although all went well:

* ``Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out`` — Ray's note that
  the local cluster it started uses token authentication (the secure default, kept). Dropped here.
* ``Progress bars disabled. To enable, set …enable_progress_bars = True`` — clipmaps turns Ray Data's bars off
  outside a terminal on purpose (its timer line, :mod:`clipmaps.pipeline.progress`, is the progress there). Dropped.
* ``core_worker.cc: Actor with class name: 'MapWorker(MapBatches(MethodActor))' … has constructor arguments in the
  object store and max_restarts > 0`` — printed by Ray's C++ core for every actor pool whose actors restart
  (clipmaps sets ``max_restarts=-1``, see :mod:`clipmaps.pipeline.plan`): Ray Data keeps each pool's callable in
  the object store, owned by the driver, which lives as long as the job, so a restart finds it
  (ray-project/ray#53727). It does not pass through Python logging and cannot be filtered here without hiding the
  C++ core's real errors; the README explains it.

The filter drops only those exact messages; every other record of Ray's loggers passes.
"""

from __future__ import annotations

import logging

#: Starts of the messages dropped (see the module docstring).
KNOWN_NOISE = (
    "Token authentication is enabled for this Ray cluster.",
    "Progress bars disabled. To enable, set",
)
#: Loggers whose handlers print Ray's messages (``ray`` and ``ray.data`` do not propagate to the root).
RAY_LOGGERS = ("ray", "ray.data")
#: The loggers the known messages are logged on: a filter on the logger itself holds even when ``ray.init`` removes
#: the ``ray`` logger's handler (it does; the note then reaches stderr through Python's last-resort handler).
ORIGIN_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress")


class KnownNoiseFilter(logging.Filter):
    """Drops the records whose message starts with one of :data:`KNOWN_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to drop
            return True
        return not message.startswith(KNOWN_NOISE)


#: Ray's ``log_once`` key of the "Progress bars disabled" warning (ray/data/_internal/progress/__init__.py).
PROGRESS_BARS_KEY = "ray_data_progress_manager_disabled"


def quiet_known_noise() -> None:
    """Keep Ray's known healthy-run messages out of the output (idempotent; call after importing Ray, before
    ``ray.init``): :class:`KnownNoiseFilter` on the handlers of Ray's loggers, and the progress-bar warning's
    ``log_once`` key spent — Ray Data sets up its own log handlers when a dataset first executes, after this runs,
    and then warns once per process through them."""
    from ray.util.debug import log_once

    log_once(PROGRESS_BARS_KEY)  # marks the key as logged: Ray Data's own log_once check then stays silent
    for name in ORIGIN_LOGGERS:
        origin = logging.getLogger(name)
        if not any(isinstance(f, KnownNoiseFilter) for f in origin.filters):
            origin.addFilter(KnownNoiseFilter())
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, KnownNoiseFilter) for f in handler.filters):
                handler.addFilter(KnownNoiseFilter())
