"""A fault-injecting HTTP proxy for S3 tests: forwards to a real S3 endpoint, breaks a seeded share of requests.

    with FaultProxy("http://127.0.0.1:8333", rate=0.1, seed=7) as proxy:
        fs = s3fs.S3FileSystem(..., client_kwargs={"endpoint_url": proxy.endpoint})
        ...
    proxy.counts  # Counter: requests, forwarded, and one entry per injected fault kind

It listens on 127.0.0.1 on a random port. Each request is read whole (``Content-Length`` or chunked bodies,
``Expect: 100-continue`` answered by the proxy), then, with probability ``rate``, one fault is injected:

=============== ========================================================================================
``http500``     ``500 InternalError`` with S3's XML error body; the request never reaches the server
``http503``     ``503 ServiceUnavailable`` (XML body)
``slowdown``    ``503 SlowDown`` ("Please reduce your request rate."), S3's throttling answer
``reset``       the client connection is reset (RST) before the request is forwarded
``reset_after`` the request is forwarded and executed, then the connection is reset instead of answering:
                the client cannot know that its PUT/DELETE/COPY happened and must retry it
``latency``     the request is forwarded after an added delay (``latency_s``)
=============== ========================================================================================

``only(method, path)`` restricts faults to some requests (e.g. PUTs of result files).

Headers are forwarded unchanged (``Host`` included), so SigV4 signatures made for the proxy's address verify at the
server. The choice of fault is drawn from ``random.Random(seed)`` under a lock: the sequence of decisions is
reproducible, their assignment to concurrent requests is not. ``events`` lists ``(method, path, kind)`` per request,
from which :meth:`retried` tells how many broken requests were sent again.

Every wait is bounded: sockets have timeouts, and :meth:`stop` joins threads with a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

KINDS: dict[str, float] = {
    "http500": 1.0,
    "http503": 1.0,
    "slowdown": 1.0,
    "reset": 1.0,
    "reset_after": 1.0,
    "latency": 1.0,
}
_ERRORS = {
    "http500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "http503": (503, "Service Unavailable", "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}
_MAX_HEAD = 64 * 1024
_SOCKET_TIMEOUT_S = 30.0


class FaultProxy:
    """See the module docstring. ``kinds`` maps fault kind → relative weight (``KINDS`` by default)."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.1,
        seed: int = 0,
        kinds: dict[str, float] | None = None,
        latency_s: tuple[float, float] = (0.05, 0.4),
        only=None,
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate = rate
        self.kinds = dict(kinds or KINDS)
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(KINDS)}")
        self.latency_s = latency_s
        self.only = only  # (method, path) -> bool: which requests may get a fault (default: all)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.events: list[tuple[str, str, str]] = []
        self.enabled = True
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        t = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            self._server.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ reporting
    def injected(self) -> int:
        """How many requests got a fault (latency included)."""
        return sum(self.counts[k] for k in KINDS)

    def retried(self) -> tuple[int, int]:
        """``(broken, sent_again)``: requests that got an error or a reset, and how many of them were sent again
        (a later request with the same method and path)."""
        with self._lock:
            events = list(self.events)
        broken = sent_again = 0
        for i, (method, path, kind) in enumerate(events):
            if kind in ("", "latency"):
                continue
            broken += 1
            if any(m == method and p == path for m, p, _ in events[i + 1 :]):
                sent_again += 1
        return broken, sent_again

    # ------------------------------------------------------------------ serving
    def _decide(self, method: str, path: str) -> str:
        if self.only is not None and not self.only(method, path):
            return ""
        with self._lock:
            if not self.enabled or self._rng.random() >= self.rate:
                return ""
            names = list(self.kinds)
            return self._rng.choices(names, weights=[self.kinds[n] for n in names])[0]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(_SOCKET_TIMEOUT_S)
            t = threading.Thread(target=self._serve, args=(conn,), name="faultproxy-conn", daemon=True)
            t.start()
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            for _ in range(10_000):  # requests on one keep-alive connection
                if self._stop.is_set() or not self._one(conn, reader):
                    return
        except (OSError, ValueError, http.client.HTTPException):
            return
        finally:
            with contextlib.suppress(OSError):
                reader.close()
                conn.close()

    def _one(self, conn: socket.socket, reader) -> bool:
        """Handle one request; False when the connection is finished."""
        line = reader.readline(_MAX_HEAD)
        if not line or not line.strip():
            return False
        method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: list[tuple[str, str]] = []
        for _ in range(200):
            h = reader.readline(_MAX_HEAD)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        lower = {k.lower(): v for k, v in headers}
        path = urlsplit(target).path
        kind = self._decide(method, path)
        with self._lock:
            self.counts["requests"] += 1
            if kind:
                self.counts[kind] += 1
            self.events.append((method, path, kind))
        if lower.get("expect", "").lower() == "100-continue":
            if kind in _ERRORS:  # answer before the body, as a server would
                self._send_error(conn, kind)
                return False
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._read_body(reader, lower)
        if kind in _ERRORS:
            self._send_error(conn, kind)
            return False
        if kind == "reset":
            _reset(conn)
            return False
        if kind == "latency":
            time.sleep(random.uniform(*self.latency_s))
        status_line, out_headers, payload = self._forward(method, target, headers, body)
        if kind == "reset_after":
            _reset(conn)
            return False
        head = status_line + "".join(f"{k}: {v}\r\n" for k, v in out_headers) + "\r\n"
        conn.sendall(head.encode("latin-1") + payload)
        with self._lock:
            self.counts["forwarded"] += 1
        return lower.get("connection", "").lower() != "close"

    @staticmethod
    def _read_body(reader, lower: dict[str, str]) -> bytes:
        if "chunked" in lower.get("transfer-encoding", "").lower():
            raw = bytearray()
            for _ in range(1_000_000):
                size_line = reader.readline(_MAX_HEAD)
                raw += size_line
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(200):  # trailers up to the empty line
                        t = reader.readline(_MAX_HEAD)
                        raw += t
                        if t in (b"\r\n", b"\n", b""):
                            break
                    return bytes(raw)
                raw += reader.read(size + 2)
            raise ValueError("too many chunks")
        length = int(lower.get("content-length", "0") or 0)
        return reader.read(length) if length else b""

    def _forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes):
        up = socket.create_connection(self.upstream, timeout=_SOCKET_TIMEOUT_S)
        try:
            sent = [(k, v) for k, v in headers if k.lower() not in ("expect", "connection")]
            head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in sent)
            up.sendall((head + "Connection: close\r\n\r\n").encode("latin-1") + body)
            resp = http.client.HTTPResponse(up, method=method)
            resp.begin()
            payload = resp.read()
            out = []
            for k, v in resp.getheaders():
                if k.lower() in ("transfer-encoding", "connection") or (
                    k.lower() == "content-length" and method != "HEAD"
                ):
                    continue
                out.append((k, v))
            if method != "HEAD" and resp.status not in (204, 304):
                out.append(("Content-Length", str(len(payload))))
            return f"HTTP/1.1 {resp.status} {resp.reason}\r\n", out, payload
        finally:
            up.close()

    @staticmethod
    def _send_error(conn: socket.socket, kind: str) -> None:
        status, reason, code, message = _ERRORS[kind]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        conn.sendall(head.encode() + body)


def _reset(conn: socket.socket) -> None:
    """Close ``conn`` with a TCP RST (SO_LINGER 0) rather than a FIN."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
