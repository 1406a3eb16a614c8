"""Scale-out: the demo job on a Ray cluster of a head and a worker node (separate processes, each with its own
resources), as on Kubernetes where every Ray pod is a node.

Every method pool is given two actors (``min_actors = max_actors = 2``); the job must place each pool's actors on
both nodes (Ray Data spreads actors across nodes) and still write every output. The driver runs in its own process,
joined to the cluster through ``RAY_ADDRESS`` as a RayJob's driver is; it records where each method's actors were
built and where they ran batches with a subclass of ``MethodActor`` that calls the real one (this file, run as a
script, is that driver).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

SCENES = 4
METHODS = ("maskclip", "gem", "legrad", "maskinversion")


def _driver_env(cluster) -> dict:
    return {
        **os.environ,
        "RAY_ADDRESS": cluster.address,
        "RAY_AUTH_MODE": "disabled",
        # Ray maps 127.0.0.1 in RAY_ADDRESS to the host's network address unless told this host runs no cluster
        # across machines; the test cluster listens on loopback only
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node, 1 CPU each, as separate Ray processes on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "resources": {"head": 1},
        },
    )
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"worker": 1})
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous


def test_method_pools_place_actors_on_both_nodes(cluster, tmp_path):
    from clipmaps.jobs.demo import DEMO_SPEC, write_scenes

    scenes = write_scenes(tmp_path / "input", SCENES)
    # a manifest of two files, read and validated by Ray tasks on the nodes: the second repeats an id of the first
    # and names an image by a scheme the job does not allow
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    (manifest / "a.jsonl").write_text(scenes.read_text())
    first = json.loads(scenes.read_text().splitlines()[0])
    bad = [{**first, "masks": None}, {"image_id": "remote", "image_uri": "http://example.com/x.jpg"}]
    (manifest / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "out"
    overrides = [f"input.manifest={manifest}", f"output.uri={out}", "output.overwrite=false", "output.shard_rows=2"]
    overrides.append("run.max_error_fraction=0.5")  # 2 of the 6 rows are refused on purpose
    for m in METHODS:  # two actors per pool; 8 x 0.1 CPU + 0.5 for decode fits the 2 CPUs of the cluster
        overrides += [
            f"methods.{m}.resources.min_actors=2",
            f"methods.{m}.resources.max_actors=2",
            f"methods.{m}.resources.num_cpus=0.1",
            f"methods.{m}.resources.batch_size=1",
        ]
    report = tmp_path / "report.json"
    started = time.time()
    result = subprocess.run(
        [sys.executable, __file__, str(DEMO_SPEC), str(report), str(tmp_path / "actors.jsonl"), *overrides],
        env=_driver_env(cluster),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(report.read_text())
    nodes = doc["nodes"]
    assert len(nodes) == 2 and doc["resources"]["CPU"] == 2 and {"head", "worker"} <= set(doc["resources"])

    built, ran, read = defaultdict(set), defaultdict(set), []
    for line in (tmp_path / "actors.jsonl").read_text().splitlines():
        event = json.loads(line)
        assert event["node"] in nodes
        if event["event"] == "read":
            read.append(event)
            continue
        (built if event["event"] == "init" else ran)[event["method"]].add(event["node"])
    # every shard was read and validated by a Ray task in a worker process, never by the driver
    assert sorted({e["shard"] for e in read}) == [0, 1, 2] and doc["driver_pid"] not in {e["pid"] for e in read}
    for m in METHODS:
        assert built[m] == set(nodes), f"{m}: actors on {len(built[m])} of the 2 nodes"
    assert set().union(*ran.values()) == set(nodes), "batches ran on both nodes"

    # every input ends as outputs: 3 label maps (MaskCLIP, GEM, gem_original), 3 prompts x 3 heatmap methods (GEM,
    # gem_original, LeGrad), 3 regions per scene
    import pyarrow.dataset as pads

    def rows(name):
        return pads.dataset(out / name, format="parquet").to_table()

    assert doc["processed"] == SCENES + 2 and doc["ok"] and doc["errors"] == 2
    assert rows("labels").num_rows == 3 * SCENES
    assert rows("heatmaps").num_rows == 3 * 3 * SCENES
    assert rows("regions").num_rows == 3 * SCENES
    errors = {r["image_id"]: r for r in rows("errors").to_pylist()}
    assert (
        errors[first["image_id"]]["error_type"] == "DuplicateImageId"
        and "a.jsonl row 0" in errors[first["image_id"]]["message"]
    )
    assert errors["remote"]["error_type"] == "UnsupportedScheme" and len(errors) == 2
    assert sorted(set(rows("labels").column("image_id").to_pylist())) == [f"scene-{i:03d}" for i in range(SCENES)]
    assert json.loads((out / "_job.json").read_text())["counts"]["images"] == SCENES + 2
    print(
        f"multi-node demo job: {time.time() - started:.1f} s; actors per method and node: "
        f"{ {m: len(v) for m, v in built.items()} }"
    )


# --------------------------------------------------------------------------------------------------- the driver


def _driver(spec_path: str, report: str, events: str, *overrides: str) -> None:
    """Join the cluster at $RAY_ADDRESS, run the job with a MethodActor that records where it runs, report."""
    import ray

    import clipmaps.actors.actor as actor_module
    from clipmaps.pipeline.run import run
    from clipmaps.pipeline.spec import load_spec

    base = actor_module.MethodActor

    class RecordingMethodActor(base):  # defined in __main__, so Ray ships it by value to the worker processes
        def _record(self, event: str) -> None:
            line = json.dumps(
                {
                    "event": event,
                    "method": self.config.method,
                    "pid": os.getpid(),
                    "node": ray.get_runtime_context().get_node_id(),
                }
            )
            with open(events, "a") as f:
                f.write(line + "\n")

        def __init__(self, config):
            super().__init__(config)
            self._record("init")

        def __call__(self, batch):
            out = super().__call__(batch)
            self._record("batch")
            return out

    actor_module.MethodActor = RecordingMethodActor  # plan.build_dataset imports it when it builds the pools

    import clipmaps.pipeline.shards as shards_module

    read_task = shards_module._read_task

    def recording_read_task(*args):  # defined in __main__: shipped by value with each read task
        blocks = read_task(*args)
        line = {
            "event": "read",
            "shard": args[2].id,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
        }
        with open(events, "a") as f:
            f.write(json.dumps(line) + "\n")
        return blocks

    shards_module._read_task = recording_read_task  # ManifestDatasource.get_read_tasks binds it per shard
    ray.init(log_to_driver=False)
    try:
        result = run(load_spec(spec_path, overrides=list(overrides)))
        doc = {
            "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
            "resources": ray.cluster_resources(),
            "processed": result.processed,
            "errors": result.errors,
            "ok": result.ok,
            "driver_pid": os.getpid(),
        }
    finally:
        ray.shutdown()
    Path(report).write_text(json.dumps(doc))


if __name__ == "__main__":
    _driver(*sys.argv[1:])
