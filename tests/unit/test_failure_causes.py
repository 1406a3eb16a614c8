"""What a failed job says: the root cause (type, errno, path) of an error raised in a Ray worker, not Ray's
wrapper; the exceptions are Ray's own classes, built as a worker builds them (no cluster needed)."""

from __future__ import annotations

import traceback

import pytest
from ray.exceptions import RayTaskError, UserCodeException

from clipmaps.jobs.cli import summary_table
from clipmaps.pipeline.run import RunResult, _describe_error


def _worker_error(path) -> BaseException:
    """A ``RayTaskError`` as Ray Data's map task raises it: an ``OSError`` wrapped in ``UserCodeException`` ("UDF
    failed to process a data block"), the chain kept only as traceback text."""
    try:
        try:
            (path / "out").mkdir()  # path is a regular file: NotADirectoryError / FileExistsError
        except OSError as e:
            raise UserCodeException("UDF failed to process a data block.") from e
    except UserCodeException as wrapper:
        text = "".join(traceback.format_exception(wrapper))
        return RayTaskError("MapBatches(sink_batch)", text, wrapper).as_instanceof_cause()


def test_a_workers_oserror_is_named_not_rays_wrapper(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file")
    error = _worker_error(blocker)
    assert "UDF failed" in str(error)  # what the driver gets
    line = _describe_error(error)
    assert line.startswith(("NotADirectoryError: [Errno 20]", "FileExistsError: [Errno 17]")), line
    assert str(blocker / "out") in line and "UDF failed" not in line


def test_a_driver_side_error_keeps_its_own_text():
    assert _describe_error(PermissionError(13, "Permission denied", "/out/_job.json")) == (
        "PermissionError: [Errno 13] Permission denied: '/out/_job.json'"
    )
    assert _describe_error(RuntimeError("")) == ""


@pytest.mark.parametrize("kept", [0, 3])
def test_the_summary_rate_counts_this_attempts_images_only(kept):
    result = RunResult("out", total=4, processed=4, errors=0, counts={"labels": 4}, seconds=100.0, ok=True)
    result.attempt_images, result.attempt_seconds, result.kept_images, result.kept_shards = 4 - kept, 2.0, kept, kept
    text = summary_table(result)
    assert f"  by this run       {4 - kept}" in text and f"  kept              {kept} ({kept} shards" in text
    assert f"images/s            {(4 - kept) / 2.0:.2f} (this run)" in text
    assert "images processed    4" in text
