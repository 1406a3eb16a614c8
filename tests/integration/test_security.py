"""Security through the real pipeline: weights only from safetensors or ``weights_only=True`` (a pickled payload in
a ``.pt`` is refused and never runs), job specs only through safe YAML, secrets never in logs, ``_job.json`` or
outputs, and manifest URIs limited to the allowed schemes (a refused URI is never fetched)."""

from __future__ import annotations

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

import pyarrow.dataset as pads
import pytest
import torch

from clipmaps.jobs.cli import main
from clipmaps.jobs.synth.scenes import make_scene
from clipmaps.pipeline.spec import SpecError, load_spec
from clipmaps.schemas.encodings import rle_encode
from tests.helpers.specs import JOB_SPEC

ROOT = Path(__file__).resolve().parents[2]
URI_SECRET = "uri-planted-secret-7f3a9c"  # in the userinfo of an image URI


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
    stops with a clear error naming the file, ``_job.json`` says ``failed``, and the command never ran."""
    import ray

    from clipmaps.pipeline.run import JobFailed, run

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
        with pytest.raises(JobFailed, match="not a safetensors file or a plain state dict") as info:
            run(spec)
    finally:
        ray.shutdown()
    assert "evil.pt" in str(info.value) and "re-run" in str(info.value)
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


@pytest.fixture(scope="module")
def secret_run(s3, tmp_path_factory):
    """One ``clipmaps run`` (a subprocess with its own Ray, whose session logs go to a private RAY_TMPDIR) on S3,
    with the S3 secret in every storage_options, a secret in an image URI's userinfo, and URIs of refused schemes."""
    tmp = tmp_path_factory.mktemp("secrets")
    fs = s3.filesystem()
    prefix = f"s3://{s3.bucket}/secrets-{uuid.uuid4().hex[:8]}"
    rows = _scenes(tmp / "in", 3, put=lambda p, uri: fs.put(str(p), uri), prefix=prefix)
    listener = _Listener()
    http_uri = f"http://127.0.0.1:{listener.port}/image.png"
    planted = f"s3://AKIAPLANTED:{URI_SECRET}@{s3.bucket}/{prefix.rsplit('/', 1)[1]}/s0.png"
    rows += [
        {"image_id": "userinfo", "image_uri": planted},
        {"image_id": "http", "image_uri": http_uri},
        {"image_id": "gs", "image_uri": "gs://other-bucket/image.png"},
        {"image_id": "ftp", "image_uri": "ftp://127.0.0.1/image.png"},
        {"image_id": "mask-http", "image_uri": rows[0]["image_uri"],
         "masks": [{"region_id": "m", "uri": f"http://127.0.0.1:{listener.port}/mask.png"}]},
        {"image_id": "missing", "image_uri": f"{prefix}/no-such-image.png"},
    ]  # fmt: skip
    fs.pipe(f"{prefix}/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    opts = s3.storage_options
    spec = load_spec(JOB_SPEC, overrides=_sets(f"{prefix}/manifest.jsonl", f"{prefix}/out"))
    data = spec.to_dict(redact=False)
    for section in ("input", "output", "model"):
        data[section]["storage_options"] = opts
    job = tmp / "job.yaml"
    job.write_text(json.dumps(data))  # JSON is YAML
    ray_tmp = tempfile.mkdtemp(prefix="cmsec", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_SECRET_ACCESS_KEY")}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "clipmaps.jobs.cli", "-v", "run", str(job)], cwd=ROOT, env=env,
                              capture_output=True, timeout=400)  # fmt: skip
        logs = {}
        for path in Path(ray_tmp).rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    logs[str(path)] = path.read_bytes()
                except OSError:
                    continue
        out = {p: fs.cat(p) for p in fs.find(f"{prefix}/out")}
        yield {"proc": proc, "logs": logs, "out": out, "fs": fs, "prefix": prefix, "listener": listener,
               "secret": s3.secret, "rows": rows}  # fmt: skip
    finally:
        listener.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_secrets_are_in_no_log_job_json_or_output(secret_run):
    r = secret_run
    proc = r["proc"]
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert len(r["out"]) >= 6 and len(r["logs"]) >= 5, (len(r["out"]), len(r["logs"]))
    places = {"stdout": proc.stdout, "stderr": proc.stderr, **r["logs"], **r["out"]}
    for secret in (r["secret"], URI_SECRET):
        leaks = [where for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"{secret!r} written to {leaks}"
    job = json.loads(next(v for k, v in r["out"].items() if k.endswith("_job.json")))
    assert job["spec"]["input"]["storage_options"]["secret"] == "***"
    # the URI with credentials was used (read, failed on its bucket name) and shows redacted
    errors = pads.dataset(f"{r['prefix']}/out/errors".removeprefix("s3://"), filesystem=r["fs"]).to_table()
    row = next(e for e in errors.to_pylist() if e["image_id"] == "userinfo")
    assert row["stage"] == "read" and row["uri"].startswith("s3://***@")


def test_manifest_uris_are_limited_to_the_allowed_schemes(secret_run):
    r = secret_run
    errors = pads.dataset(f"{r['prefix']}/out/errors".removeprefix("s3://"), filesystem=r["fs"]).to_table()
    by_id = {e["image_id"]: e for e in errors.to_pylist()}
    for image_id in ("http", "gs", "ftp", "mask-http"):
        assert (by_id[image_id]["stage"], by_id[image_id]["error_type"]) == ("manifest", "UnsupportedScheme")
        assert "allowed: file, s3" in by_id[image_id]["message"]
    assert r["listener"].connections == 0, "a refused http:// URI was fetched"
    labels = pads.dataset(f"{r['prefix']}/out/labels".removeprefix("s3://"), filesystem=r["fs"]).to_table()
    assert sorted(labels.column("image_id").to_pylist()) == ["s0", "s1", "s2"]
    assert by_id["missing"]["stage"] == "read" and by_id["missing"]["error_type"] == "FileNotFoundError"
