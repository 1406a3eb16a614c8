"""Model weights from object storage: downloaded once per node into a local cache, verified by sha256.

A job on a cluster without model-hub access names its weights by URI (``model.weights: s3://models/ViT-B-16.safetensors``).
Every actor that loads the model calls :func:`cached_weights`, which returns a local file:

* the cache directory is ``cache_dir``, else ``$CLIPMAPS_CACHE``, else ``~/.cache/clipmaps/weights``; one entry per
  URI (a folder named by a hash of the URI) holding the file under its own name and ``meta.json``;
* a file lock per entry makes concurrent callers on one node (several actors, several processes) wait for a single
  download instead of each downloading; the download goes to a temporary file that is renamed into place only once
  complete and verified, so a crashed download never looks like a cached file;
* the expected sha256 is ``sha256=`` (the job spec's ``model.weights_sha256``) or, when not given, the first word of a
  ``<uri>.sha256`` sidecar file (``sha256sum`` output) if one exists (not looked for beside a presigned URL). A
  mismatch raises :class:`WeightsChecksumError` and the bad file is removed. Without either, the file is used
  unverified (a warning names the digest it had).
* a cached copy is reused while its recorded sha256 equals the expected one (no re-hashing); when the expected
  digest changes (new weights uploaded under the same URI, with a new sidecar), the file is downloaded again.

Local paths (and ``file://`` URIs) are not copied: they are verified in place when a digest is known.

The lock is an OS file lock (``filelock``), so the cache must live on a node-local filesystem (a Kubernetes
``emptyDir`` or ``hostPath``), not on NFS. Imports no torch and no Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
from pathlib import Path

from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import filesystem, redact_error, redact_uri, uri_scheme

logger = logging.getLogger(__name__)

#: Environment variable naming the cache directory.
CACHE_ENV = "CLIPMAPS_CACHE"
#: Suffix of the checksum sidecar next to a weights file.
SIDECAR_SUFFIX = ".sha256"
_CHUNK = 8 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

__all__ = [
    "CACHE_ENV",
    "WeightsChecksumError",
    "cache_entry",
    "cached_weights",
    "default_cache_dir",
    "file_sha256",
    "is_local",
]


class WeightsChecksumError(ConfigError):
    """The weights' sha256 is not the expected one (the bad download has been removed). A configuration error:
    re-running cannot fix it (CLI exit code 2)."""

    default_stage = "model"


def default_cache_dir() -> Path:
    """``$CLIPMAPS_CACHE`` if set, else ``~/.cache/clipmaps/weights``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clipmaps" / "weights"


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a local path or a ``file://``/``local://`` URI (read in place, never cached)."""
    return uri_scheme(uri) in ("file", "local")


def _local_path(uri: str) -> Path:
    return Path(uri.split("://", 1)[1] if "://" in uri else uri).expanduser()


def _normalise_digest(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    digest = value.strip().lower()
    if digest.startswith("sha256:"):
        digest = digest[len("sha256:") :]
    if not _HEX64.match(digest):
        raise ValueError(f"{what} must be 64 hexadecimal digits (a sha256), got {value!r}")
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_entry(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of ``uri``: ``<cache_dir>/<first 32 hex digits of sha256(uri)>``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / hashlib.sha256(uri.encode("utf-8")).hexdigest()[:32]


def cached_weights(
    uri: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    storage_options: dict | None = None,
    lock_timeout_s: float = 3600.0,
) -> Path:
    """A local file holding the weights at ``uri``, downloaded at most once per cache directory.

    Args:
        uri: local path or fsspec URI (``s3://…``, ``gs://…``, ``https://…``, presigned URLs) of a weights file.
        cache_dir: cache directory (default :func:`default_cache_dir`).
        sha256: expected hex digest; ``None`` = the ``<uri>.sha256`` sidecar when there is one.
        storage_options: fsspec options for ``uri`` (s3: ``key``, ``secret``, ``client_kwargs``…; empty = the
            standard AWS environment).
        lock_timeout_s: how long to wait for another process's download of the same URI.

    Returns:
        The path of the verified local file (``<entry>/<file name>``, or ``uri`` itself for local paths).

    Raises:
        WeightsChecksumError: the file's sha256 differs from the expected one (a bad download is removed first).
        FileNotFoundError: nothing at ``uri``.
        ValueError: ``sha256`` or the sidecar is not a sha256.
        filelock.Timeout: another process held the download lock for longer than ``lock_timeout_s``.
        Exception: the filesystem's own errors, of the same type (``OSError`` when that type cannot be rebuilt) with
            the URI's credentials and the storage options' secrets taken out of the message.

    Every URI this function logs, puts in a message or writes into ``meta.json`` is redacted
    (``clipmaps.schemas.storage.redact_uri``).
    """
    expected = _normalise_digest(sha256, "sha256")
    if is_local(uri):
        return _verify_local(uri, expected)
    try:
        return _cached_remote(uri, cache_dir, expected, storage_options or {}, lock_timeout_s)
    except Exception as e:
        # client errors quote the URI's credentials (botocore: 'Invalid bucket name "user:secret@bucket"'); the
        # actor's traceback goes to Ray's worker logs
        clean = redact_error(e, storage_options=storage_options, uris=[uri])
        if clean is e:
            raise
        raise clean from None


def _cached_remote(uri: str, cache_dir, expected: str | None, storage_options: dict, lock_timeout_s: float) -> Path:
    from filelock import FileLock

    fs, path = filesystem(uri, storage_options)
    source = "sha256="
    if expected is None:
        expected = _read_sidecar(fs, path, uri)
        source = f"{redact_uri(uri)}{SIDECAR_SUFFIX}"
    entry = cache_entry(uri, cache_dir)
    # the name without a query: a presigned URL's signature must not become a local file name that logs show
    name = posixpath.basename(path.split("?", 1)[0].rstrip("/")) or "weights"
    target, meta = entry / name, entry / "meta.json"
    if _cached(target, meta, expected):
        return target
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.parent / f"{entry.name}.lock"), timeout=lock_timeout_s):
        if _cached(target, meta, expected):  # another process finished the download while we waited
            return target
        entry.mkdir(parents=True, exist_ok=True)
        for stale in (meta, target):  # meta first: a cache entry without meta.json is never trusted
            stale.unlink(missing_ok=True)
        _download(fs, path, uri, entry, target, meta, expected, source)
    return target


# --------------------------------------------------------------------------------------------------- internals


def _verify_local(uri: str, expected: str | None) -> Path:
    path = _local_path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    source = "sha256="
    if expected is None:
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        if not sidecar.is_file():
            return path
        expected = _parse_sidecar(sidecar.read_text(errors="replace"), str(sidecar))
        source = str(sidecar)
    digest = file_sha256(path)
    if digest != expected:  # the user's own file: reported, never deleted
        raise WeightsChecksumError(f"sha256 of {path} is {digest}, expected {expected} (from {source})")
    return path


def _parse_sidecar(text: str, where: str) -> str:
    words = text.split()
    if not words:
        raise ValueError(f"checksum sidecar {where} is empty (expected `sha256sum` output)")
    digest = _normalise_digest(words[0], f"the first word of {where}")
    assert digest is not None
    return digest


def _read_sidecar(fs, path: str, uri: str) -> str | None:
    if "?" in uri:  # a presigned URL: its signature covers its own key only, the sidecar's URL is unknown
        return None
    where = f"{redact_uri(uri)}{SIDECAR_SUFFIX}"
    try:
        data = fs.cat_file(path + SIDECAR_SUFFIX)
    except (FileNotFoundError, PermissionError):
        # S3 answers 403 rather than 404 for a missing key when the caller may not list the bucket
        return None
    return _parse_sidecar(data.decode("utf-8", errors="replace"), where)


def _cached(target: Path, meta: Path, expected: str | None) -> bool:
    try:
        info = json.loads(meta.read_text())
        size = target.stat().st_size
    except (OSError, ValueError):
        return False
    if info.get("size") != size:
        return False
    if expected is not None and info.get("sha256") != expected:
        logger.info("cached %s has sha256 %s, expected %s: downloading again", target, info.get("sha256"), expected)
        return False
    return True


def _download(
    fs, path: str, uri: str, entry: Path, target: Path, meta: Path, expected: str | None, source: str
) -> None:
    started = time.time()
    tmp = entry / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    h = hashlib.sha256()
    size = 0
    try:
        with fs.open(path, "rb") as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                h.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        digest = h.hexdigest()
        if expected is not None and digest != expected:
            raise WeightsChecksumError(
                f"sha256 of {redact_uri(uri)} is {digest}, expected {expected} (from {source}); the downloaded file "
                f"was removed — check that the weights and their checksum were uploaded together"
            )
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if expected is None:
        logger.warning(
            "weights %s are not verified: no sha256 given and no %s sidecar (sha256 of the download: %s)",
            redact_uri(uri),
            SIDECAR_SUFFIX,
            digest,
        )
    doc = {
        "uri": redact_uri(uri),
        "sha256": digest,
        "size": size,
        "verified": expected is not None,
        "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "seconds": round(time.time() - started, 3),
    }
    tmp_meta = entry / f".meta.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    tmp_meta.write_text(json.dumps(doc, indent=2))
    os.replace(tmp_meta, meta)
    logger.info(
        "downloaded %s (%d bytes, sha256 %s) to %s in %.1f s", redact_uri(uri), size, digest, target, doc["seconds"]
    )
