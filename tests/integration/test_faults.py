"""Faults on real processes: SIGKILL of a method actor's worker, SIGKILL of the driver then a re-run, flaky object
storage (a fault-injecting proxy in front of the real S3 server), and a worker node lost from a multi-node cluster.

Every test checks the same contract: the job finishes (or a re-run does), every input has its rows, and no
(image, method), (image, method, prompt) or (image, region) has two. Every wait is bounded. Measured figures are
printed (``pytest -s``) with the prefix ``FIGURES``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from clipmaps.jobs.synth.scenes import make_scene
from clipmaps.pipeline.sinks import shard_of_file
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.encodings import rle_encode
from tests.helpers.specs import JOB_SPEC

ROOT = Path(__file__).resolve().parents[2]
OBJECTS = 2  # shapes (prompts, masks) per scene


# ------------------------------------------------------------------------------------------------ the job
def write_inputs(folder: Path, count: int, *, put=None, prefix: str | None = None) -> Path | str:
    """``count`` small scenes (96x72, two shapes each: two prompts, two RLE masks) and their JSONL manifest.

    With ``put`` (``put(local_path, key)``) and ``prefix`` (``s3://bucket/path``), images and manifest are uploaded
    and the manifest names the uploaded URIs."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        scene = make_scene(i, size=(96, 72), objects=OBJECTS)
        path = images / f"s{i:03d}.png"
        scene.image.save(path)
        uri = str(path)
        if put is not None:
            uri = f"{prefix}/images/s{i:03d}.png"
            put(path, uri)
        masks = [{"region_id": str(k), "rle": rle_encode(m)} for k, m in enumerate(scene.masks)]
        lines.append(json.dumps({"image_id": f"s{i:03d}", "image_uri": uri, "masks": masks, "prompts": scene.names}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    if put is not None:
        put(manifest, f"{prefix}/manifest.jsonl")
        return f"{prefix}/manifest.jsonl"
    return manifest


def job_overrides(manifest, out, *extra: str) -> list[str]:
    """GEM (label maps + heatmaps) and MaskInversion (regions) at 64 px on the tiny seeded model, two images per
    batch and per shard, so a shard is one block."""
    return [
        f"input.manifest={manifest}",
        f"output.uri={out}",
        "output.overwrite=false",
        "output.shard_rows=2",
        "methods.maskclip=null",
        "methods.legrad=null",
        "methods.gem.size=64",
        "methods.maskinversion.size=64",
        "methods.maskinversion.iterations=60",
        "methods.gem.resources.batch_size=2",
        "methods.maskinversion.resources.batch_size=2",
        *extra,
    ]


def read_outputs(out: str, fs=None) -> dict:
    return {
        name: pads.dataset(f"{out}/{name}", format="parquet", filesystem=fs).to_table()
        for name in ("labels", "heatmaps", "regions", "errors")
    }


def assert_exactly_once(tables: dict, count: int) -> None:
    """Every image has its rows, and no key appears twice."""
    ids = {f"s{i:03d}" for i in range(count)}
    keys = {
        "labels": ("image_id", "method"),
        "heatmaps": ("image_id", "method", "prompt"),
        "regions": ("image_id", "region_id"),
    }
    expected = {"labels": count, "heatmaps": count * OBJECTS, "regions": count * OBJECTS}
    for name, columns in keys.items():
        rows = list(zip(*(tables[name].column(c).to_pylist() for c in columns)))
        dups = [k for k, n in Counter(rows).items() if n > 1]
        assert not dups, f"{name}: {len(dups)} duplicated keys, e.g. {dups[:3]}"
        assert len(rows) == expected[name], f"{name}: {len(rows)} rows, expected {expected[name]}"
        assert {r[0] for r in rows} == ids, f"{name}: images missing: {sorted(ids - {r[0] for r in rows})[:5]}"
    assert tables["errors"].num_rows == 0, tables["errors"].to_pylist()[:3]


def assert_files_match_markers(out: Path) -> None:
    """Every result file belongs to a complete shard and is listed in its marker; no temporary file is left."""
    listed = set()
    for marker in (out / "_shards").glob("*.json"):
        listed |= set(json.loads(marker.read_text())["files"])
    present = {f"{p.parent.name}/{p.name}" for d in ("labels", "heatmaps", "regions", "errors")
               for p in (out / d).iterdir() if shard_of_file(p.name) is not None}  # fmt: skip
    assert present == listed, (sorted(present - listed)[:5], sorted(listed - present)[:5])
    assert not [p for p in out.rglob("_tmp-*")]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def markers(out: Path) -> set[int]:
    folder = out / "_shards"
    if not folder.exists():
        return set()
    return {int(p.name[:-5]) for p in folder.iterdir() if p.name.endswith(".json") and p.name[:-5].isdigit()}


@pytest.fixture(scope="module")
def local_ray():
    """An in-process local Ray with 2 CPUs for this module (``address="local"``: never joins another Ray that runs
    on this host, as ``ray.init()`` without an address would)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def method_actors(since: float = 0.0) -> list[dict]:
    """Alive pool actors of the connected cluster started after ``since`` (epoch seconds), from the GCS actor table
    (``Pid`` is the actor's worker process)."""
    from ray._private.state import state

    return [
        a
        for a in state.actor_table(None).values()
        if "MethodActor" in a["ActorClassName"] and a["State"] == "ALIVE" and a.get("Pid")
        and a.get("StartTime", 0) >= since * 1000
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ actor SIGKILL
def test_sigkill_of_method_actors_mid_job_loses_and_duplicates_nothing(local_ray, tmp_path):
    """Ray Data restarts a killed pool actor (``max_restarts=-1``) and re-sends the batch it was running
    (``max_task_retries=resources.task_retries``): the job finishes with every row exactly once."""
    from clipmaps.pipeline.run import run

    count = 80
    manifest = write_inputs(tmp_path / "in", count)
    out = tmp_path / "out"
    spec = load_spec(JOB_SPEC, overrides=job_overrides(manifest, out))
    killed: dict = {}
    since = time.time()

    def killer():
        try:
            wait_for(lambda: len(markers(out)) >= 2, 180, "two finished shards")
            actors = wait_for(lambda: len(method_actors(since)) == 2 and method_actors(since), 30, "both pool actors")
            killed["markers"] = len(markers(out))
            killed["actors"] = {a["ActorID"]: a["Pid"] for a in actors}
            for a in actors:  # both pools: the GEM and the MaskInversion actor
                os.kill(a["Pid"], signal.SIGKILL)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            killed["error"] = e

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    started = time.monotonic()
    result = run(spec)
    t.join(10)
    assert "error" not in killed, killed.get("error")
    assert killed["markers"] < count // 2, "the kill came after the job had finished"
    from ray._private.state import state

    table = state.actor_table(None)
    restarts = {aid: table[aid]["NumRestarts"] for aid in killed["actors"] if aid in table}
    print(
        f"\nFIGURES actor-kill: killed {len(killed['actors'])} actors at {killed['markers']}/{count // 2} shards; "
        f"restarts {sorted(restarts.values())}; job {time.monotonic() - started:.1f} s"
    )
    assert all(n >= 1 for n in restarts.values()) and len(restarts) == 2, restarts
    assert result.ok and result.processed == count and result.errors == 0
    assert_exactly_once(read_outputs(str(out)), count)
    assert len(markers(out)) == count // 2
    assert_files_match_markers(out)


# ------------------------------------------------------------------------------------------------ driver SIGKILL
def _process_tree(root_pid: int) -> dict[int, str]:
    """``pid → command line`` of every descendant of ``root_pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                except OSError:
                    continue
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cli(job: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "clipmaps.jobs.cli", "run", str(job)],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def test_sigkill_of_the_driver_then_rerun_resumes_exactly_once(tmp_path):
    """``clipmaps run`` is killed (SIGKILL) once shards start to complete; the same command again finishes, keeps
    the complete shards, redoes only the others and leaves no duplicate; ``_job.json`` records both attempts."""
    count = 80
    manifest = write_inputs(tmp_path / "in", count)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(load_spec(JOB_SPEC, overrides=job_overrides(manifest, out)).to_yaml(redact=False))
    total_shards = count // 2

    first = _cli(job, tmp_path / "run1.log")
    try:
        wait_for(lambda: first.poll() is not None or len(markers(out)) >= 3, 240, "three finished shards")
        assert first.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        tree = _process_tree(first.pid)
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    complete_at_kill = markers(out)
    # finished but unmarked: shards whose label maps were all written when the driver died (their markers were not)
    labels_at_kill = Counter()
    for p in (out / "labels").glob("part-*.parquet"):
        shard = shard_of_file(p.name)
        if shard is None:  # part-empty.parquet: the schema file every dataset has from the job's start
            continue
        if shard not in complete_at_kill:
            labels_at_kill[shard] += pads.dataset(p, format="parquet").count_rows()
    unmarked_finished = sorted(s for s, n in labels_at_kill.items() if n == 2)
    # a result file is whole or absent (written to a temporary name, then renamed): every one present reads
    for p in out.glob("*/part-*.parquet"):
        pq.read_metadata(p)
    # what a writer killed mid-write would leave: a temporary file, and a result file of an unfinished shard
    unfinished = min(set(range(total_shards)) - complete_at_kill)
    (out / "labels" / f"_tmp-{'0' * 32}-part-{unfinished:07d}-deadbeef.parquet.tmp").write_bytes(b"PAR1 partial")
    planted = out / "heatmaps" / f"part-{unfinished:07d}-0123456789abcdef.parquet"
    shutil.copy(next(out.glob("heatmaps/part-*.parquet")), planted)

    # the killed driver's processes: Ray fate-shares raylet and GCS with the driver, workers die with the raylet; the
    # dashboard and runtime-env agents notice the raylet's death but wait for the (dead) GCS before exiting
    agents = {pid for pid, cmd in tree.items() if "Agent" in cmd}
    writers = set(tree) - agents
    gone: dict[str, float] = {}

    def watch():  # polls while the re-run starts, bounded
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in writers):
            time.sleep(0.1)
        if not any(_alive(p) for p in writers):
            gone["writers_s"] = time.monotonic() - killed_at

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    second = _cli(job, tmp_path / "run2.log")  # at once: the killed run's processes may still be around
    try:
        rc = second.wait(300)
    finally:
        if second.poll() is None:
            second.kill()
    log2 = (tmp_path / "run2.log").read_text()
    assert rc == 0, log2[-3000:]

    watcher.join(35)
    assert "writers_s" in gone, f"the killed driver's raylet/GCS/workers outlived it by 30 s: {tree}"
    lingering = {pid: tree[pid] for pid in agents if _alive(pid)}
    for pid in lingering:  # the test's own processes: do not leak them
        os.kill(pid, signal.SIGKILL)

    job_doc = json.loads((out / "_job.json").read_text())
    attempts = job_doc["attempts"]
    print(
        f"\nFIGURES driver-kill: {len(complete_at_kill)}/{total_shards} shards complete at the kill, "
        f"{len(unmarked_finished)} finished but unmarked (recomputed: {unmarked_finished}); re-run redid "
        f"{total_shards - attempts[1]['resumed_shards']} shards; the killed driver had {len(tree)} descendant "
        f"processes: raylet, GCS and workers gone {gone['writers_s']:.1f} s after the kill, "
        f"{len(lingering)} agents still alive then: {sorted(c.split()[0] for c in lingering.values())}"
    )
    assert len(attempts) == 2 and attempts[0]["status"] == "lost" and attempts[1]["status"] == "finished"
    assert attempts[1]["resumed_shards"] == len(complete_at_kill) and job_doc["status"] == "finished"
    assert attempts[0]["complete_shards"] == len(complete_at_kill)
    assert len(unmarked_finished) <= 4, "more finished work lost than about one block per stage"
    resumed = read_outputs(str(out))
    assert_exactly_once(resumed, count)
    assert len(markers(out)) == total_shards
    assert not planted.exists()
    assert_files_match_markers(out)
    # the resumed output equals a clean run byte for byte: results depend on each image alone, not on its batch
    clean_job = tmp_path / "clean.yaml"
    clean_job.write_text(
        load_spec(JOB_SPEC, overrides=job_overrides(manifest, tmp_path / "clean")).to_yaml(redact=False)
    )
    clean = _cli(clean_job, tmp_path / "clean.log")
    try:
        assert clean.wait(300) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    finally:
        if clean.poll() is None:
            clean.kill()
    assert_same_results(resumed, read_outputs(str(tmp_path / "clean")))


def assert_same_results(a: dict, b: dict) -> None:
    """Two outputs hold the same rows with byte-identical label maps and heatmaps and bit-identical embeddings."""
    keys = {
        "labels": (("image_id", "method"), "label_map"),
        "heatmaps": (("image_id", "method", "prompt"), "heatmap"),
        "regions": (("image_id", "region_id"), "embedding"),
    }
    for name, (key, value) in keys.items():
        rows = [{tuple(r[k] for k in key): r[value] for r in t.to_pylist()} for t in (a[name], b[name])]
        assert rows[0].keys() == rows[1].keys(), name
        differ = [k for k in rows[0] if rows[0][k] != rows[1][k]]
        assert not differ, f"{len(differ)} {name} rows differ from a clean run, e.g. {differ[:3]}"


# ------------------------------------------------------------------------------------------------ flaky S3
def run_through_fault_proxy(server, tmp_path: Path, *extra: str, count: int = 40, **proxy_args):
    """Inputs, weights and outputs on ``server`` (a ``tests.helpers.s3server.S3Server``), every request of the job sent
    through a :class:`tests.helpers.faultproxy.FaultProxy` (``proxy_args``); returns ``(result, tables, proxy)``."""
    import uuid

    from clipmaps.actors.models import load_model, save_weights
    from clipmaps.pipeline.run import run
    from tests.helpers.faultproxy import FaultProxy

    fs = server.filesystem()
    prefix = f"s3://{server.bucket}/flaky-{uuid.uuid4().hex[:8]}"
    manifest = write_inputs(tmp_path / "in", count, put=lambda p, uri: fs.put(str(p), uri), prefix=prefix)
    weights = save_weights(load_model("clipmaps-tiny-vit", seed=0).model, tmp_path / "tiny.safetensors")
    fs.put(str(weights), f"{prefix}/tiny.safetensors")
    with FaultProxy(server.endpoint, **proxy_args) as proxy:
        client = {"endpoint_url": proxy.endpoint}
        opts = json.dumps({"key": server.key, "secret": server.secret, "client_kwargs": client})
        spec = load_spec(JOB_SPEC, overrides=job_overrides(
            manifest, f"{prefix}/out",
            f"input.storage_options={opts}", f"output.storage_options={opts}", f"model.storage_options={opts}",
            "model.seed=null", f"model.weights={prefix}/tiny.safetensors", *extra,
        ))  # fmt: skip
        result = run(spec)
        proxy.enabled = False  # read the results back without faults
        tables = read_outputs(f"{prefix}/out".removeprefix("s3://"), fs)
    return result, tables, proxy


def test_flaky_object_storage_loses_nothing(local_ray, s3, tmp_path):
    """~10% of the job's S3 requests (manifest, images, weights, every write) fail: 500, 503, SlowDown, connection
    resets before and after the server acted, or are delayed. The storage client's retries (``resources.io_retries``
    merged into storage_options) and the sink's task retries absorb them: nothing lost, nothing twice."""
    count = 40
    started = time.monotonic()
    result, tables, proxy = run_through_fault_proxy(s3, tmp_path, count=count, rate=0.1, seed=11)
    broken, sent_again = proxy.retried()
    faults = {k: v for k, v in proxy.counts.items() if k not in ("requests", "forwarded")}
    print(
        f"\nFIGURES flaky-s3: {proxy.counts['requests']} requests, injected {sum(faults.values())} "
        f"({dict(sorted(faults.items()))}); {broken} failed or reset, {sent_again} of them sent again; "
        f"job {time.monotonic() - started:.1f} s"
    )
    assert result.ok and result.processed == count and result.errors == 0
    assert_exactly_once(tables, count)
    assert broken >= 10 and sent_again == broken
    assert len({k for k in faults if k != "latency"}) >= 4, faults


def test_failed_sink_writes_are_retried_by_ray_and_rewrite_the_same_files(local_ray, s3, tmp_path):
    """With the client's retries off (``resources.io_retries=1``), a 500 on a result-file PUT fails the sink task;
    Ray re-runs it (``max_retries`` + ``retry_exceptions``), and the re-run writes the same names again."""
    count = 24

    def result_put(method: str, path: str) -> bool:
        return method == "PUT" and any(f"/out/{d}/part-" in path for d in ("labels", "heatmaps", "regions"))

    result, tables, proxy = run_through_fault_proxy(
        s3, tmp_path, "resources.io_retries=1", "resources.task_retries=8",
        count=count, rate=0.15, seed=5, kinds={"http500": 1.0}, only=result_put,
    )  # fmt: skip
    broken, sent_again = proxy.retried()
    print(f"\nFIGURES sink-retries: {proxy.counts['http500']} result PUTs answered 500, {sent_again} sent again")
    assert result.ok and result.processed == count
    assert_exactly_once(tables, count)
    assert proxy.counts["http500"] >= 3 and sent_again == broken


# ------------------------------------------------------------------------------------------------ node loss
# slow: about 80 s on 2 cores, and Ray 2.60's lineage check once failed it on a re-executed block ("streaming generator
# … produced 0 objects, expected 2"); two-node placement stays in the default run (test_multinode.py)
@pytest.mark.slow
def test_worker_node_lost_mid_job(tmp_path):
    """A head and a worker node (separate raylets, ``ray.cluster_utils.Cluster``); both pools need the custom
    resource ``clipmaps_pool`` that only worker nodes have, so their actors run there.

    1. The worker node is killed mid-job and nothing replaces it: the pools cannot be placed anywhere, and the
       driver stops with a clear ``JobFailed`` after ``run.stall_timeout_s`` (bounded, no hang), keeping the
       finished shards. A re-run is refused at once while no node has the resource.
    2. A node joins and the re-run resumes; its node is killed mid-run too, and a replacement joins (a preemptible
       node pool with an autoscaler): the actors restart there, their batches are re-sent, and the *same run*
       completes, with every row exactly once.

    The scenario runs in a fresh interpreter: ``RAY_AUTH_MODE=disabled`` must be set before Ray starts in a process,
    and ``Cluster`` calls need the main thread.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    code = f"from tests.integration.test_faults import node_loss_scenario; node_loss_scenario({str(tmp_path)!r})"
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=420)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the node-loss scenario did not finish in 420 s: {(e.stderr or b'')[-3000:]}") from None
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    print("\n" + (tmp_path / "figures.txt").read_text())


def node_loss_scenario(folder: str) -> None:
    """The body of :func:`test_worker_node_lost_mid_job` (run in its own process; raises on failure)."""
    import ray
    from ray.cluster_utils import Cluster

    from clipmaps.pipeline.run import run
    from clipmaps.schemas.errors import JobFailed

    tmp_path = Path(folder)
    count, stall_s, shards = 24, 15, 12
    manifest = write_inputs(tmp_path / "in", count)
    out = tmp_path / "out"
    pool = "{clipmaps_pool: 1}"
    extra = [f"methods.{m}.resources.custom_resources={pool}" for m in ("gem", "maskinversion")]
    # the stall timeout is not part of the job's fingerprint: a re-run may change it. To ride out a node loss it
    # must outlast bringing a node up and starting its actors (~20-30 s here)
    failing, riding = (
        load_spec(JOB_SPEC, overrides=job_overrides(manifest, out, f"run.stall_timeout_s={t}", *extra))
        for t in (stall_s, 120)
    )
    figures = []
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1, resources={"clipmaps_pool": 2})
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)

        def start(spec) -> tuple[threading.Thread, dict]:
            outcome: dict = {}

            def job():
                try:
                    outcome["result"] = run(spec)
                except BaseException as e:  # noqa: BLE001 - checked by the test
                    outcome["error"] = e
                outcome["end"] = time.monotonic()

            t = threading.Thread(target=job, daemon=True)
            t.start()
            return t, outcome

        # 1. the node is lost for good: the pools cannot be placed; bounded failure with a clear error
        t, outcome = start(failing)
        wait_for(lambda: len(markers(out)) >= 2 or "end" in outcome, 180, "two finished shards")
        at_kill = len(markers(out))
        cluster.remove_node(worker, allow_graceful=False)  # Cluster calls must come from the main thread
        killed = time.monotonic()
        t.join(stall_s + 120)
        assert not t.is_alive(), "the driver hung after losing the only node its pools can use"
        error = outcome.get("error")
        assert isinstance(error, JobFailed), error
        assert "ExecutionTimeoutError" in str(error) and "re-run" in str(error)
        kept = len(markers(out))
        failed_after = outcome["end"] - killed
        figures.append(f"not replaced: {at_kill}/{shards} shards at the kill, JobFailed {failed_after:.0f} s after "
                       f"it ({kept} shards kept)")  # fmt: skip
        job = json.loads((out / "_job.json").read_text())
        assert job["status"] == "failed" and job["attempts"][0]["status"] == "failed"
        # while no node has the resource, a re-run is refused at once (the plan check), without touching the output
        wait_for(lambda: ray.cluster_resources().get("clipmaps_pool", 0) == 0, 60, "the dead node to be dropped")
        with pytest.raises(ValueError, match="custom_resources.clipmaps_pool"):
            run(riding)

        # 2. a node joins; the re-run resumes; its node is lost too, a replacement joins: the same run completes
        worker = cluster.add_node(num_cpus=1, resources={"clipmaps_pool": 2})
        t, outcome = start(riding)
        wait_for(lambda: len(markers(out)) >= kept + 2 or "end" in outcome, 180, "two more finished shards")
        at_kill = len(markers(out))
        cluster.remove_node(worker, allow_graceful=False)
        killed = time.monotonic()
        cluster.add_node(num_cpus=1, resources={"clipmaps_pool": 2})
        t.join(240)
        assert "result" in outcome, outcome.get("error")
        assert at_kill < shards and outcome["result"].ok
        figures.append(f"replaced: {at_kill}/{shards} shards at the kill, the same run done "
                       f"{outcome['end'] - killed:.0f} s after it")  # fmt: skip
        job = json.loads((out / "_job.json").read_text())
        assert [a["status"] for a in job["attempts"]] == ["failed", "finished"]
        assert job["attempts"][1]["resumed_shards"] == kept
        assert_exactly_once(read_outputs(str(out)), count)
        assert_files_match_markers(out)
    finally:
        ray.shutdown()
        cluster.shutdown()
    (tmp_path / "figures.txt").write_text("FIGURES node-loss: " + "; ".join(figures))


def test_io_retry_defaults_merge_into_s3_storage_options():
    """``resources.io_retries`` / ``read_timeout_s`` reach every S3 storage_options unless the user set them."""
    from clipmaps.pipeline.plan import with_io_defaults_spec

    user = "{config_kwargs: {retries: {max_attempts: 2, mode: adaptive}}, key: k}"
    spec = load_spec(JOB_SPEC, overrides=[
        "input.manifest=s3://b/m.jsonl", "output.uri=s3://b/out", f"output.storage_options={user}",
        "model.seed=null", "model.weights=s3://b/w.safetensors", "resources.io_retries=7", "resources.read_timeout_s=9",
    ])  # fmt: skip
    merged = with_io_defaults_spec(spec)
    config = merged.input.storage_options["config_kwargs"]
    assert config == {"retries": {"max_attempts": 7, "mode": "standard"}, "connect_timeout": 9.0, "read_timeout": 9.0}
    assert merged.model.storage_options["config_kwargs"]["retries"]["max_attempts"] == 7
    assert merged.output.storage_options["config_kwargs"]["retries"] == {"max_attempts": 2, "mode": "adaptive"}
    assert merged.output.storage_options["key"] == "k" and spec.output.storage_options["config_kwargs"].keys() == {
        "retries"
    }
    local = load_spec(JOB_SPEC, overrides=["input.manifest=m.jsonl", "output.uri=out", "input.allowed_schemes=[file]"])
    assert with_io_defaults_spec(local).input.storage_options == {}
