"""Reading the bytes of an image or mask URI: scheme check, fsspec read, retries of transient errors, and a
:class:`~clipmaps.schemas.errors.RowError` (stage ``read``) whose message names the URI without its secrets."""

from __future__ import annotations

import errno
import logging
import random
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec

from clipmaps.schemas.errors import RowError
from clipmaps.schemas.storage import redact_text, redact_uri, scheme_error

if TYPE_CHECKING:
    from .stage import DecodeConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ENETRESET,
}
_TRANSIENT_NAMES = {  # by name, so that no client library needs importing (aiohttp, botocore, urllib3, gcsfs…)
    "ClientConnectionError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ClientPayloadError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "IncompleteReadError",
    "ResponseStreamingError",
    "ProtocolError",
    "HttpError",
    "TransportError",
}
_TRANSIENT_TEXT = re.compile(
    r"\b(500|502|503|504|429)\b|slow ?down|throttl|service unavailable|internal ?(server )?error|timed? ?out|"
    r"temporar|connection (reset|aborted|refused|closed)|too many requests|bad gateway|request ?timeout",
    re.IGNORECASE,
)
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, RowError, ValueError)


def is_transient(exc: BaseException, _depth: int = 0) -> bool:
    """Whether a read error is worth retrying: connection errors, timeouts, 5xx/429/throttling (also as the cause
    of another error). Missing files, permission errors, bad arguments and :class:`RowError` are final."""
    if _unreachable(exc):
        return True
    if isinstance(exc, _FINAL):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and (exc.errno in _TRANSIENT_ERRNOS or _TRANSIENT_TEXT.search(str(exc))):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and _depth < 3 and is_transient(cause, _depth + 1)


def fetch_bytes(uri: Any, config: DecodeConfig, *, what: str = "image") -> bytes:
    """All bytes at ``uri`` via ``fsspec.open`` with ``config.storage_options``, retrying transient errors
    ``config.retries`` times with exponential back-off and jitter.

    Raises:
        RowError: stage ``read``: ``MissingImageUri``, ``UnsupportedScheme`` (not in ``config.allowed_schemes``;
            nothing is fetched), ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, or the client's
            error type with its message scrubbed of secrets.
    """

    def read() -> bytes:
        with fsspec.open(uri, "rb", **config.options_for(uri)) as f:
            return f.read()

    return with_retries(read, uri, config, what=what)


def with_retries(op: Callable[[], T], uri: Any, config: DecodeConfig, *, what: str = "image") -> T:
    """``op()``, an I/O operation on ``uri`` (a read, a listing, a Parquet scan), with the retries of
    :func:`fetch_bytes`: the scheme is checked first, transient errors (:func:`is_transient`) are retried
    ``config.retries`` times with exponential back-off and jitter, any other error is final.

    Raises:
        RowError: stage ``read``, as :func:`fetch_bytes` (a :class:`RowError` raised by ``op`` passes unchanged).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise RowError("read", "MissingImageUri", f"{what} URI is missing or empty")
    refused = scheme_error(uri, config.allowed_schemes)
    if refused is not None:
        raise RowError("read", "UnsupportedScheme", refused)
    attempts = config.retries + 1
    for attempt in range(attempts):
        try:
            return op()
        except Exception as e:  # noqa: BLE001 — classified below
            if attempt + 1 < attempts and is_transient(e):
                delay = config.retry_backoff_s * (2**attempt) * (1 + random.random() / 2)
                log.debug(
                    "transient error reading %s (%s); retrying in %.2f s", redact_uri(uri), type(e).__name__, delay
                )
                time.sleep(delay)
                continue
            raise read_error(e, uri, config.storage_options, attempt + 1) from None
    raise AssertionError("unreachable")


def _unreachable(exc: BaseException) -> BaseException | None:
    """The connection error behind a ``FileNotFoundError`` (fsspec's HTTP filesystem raises one when it cannot
    connect at all, with the client's error as its cause); None for a file that is really missing."""
    cause = exc.__cause__ if isinstance(exc, FileNotFoundError) else None
    return cause if cause is not None and is_transient(cause) else None


def read_error(e: BaseException, uri: Any, storage_options: dict, attempts: int = 1) -> RowError:
    """``e``, raised while reading ``uri``, as a :class:`RowError` of stage ``read`` naming the redacted URI; a
    client's message is scrubbed of the URI's credentials and the storage options' secrets (clients quote them)."""
    if isinstance(e, RowError):
        return e
    shown = redact_uri(uri)
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    if (cause := _unreachable(e)) is not None:
        detail = redact_text(str(cause) or type(cause).__name__, storage_options=storage_options, uris=[uri])
        return RowError("read", type(cause).__name__, f"{shown}: cannot connect ({detail}){tries}")
    if isinstance(e, FileNotFoundError):
        return RowError("read", "FileNotFoundError", f"{shown}: not found")
    if isinstance(e, PermissionError):
        return RowError("read", "PermissionError", f"{shown}: permission denied")
    if isinstance(e, IsADirectoryError):
        return RowError("read", "IsADirectoryError", f"{shown}: is a directory, not a file")
    detail = redact_text(str(e) or type(e).__name__, storage_options=storage_options, uris=[uri])
    return RowError("read", type(e).__name__, f"{shown}: {detail}{tries}")
