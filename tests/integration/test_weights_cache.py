"""Weights from object storage: one download per node (file lock), sha256 verification, atomic cache entries.

Downloads are counted by a real fsspec filesystem (a local one under its own ``countingfile://`` protocol, so the
cache treats it as remote) that appends a line to a log file each time the weights are opened; racing processes are
real processes. The last test goes through a real S3 server (SeaweedFS) and loads the cached file into a model.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from clipmaps.actors.weights_cache import (
    CACHE_ENV,
    WeightsChecksumError,
    cache_entry,
    cached_weights,
    default_cache_dir,
    is_local,
)

PROTOCOL = "countingfile"
LOG_ENV = "CLIPMAPS_TEST_DOWNLOAD_LOG"
SLOW_ENV = "CLIPMAPS_TEST_DOWNLOAD_DELAY"
FAIL_ENV = "CLIPMAPS_TEST_DOWNLOAD_FAIL"


class CountingFileSystem(LocalFileSystem):
    """Local files under ``countingfile://``; every open of a weights file (not its sidecar) for reading appends
    ``<pid>`` to the file named by ``$CLIPMAPS_TEST_DOWNLOAD_LOG`` (O_APPEND: safe across processes)."""

    protocol = (PROTOCOL,)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3 :]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode and not str(path).endswith(".sha256") and os.environ.get(LOG_ENV):
            with open(os.environ[LOG_ENV], "a") as log:
                log.write(f"{os.getpid()}\n")
            time.sleep(float(os.environ.get(SLOW_ENV, "0")))  # widen the window in which a racer could also start
            if os.environ.get(FAIL_ENV):
                raise ConnectionError("simulated network failure")
        return super()._open(path, mode=mode, **kwargs)


def register() -> None:
    import fsspec

    fsspec.register_implementation(PROTOCOL, CountingFileSystem, clobber=True)


def _uri(path: Path) -> str:
    return f"{PROTOCOL}://{path}"


def _downloads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A 'remote' weights file (3 MB of seeded bytes) with its sha256, the download log and a cache dir."""
    register()
    data = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)
    src = tmp_path / "bucket" / "models" / "tiny.safetensors"
    src.parent.mkdir(parents=True)
    src.write_bytes(data)
    log = tmp_path / "downloads.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    return {
        "src": src,
        "uri": _uri(src),
        "sha": hashlib.sha256(data).hexdigest(),
        "data": data,
        "log": log,
        "cache": tmp_path / "cache",
    }


def _race_worker(uri: str, cache: str, sha: str | None, barrier, out: str) -> None:
    register()
    barrier.wait(timeout=60)
    path = cached_weights(uri, cache_dir=cache, sha256=sha)
    Path(out).write_text(str(path))


@pytest.mark.parametrize("with_sha", [True, False], ids=["sha256-given", "sidecar"])
def test_racing_processes_download_once(remote, tmp_path, monkeypatch, with_sha):
    if not with_sha:
        Path(str(remote["src"]) + ".sha256").write_text(f"{remote['sha']}  tiny.safetensors\n")
    monkeypatch.setenv(SLOW_ENV, "0.5")
    ctx = mp.get_context("spawn")  # fresh interpreters, as separate actors on one node are
    n = 3
    barrier = ctx.Barrier(n)
    outs = [tmp_path / f"out-{i}.txt" for i in range(n)]
    procs = [
        ctx.Process(
            target=_race_worker,
            args=(remote["uri"], str(remote["cache"]), remote["sha"] if with_sha else None, barrier, str(out)),
        )
        for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n
    paths = {out.read_text() for out in outs}
    assert len(paths) == 1, paths
    assert _downloads(remote["log"]) == 1
    cached = Path(paths.pop())
    assert cached.read_bytes() == remote["data"] and cached.name == "tiny.safetensors"
    assert cached.parent == cache_entry(remote["uri"], remote["cache"])
    assert not list(cached.parent.glob("*.part")) and not list(cached.parent.glob(".*.part"))


def test_cached_copy_is_reused_and_a_new_checksum_downloads_again(remote):
    first = cached_weights(remote["uri"], cache_dir=remote["cache"], sha256=remote["sha"])
    again = cached_weights(remote["uri"], cache_dir=remote["cache"], sha256=remote["sha"])
    unverified = cached_weights(remote["uri"], cache_dir=remote["cache"])  # no digest, no sidecar: the cached copy
    assert first == again == unverified and _downloads(remote["log"]) == 1
    # new weights uploaded under the same URI, with their sidecar: the expected digest changes, so it is fetched
    new = b"other weights" * 1000
    remote["src"].write_bytes(new)
    Path(str(remote["src"]) + ".sha256").write_text(hashlib.sha256(new).hexdigest() + "\n")
    assert cached_weights(remote["uri"], cache_dir=remote["cache"]).read_bytes() == new
    assert _downloads(remote["log"]) == 2


def test_checksum_mismatch_is_refused_and_the_bad_file_removed(remote):
    wrong = "0" * 64
    with pytest.raises(WeightsChecksumError) as e:
        cached_weights(remote["uri"], cache_dir=remote["cache"], sha256=wrong)
    message = str(e.value)
    assert remote["sha"] in message and wrong in message and "tiny.safetensors" in message and "removed" in message
    entry = cache_entry(remote["uri"], remote["cache"])
    assert not (entry / "tiny.safetensors").exists() and not (entry / "meta.json").exists()
    assert not [p for p in entry.iterdir() if p.name.endswith(".part")]
    # a good copy in the cache is not served for a different expected digest either
    cached_weights(remote["uri"], cache_dir=remote["cache"], sha256=remote["sha"])
    with pytest.raises(WeightsChecksumError):
        cached_weights(remote["uri"], cache_dir=remote["cache"], sha256=wrong)
    assert not (entry / "tiny.safetensors").exists()


def test_wrong_sidecar_is_refused(remote):
    Path(str(remote["src"]) + ".sha256").write_text("f" * 64 + "  tiny.safetensors\n")
    with pytest.raises(WeightsChecksumError, match=r"tiny\.safetensors\.sha256"):
        cached_weights(remote["uri"], cache_dir=remote["cache"])
    Path(str(remote["src"]) + ".sha256").write_text("not a digest\n")
    with pytest.raises(ValueError, match="64 hexadecimal"):
        cached_weights(remote["uri"], cache_dir=remote["cache"])
    with pytest.raises(ValueError, match="64 hexadecimal"):
        cached_weights(remote["uri"], cache_dir=remote["cache"], sha256="abc")


def test_failed_download_leaves_nothing_behind(remote, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1")
    with pytest.raises(ConnectionError):
        cached_weights(remote["uri"], cache_dir=remote["cache"], sha256=remote["sha"])
    entry = cache_entry(remote["uri"], remote["cache"])
    assert not (entry / "tiny.safetensors").exists()
    monkeypatch.delenv(FAIL_ENV)
    assert cached_weights(remote["uri"], cache_dir=remote["cache"], sha256=remote["sha"]).read_bytes() == remote["data"]


def test_missing_remote_file(remote):
    with pytest.raises(FileNotFoundError):
        cached_weights(_uri(remote["src"].with_name("nope.safetensors")), cache_dir=remote["cache"])


def test_local_paths_are_verified_in_place(remote):
    src = remote["src"]
    assert is_local(str(src)) and is_local(f"file://{src}") and not is_local(remote["uri"])
    assert cached_weights(str(src), cache_dir=remote["cache"]) == src
    assert cached_weights(f"file://{src}", sha256=remote["sha"].upper()) == src
    with pytest.raises(WeightsChecksumError):
        cached_weights(str(src), sha256="1" * 64)
    assert src.exists()  # the user's own file is never deleted
    Path(str(src) + ".sha256").write_text("1" * 64 + "\n")
    with pytest.raises(WeightsChecksumError, match="sha256"):
        cached_weights(str(src))
    assert not remote["cache"].exists()  # local files are never copied
    with pytest.raises(FileNotFoundError):
        cached_weights(str(src.with_name("nope.safetensors")))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "clipmaps" / "weights"


def test_s3_weights_are_cached_and_load(s3, tmp_path, monkeypatch, tiny_vit):
    """The real thing: safetensors on an S3 server with a sidecar, fetched through the cache, loaded into a model."""
    from clipmaps.actors.models import load_model, save_weights, state_dict_sha256
    from clipmaps.actors.weights_cache import file_sha256

    local = save_weights(tiny_vit.model, tmp_path / "tiny.safetensors")
    fs = s3.filesystem()
    key = f"{s3.bucket}/weights-cache-test/{os.getpid()}/clipmaps-tiny-vit.safetensors"
    fs.put_file(str(local), key)
    fs.pipe_file(key + ".sha256", f"{file_sha256(local)}  clipmaps-tiny-vit.safetensors\n".encode())
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    uri = f"s3://{key}"
    path = cached_weights(uri, storage_options=s3.storage_options)
    assert path.parent == cache_entry(uri, tmp_path / "cache")
    assert cached_weights(uri, storage_options=s3.storage_options) == path
    loaded = load_model("clipmaps-tiny-vit", weights=str(path))
    assert state_dict_sha256(loaded.model) == state_dict_sha256(tiny_vit.model)
    fs.pipe_file(key + ".sha256", b"0" * 64 + b"\n")
    with pytest.raises(WeightsChecksumError):
        cached_weights(uri, storage_options=s3.storage_options)
    assert not path.exists()


def test_credentials_in_weights_uris_are_never_shown(s3, tmp_path, monkeypatch, caplog):
    """A presigned URL (its signature and credential in the query) and a ``user:secret@`` URI: the cached file's
    name, ``meta.json``, the log and the errors raised carry neither (clients quote them without the scheme)."""
    import json
    import logging

    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options, config_kwargs={"signature_version": "s3v4"})
    key = f"{s3.bucket}/weights-cache-test/{os.getpid()}/presigned.safetensors"
    data = b"presigned weights" * 1000
    fs.pipe_file(key, data)
    presigned = fs.sign(key, expiration=600)  # X-Amz-Algorithm, -Credential, -Date, -Expires, -Signature…
    query = dict(item.split("=", 1) for item in presigned.split("?", 1)[1].split("&"))
    secrets = [query["X-Amz-Signature"], query["X-Amz-Credential"], s3.secret]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    caplog.set_level(logging.DEBUG, logger="clipmaps")  # fsspec's own DEBUG log prints the URLs it requests
    path = cached_weights(presigned)  # no digest, no sidecar: downloaded unverified, with a warning
    assert path.read_bytes() == data and path.name == "presigned.safetensors"
    meta = (path.parent / "meta.json").read_text()
    assert "X-Amz-Signature=***" in json.loads(meta)["uri"]
    planted = "planted-se/cr+et@x"
    with pytest.raises(Exception) as failed:  # noqa: PT011 - s3fs's own error type, redacted
        cached_weights(f"s3://AKIAPLANTED:{planted}@{key}", storage_options=s3.storage_options)
    shown = [meta, caplog.text, str(failed.value), repr(failed.value)]
    for secret in [*secrets, planted, "AKIAPLANTED"]:
        assert not [text for text in shown if secret in text], secret
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
