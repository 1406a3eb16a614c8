"""A healthy start of Ray through clipmaps prints none of Ray's known notes (checked in a fresh process: ``ray.init``
replaces the logging handlers a unit test could inspect)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import ray, ray.data
from clipmaps.pipeline.raylog import quiet_known_noise
quiet_known_noise()
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
assert len(ray.data.range(4).map_batches(lambda b: b).take_all()) == 4  # executes: the bar warning fires
ray.shutdown()
print("ok")
"""


def test_ray_start_and_a_dataset_print_no_known_note():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    assert "Token authentication is enabled" not in done.stderr, done.stderr
    assert "Progress bars disabled" not in done.stderr, done.stderr
