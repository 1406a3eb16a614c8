"""Security through the real pipeline: weights only from safetensors or ``weights_only=True`` (a pickled payload in
a ``.pt`` is refused and never runs), job specs only through safe YAML, secrets (storage options, ``user:secret@``
URIs, presigned URLs) never in logs, ``_job.json``, outputs or the weights cache, and manifest URIs limited to the
allowed schemes (a refused URI is never fetched)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from clipmaps.jobs.cli import main
from clipmaps.jobs.synth.scenes import make_scene
from clipmaps.pipeline.spec import SpecError, load_spec
from clipmaps.schemas.encodings import rle_encode
from tests.helpers.specs import JOB_SPEC

ROOT = Path(__file__).resolve().parents[2]
URI_SECRET = "uri-planted-secret-7f3a9c"  # in the userinfo of image and mask URIs
SIGNATURE = "5151deadbeef0planted0signature0c0ffee"  # X-Amz-Signature of presigned image and mask URLs
CREDENTIAL = "AKIAPLANTEDCREDENTIAL/20240101/us-east-1/s3/aws4_request"  # their X-Amz-Credential (decoded)
WEIGHTS_SECRET = "weights-planted-secret-51e0"  # in the userinfo of the weights URI (HTTP basic auth)
HEADER_SECRET = "header-planted-token-92ab"  # an HTTP header in the model's storage options
PROXY_SECRET = "proxy-planted-secret-c4d2"  # a proxy URI's userinfo in the output's storage options
PLANTED = (URI_SECRET, SIGNATURE, CREDENTIAL, quote(CREDENTIAL, safe=""), WEIGHTS_SECRET, HEADER_SECRET, PROXY_SECRET)


class _Payload:
    """Pickles as "call os.system(command)": what a malicious checkpoint does on an unsafe ``torch.load``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _sets(manifest, out, *extra: str) -> list[str]:
    return [
        f"input.manifest={manifest}", f"output.uri={out}", "output.overwrite=false", "methods.maskclip=null",
        "methods.legrad=null", "methods.gem.size=32", "methods.maskinversion.size=32",
        "methods.maskinversion.iterations=3", "run.max_error_fraction=1.0", *extra,
    ]  # fmt: skip


def _scenes(folder: Path, count: int, put=None, prefix: str = "") -> list[dict]:
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        scene = make_scene(i, size=(64, 48), objects=1)
        path = folder / f"s{i}.png"
        scene.image.save(path)
        uri = str(path)
        if put is not None:
            uri = f"{prefix}/s{i}.png"
            put(path, uri)
        rows.append({"image_id": f"s{i}", "image_uri": uri, "prompts": scene.names,
                     "masks": [{"region_id": "0", "rle": rle_encode(scene.masks[0])}]})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------ weights
def test_pickled_weights_are_refused_through_the_pipeline(tmp_path):
    """A ``.pt`` whose unpickling would run a command: the pool actor refuses it (``weights_only=True``), the run
    stops with a configuration error naming the file (exit 2: a re-run cannot help, so none is advised),
    ``_job.json`` says ``failed``, and the command never ran."""
    import ray

    from clipmaps.pipeline.run import run
    from clipmaps.schemas.errors import ConfigError

    ran = tmp_path / "payload-ran"
    weights = tmp_path / "evil.pt"
    torch.save({"visual.proj": _Payload(f"touch {ran}")}, weights)
    rows = _scenes(tmp_path / "in", 2)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    spec = load_spec(JOB_SPEC, overrides=_sets(manifest, out, "model.seed=null", f"model.weights={weights}"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with pytest.raises(ConfigError, match="not a safetensors file or a plain state dict") as info:
            run(spec)
    finally:
        ray.shutdown()
    assert "evil.pt" in str(info.value) and "re-run" not in str(info.value) and info.value.exit_code == 2
    assert not ran.exists(), "the pickled payload ran"
    job = json.loads((out / "_job.json").read_text())
    assert job["status"] == "failed" and "weights" in job["attempts"][0]["error"].lower()


# ------------------------------------------------------------------------------------------------ YAML
def test_yaml_tags_that_build_python_objects_are_refused(tmp_path, capsys):
    ran = tmp_path / "yaml-ran"
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"input: {{manifest: m.jsonl}}\noutput: {{uri: out}}\nmodel: {{name: clipmaps-tiny-vit, seed: 0}}\n"
        f"methods: {{gem: {{}}}}\nrun: !!python/object/apply:os.system ['touch {ran}']\n"
    )
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(spec)
    assert main(["run", str(spec), "--dry-run"]) == 2
    assert "could not determine a constructor" in capsys.readouterr().err
    with pytest.raises(SpecError, match="could not determine a constructor"):  # also through --set values
        load_spec(JOB_SPEC, overrides=[f"run.max_error_fraction=!!python/object/apply:os.system ['touch {ran}']"])
    assert not ran.exists()


# ------------------------------------------------------------------------------------------------ secrets, schemes
class _Listener:
    """A TCP listener on 127.0.0.1 that counts connections: a refused http:// URI must never be fetched."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _presigned(uri: str) -> str:
    """``uri`` as a presigned S3 URL (the query of ``generate_presigned_url``, with the planted values)."""
    return (
        f"{uri}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={quote(CREDENTIAL, safe='')}"
        f"&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}"
    )


class _WeightsServer:
    """Serves one weights file over HTTP on 127.0.0.1 only to a client that sends the planted basic-auth
    credentials and header (so a finished job proves they were used); HEAD and ranged GET, as fsspec reads."""

    def __init__(self, data: bytes, user: str):
        auth = "Basic " + base64.b64encode(f"{user}:{WEIGHTS_SECRET}".encode()).decode()
        self.served = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                if self.headers.get("Authorization") != auth or self.headers.get("X-Api-Token") != HEADER_SECRET:
                    self.send_response(401)
                    self.end_headers()
                    return
                start, end = 0, len(data) - 1
                ranged = self.headers.get("Range", "").removeprefix("bytes=")
                if ranged:
                    first, _, last = ranged.partition("-")
                    start, end = int(first or 0), min(int(last) if last else end, end)
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if body:
                    outer.served += 1
                    self.wfile.write(data[start : end + 1])

            def log_message(self, *args):  # the default writes every request line to stderr
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _as_text(path: str, data: bytes) -> bytes:
    """What a reader of a file sees: Parquet decoded to its values (its compressed pages would hide a secret from a
    plain byte search), anything else as it is."""
    if not path.endswith(".parquet"):
        return data
    table = pq.read_table(pa.BufferReader(data))
    return json.dumps(table.to_pylist(), default=repr).encode()


@pytest.fixture(scope="module")
def secret_run(s3, tmp_path_factory, tiny_vit):
    """One ``clipmaps run`` (a subprocess with its own Ray, whose session logs go to a private RAY_TMPDIR) on S3 with
    secrets planted everywhere a job takes them: the S3 secret in the input's storage options and nested in the
    output's (with a proxy URI's credentials beside it); ``user:secret@`` and presigned URIs as image and mask URIs,
    read (and failing) or refused at the manifest stage; weights from an HTTP URI with basic-auth credentials and a
    token header in the model's storage options. Refused schemes are never fetched."""
    from clipmaps.actors.models import save_weights

    tmp = tmp_path_factory.mktemp("secrets")
    fs = s3.filesystem()
    prefix = f"s3://{s3.bucket}/secrets-{uuid.uuid4().hex[:8]}"
    rows = _scenes(tmp / "in", 3, put=lambda p, uri: fs.put(str(p), uri), prefix=prefix)
    listener = _Listener()
    weights = save_weights(tiny_vit.model, tmp / "tiny.safetensors").read_bytes()
    server = _WeightsServer(weights, user="weights-user")
    http_uri = f"http://127.0.0.1:{listener.port}/image.png"
    userinfo = f"s3://AKIAPLANTED:{URI_SECRET}@{s3.bucket}/{prefix.rsplit('/', 1)[1]}"
    rle = {"region_id": "ok", "rle": rle_encode(make_scene(1, size=(64, 48), objects=1).masks[0])}
    rows += [
        {"image_id": "userinfo", "image_uri": f"{userinfo}/s0.png"},
        {"image_id": "presigned", "image_uri": _presigned(f"{prefix}/s0.png")},
        {"image_id": "http", "image_uri": http_uri},
        {"image_id": "gs", "image_uri": "gs://other-bucket/image.png"},
        {"image_id": "ftp", "image_uri": "ftp://127.0.0.1/image.png"},
        {"image_id": "https-presigned", "image_uri": _presigned(f"https://{s3.bucket}.s3.amazonaws.com/s0.png")},
        {"image_id": "http-userinfo", "image_uri": f"http://AKIAPLANTED:{URI_SECRET}@127.0.0.1:{listener.port}/x.png"},
        {"image_id": "mask-http", "image_uri": rows[0]["image_uri"],
         "masks": [{"region_id": "m", "uri": f"http://127.0.0.1:{listener.port}/mask.png"}]},
        {"image_id": "mask-refused", "image_uri": rows[0]["image_uri"],
         "masks": [{"region_id": "p", "uri": _presigned(f"https://127.0.0.1:{listener.port}/mask.png")}]},
        {"image_id": "mask-secrets", "image_uri": rows[1]["image_uri"],
         "masks": [{"region_id": "userinfo", "uri": f"{userinfo}/m.png"},
                   {"region_id": "presigned", "uri": _presigned(f"{prefix}/m.png")}, rle]},
        {"image_id": "missing", "image_uri": f"{prefix}/no-such-image.png"},
    ]  # fmt: skip
    fs.pipe(f"{prefix}/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    weights_uri = f"http://weights-user:{WEIGHTS_SECRET}@127.0.0.1:{server.port}/w/tiny.safetensors"
    sha = hashlib.sha256(weights).hexdigest()
    sets = ["model.seed=null", f"model.weights={weights_uri}", f"model.weights_sha256={sha}"]
    spec = load_spec(JOB_SPEC, overrides=_sets(f"{prefix}/manifest.jsonl", f"{prefix}/out", *sets))
    data = spec.to_dict(redact=False)
    data["input"]["storage_options"] = s3.storage_options
    data["output"]["storage_options"] = {
        "client_kwargs": {"endpoint_url": s3.endpoint, "aws_access_key_id": s3.key, "aws_secret_access_key": s3.secret},
        "config_kwargs": {"proxies": {"https": f"http://proxy-user:{PROXY_SECRET}@127.0.0.1:9"}},  # http: unused
    }
    data["model"]["storage_options"] = {"client_kwargs": {"headers": {"X-Api-Token": HEADER_SECRET}}}
    job = tmp / "job.yaml"
    job.write_text(json.dumps(data))  # JSON is YAML
    ray_tmp = tempfile.mkdtemp(prefix="cmsec", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    cache = tmp / "weights-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_SECRET_ACCESS_KEY")}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", CLIPMAPS_CACHE=str(cache))
    try:
        proc = subprocess.run([sys.executable, "-m", "clipmaps.jobs.cli", "-v", "run", str(job)], cwd=ROOT, env=env,
                              capture_output=True, timeout=400)  # fmt: skip
        logs = {}
        for path in [*Path(ray_tmp).rglob("*"), *cache.rglob("*")]:
            if path.is_file() and not path.is_symlink():
                try:
                    logs[str(path)] = path.read_bytes()
                except OSError:
                    continue
        out = {p: _as_text(p, fs.cat(p)) for p in fs.find(f"{prefix}/out")}
        yield {"proc": proc, "logs": logs, "out": out, "fs": fs, "prefix": prefix, "listener": listener,
               "secret": s3.secret, "rows": rows, "cache": cache, "served": server.served}  # fmt: skip
    finally:
        listener.close()
        server.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_secrets_are_in_no_log_job_json_or_output(secret_run):
    r = secret_run
    proc = r["proc"]
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert len(r["out"]) >= 6 and len(r["logs"]) >= 5, (len(r["out"]), len(r["logs"]))
    assert r["served"] >= 1 and list(r["cache"].rglob("tiny.safetensors")), "the weights did not come from the URI"
    places = {"stdout": proc.stdout, "stderr": proc.stderr, **r["logs"], **r["out"]}
    for secret in (r["secret"], "AKIAPLANTED", *PLANTED):
        leaks = [where for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"{secret!r} written to {leaks}"
    job = json.loads(next(v for k, v in r["out"].items() if k.endswith("_job.json")))
    spec = job["spec"]
    assert spec["input"]["storage_options"]["secret"] == "***"
    assert spec["output"]["storage_options"]["client_kwargs"]["aws_secret_access_key"] == "***"
    assert spec["output"]["storage_options"]["config_kwargs"]["proxies"]["https"] == "http://***@127.0.0.1:9"
    assert spec["model"]["storage_options"]["client_kwargs"]["headers"]["X-Api-Token"] == "***"
    assert spec["model"]["weights"].startswith("http://***@127.0.0.1:")
    # the URIs with credentials were used (read, failing on their bucket name or key) and show redacted
    errors = pads.dataset(f"{r['prefix']}/out/errors".removeprefix("s3://"), filesystem=r["fs"]).to_table()
    by_id = {e["image_id"]: e for e in errors.to_pylist() if e["region_id"] is None}
    assert by_id["userinfo"]["stage"] == "read" and by_id["userinfo"]["uri"].startswith("s3://***@")
    assert by_id["presigned"]["stage"] == "read" and "X-Amz-Signature=***" in by_id["presigned"]["uri"]
    masks = {e["region_id"]: e for e in errors.to_pylist() if e["image_id"] == "mask-secrets"}
    assert set(masks) == {"userinfo", "presigned"} and {e["stage"] for e in masks.values()} == {"mask"}
    assert "s3://***@" in masks["userinfo"]["message"] and "X-Amz-Signature=***" in masks["presigned"]["message"]


def test_manifest_uris_are_limited_to_the_allowed_schemes(secret_run):
    r = secret_run
    errors = pads.dataset(f"{r['prefix']}/out/errors".removeprefix("s3://"), filesystem=r["fs"]).to_table()
    by_id = {e["image_id"]: e for e in errors.to_pylist()}
    refused = ("http", "gs", "ftp", "https-presigned", "http-userinfo", "mask-http", "mask-refused")
    for image_id in refused:
        assert (by_id[image_id]["stage"], by_id[image_id]["error_type"]) == ("manifest", "UnsupportedScheme")
        assert "allowed: file, s3" in by_id[image_id]["message"]
    assert "mask 0 (region_id 'p')" in by_id["mask-refused"]["message"]
    assert "X-Amz-Signature=***" in by_id["mask-refused"]["message"]
    assert by_id["https-presigned"]["uri"].endswith("X-Amz-Signature=***") and "***@" in by_id["http-userinfo"]["uri"]
    assert r["listener"].connections == 0, "a refused http:// URI was fetched"
    labels = pads.dataset(f"{r['prefix']}/out/labels".removeprefix("s3://"), filesystem=r["fs"]).to_table()
    assert sorted(labels.column("image_id").to_pylist()) == ["mask-secrets", "s0", "s1", "s2"]
    assert by_id["missing"]["stage"] == "read" and by_id["missing"]["error_type"] == "FileNotFoundError"
