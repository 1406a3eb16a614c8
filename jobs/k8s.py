"""``clipmaps k8s``: KubeRay manifests for a job spec, and sample input for a smoke test on a cluster.

``clipmaps k8s render JOB.yaml`` writes three Kubernetes objects that run ``clipmaps run`` on the job spec as a KubeRay
``RayJob`` (``ray.io/v1``, KubeRay ≥ 1.2, whose RayJob has backoffLimit; checked against the CRDs of v1.7.0):

* a ``ServiceAccount`` for the Ray pods (KubeRay binds the autoscaler's Role to it; annotate it for IRSA / GKE
  workload identity instead of using a credentials Secret);
* a ``ConfigMap`` holding the job spec as ``job.yaml`` (the file as written, or re-dumped when ``--set`` changed it),
  mounted at ``/etc/clipmaps/job.yaml`` in every Ray pod;
* the ``RayJob``: a head pod that runs the driver and schedules no work (``num-cpus: 0``), one autoscaling worker
  group (``nvidia.com/gpu`` limits and the usual GPU taint's toleration; CPU-only with ``--gpus-per-worker 0``),
  ``entrypoint: clipmaps run /etc/clipmaps/job.yaml``, object-storage credentials as ``AWS_*`` variables from a Secret
  (which ``s3fs`` reads when ``storage_options`` has no key), a weights cache per pod (``CLIPMAPS_CACHE``), and the
  lifecycle: ``shutdownAfterJobFinishes``, ``ttlSecondsAfterFinished``, ``activeDeadlineSeconds`` (per attempt) and
  ``backoffLimit``.

Retries: KubeRay runs a failed RayJob again (up to ``backoffLimit`` times) on a new RayCluster with the same
entrypoint and the same ConfigMap, so the retry writes to the same ``output.uri`` and resumes there. Nothing in the
manifests varies per attempt, and ``render`` refuses specs that would defeat this (``output.overwrite: true`` would
delete the failed attempt's work; local paths do not survive the pod).

The kustomize tree in ``k8s/`` (``base`` + ``overlays/*``) is the same output for the common variants; each overlay's
``kustomization.yaml`` names the ``clipmaps k8s render`` command it equals, and the tests check that it does.

Imports no torch and no Ray.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clipmaps.schemas.storage import filesystem, is_secret_name, redact_uri, uri_scheme

#: Ray version of the image built by ``k8s/Dockerfile`` (its base image tag) and the RayCluster's ``rayVersion``.
RAY_VERSION = "2.58.0"
#: Image name used when ``--image`` is not given (replace with your registry's).
DEFAULT_IMAGE = "registry.example.com/clipmaps:0.1.0"
#: Name of the Secret with object-storage credentials (keys named like the AWS variables).
DEFAULT_SECRET = "clipmaps-s3"
#: Where the ConfigMap is mounted in the Ray pods, and the job spec's key in it.
SPEC_DIR = "/etc/clipmaps"
SPEC_KEY = "job.yaml"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_KEY}"
#: Node-local weights cache of each Ray pod (an emptyDir shared by the actors of the pod).
CACHE_DIR = "/var/cache/clipmaps"
#: Secret keys exposed as environment variables: (name, required). s3fs/botocore read them.
SECRET_KEYS: tuple[tuple[str, bool], ...] = (
    ("AWS_ACCESS_KEY_ID", True),
    ("AWS_SECRET_ACCESS_KEY", True),
    ("AWS_SESSION_TOKEN", False),
    ("AWS_ENDPOINT_URL", False),
    ("AWS_DEFAULT_REGION", False),
)
#: Non-root user of the image (``k8s/Dockerfile``: the ``ray`` user of the rayproject/ray base, group ``users``).
RUN_AS_USER = 1000
RUN_AS_GROUP = 100
LABELS = {"app.kubernetes.io/name": "clipmaps"}
#: KubeRay: the RayCluster name (RayJob name + 6 characters) must stay within 53 characters.
MAX_NAME_LENGTH = 47
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")

__all__ = [
    "CACHE_DIR",
    "DEFAULT_IMAGE",
    "RAY_VERSION",
    "SECRET_KEYS",
    "SPEC_PATH",
    "K8sError",
    "RenderOptions",
    "check_spec",
    "dump_manifests",
    "render",
    "render_file",
    "write_sample_input",
]


class K8sError(ValueError):
    """A job spec or option that cannot become a working RayJob; the message says what to change."""


@dataclass(frozen=True)
class RenderOptions:
    """How the job runs on Kubernetes (the ``clipmaps k8s render`` flags).

    Attributes:
        name: name of the RayJob, its ConfigMap and ServiceAccount (DNS-1035 label, at most 47 characters).
        namespace: ``metadata.namespace`` of every object; None = the namespace ``kubectl`` applies to.
        image: the clipmaps image (``k8s/Dockerfile``) for every pod.
        gpus_per_worker: ``nvidia.com/gpu`` per worker pod; 0 = a CPU-only worker group.
        min_workers, max_workers: worker pods (the Ray autoscaler scales between them).
        worker_cpus, worker_memory: per worker pod (requests = limits); None = from ``gpus_per_worker``
            (8 CPUs and 48Gi per GPU; 4 CPUs and 8Gi for CPU-only workers).
        head_cpus, head_memory: the head pod (driver, GCS, dashboard, autoscaler; runs no tasks).
        secret: Secret with the ``AWS_*`` keys; None = no credentials from a Secret (IRSA, workload identity).
        backoff_limit: retries of a failed job, each on a new RayCluster (same spec, same output: it resumes).
        active_deadline_seconds: limit on each attempt's duration (a job stopped by it is not retried).
        ttl_seconds_after_finished: how long the finished RayCluster stays for inspection before deletion.
        sample_input: > 0 = first write that many generated scenes to ``input.uri`` (``clipmaps k8s
            sample-input``), for a smoke test that needs nothing but a bucket.
    """

    name: str = "clipmaps"
    namespace: str | None = None
    image: str = DEFAULT_IMAGE
    gpus_per_worker: int = 1
    min_workers: int = 1
    max_workers: int = 4
    worker_cpus: str | None = None
    worker_memory: str | None = None
    head_cpus: str = "4"
    head_memory: str = "16Gi"
    secret: str | None = DEFAULT_SECRET
    backoff_limit: int = 2
    active_deadline_seconds: int = 86400
    ttl_seconds_after_finished: int = 600
    sample_input: int = 0

    def __post_init__(self) -> None:
        if len(self.name) > MAX_NAME_LENGTH or not _DNS1035.match(self.name):
            raise K8sError(
                f"--name {self.name!r}: must be a DNS-1035 label (lower-case letters, digits and '-', "
                f"starting with a letter) of at most {MAX_NAME_LENGTH} characters"
            )
        if self.namespace is not None and (len(self.namespace) > 63 or not _DNS1035.match(self.namespace)):
            raise K8sError(f"--namespace {self.namespace!r}: not a valid namespace name")
        if self.secret is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", self.secret):
            raise K8sError(f"--secret {self.secret!r}: not a valid Secret name")
        if not self.image or any(c.isspace() for c in self.image):
            raise K8sError(f"--image {self.image!r}: not an image reference")
        if self.gpus_per_worker < 0:
            raise K8sError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1:
            raise K8sError(
                f"--min-workers {self.min_workers} / --max-workers {self.max_workers}: need "
                "0 <= min <= max and max >= 1"
            )
        for flag, value in (
            ("--worker-cpus", self.worker_cpus),
            ("--worker-memory", self.worker_memory),
            ("--head-cpus", self.head_cpus),
            ("--head-memory", self.head_memory),
        ):
            if value is not None and not _QUANTITY.match(str(value)):
                raise K8sError(f"{flag} {value!r}: not a Kubernetes quantity (e.g. 8, 500m, 48Gi)")
        for flag, value in (
            ("--backoff-limit", self.backoff_limit),
            ("--ttl-seconds-after-finished", self.ttl_seconds_after_finished),
        ):
            if value < 0:
                raise K8sError(f"{flag} must be >= 0, got {value}")
        if self.active_deadline_seconds <= 0:
            raise K8sError(f"--active-deadline-seconds must be > 0, got {self.active_deadline_seconds}")
        if self.sample_input < 0:
            raise K8sError(f"--sample-input must be >= 0, got {self.sample_input}")

    @property
    def cpus(self) -> str:
        """CPUs of a worker pod."""
        if self.worker_cpus is not None:
            return str(self.worker_cpus)
        return str(8 * self.gpus_per_worker) if self.gpus_per_worker else "4"

    @property
    def memory(self) -> str:
        """Memory of a worker pod."""
        if self.worker_memory is not None:
            return str(self.worker_memory)
        return f"{48 * self.gpus_per_worker}Gi" if self.gpus_per_worker else "8Gi"

    @property
    def group_name(self) -> str:
        return "gpu-workers" if self.gpus_per_worker else "cpu-workers"

    @property
    def entrypoint(self) -> str:
        """The command the RayJob runs (on the head pod, as a Ray job's driver)."""
        run = f"clipmaps run {SPEC_PATH}"
        if self.sample_input:
            return f"clipmaps k8s sample-input {SPEC_PATH} --scenes {self.sample_input} && {run}"
        return run


# --------------------------------------------------------------------------------------------------- checks


def _cpu_value(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def check_spec(spec, options: RenderOptions) -> list[str]:
    """Refuse a job spec that cannot run (or cannot resume) as this RayJob; return notes for what is only odd.

    Args:
        spec: the validated ``clipmaps.pipeline.spec.JobSpec``.
    """
    from clipmaps.pipeline.plan import check_resources

    problems: list[str] = []
    if spec.output.overwrite:
        problems.append(
            "output.overwrite is true: each retry of the RayJob (backoffLimit) would delete what the "
            "failed attempt wrote; set it to false (re-running a spec on the same output resumes)"
        )
    if spec.run.ray_address not in (None, "auto"):
        problems.append(
            f"run.ray_address is {spec.run.ray_address!r}: in a RayJob the driver joins the job's own "
            "cluster; leave it null (or auto)"
        )
    locations = [("input.uri", spec.input.uris[0]), ("output.uri", spec.output.uri)]  # one store per input
    if spec.model.weights:
        locations.append(("model.weights", spec.model.weights))
    if spec.vocabulary is not None and spec.vocabulary.file:
        locations.append(("vocabulary.file", spec.vocabulary.file))
    for where, uri in locations:
        if uri_scheme(uri) in ("file", "local"):
            problems.append(
                f"{where} is a local path ({redact_uri(uri)!r}); the pods cannot see this machine's files and lose "
                "their own on exit: use object storage (s3://, gs://…)"
            )
    for section in (spec.input, spec.output, spec.model):
        secrets = _secret_keys(section.storage_options)
        if secrets:
            problems.append(
                f"storage_options hold {', '.join(secrets)}: the spec is stored in a ConfigMap, which is "
                "not secret; put credentials in the Secret (AWS_* keys) and leave them out of the spec"
            )
    gpu_pools = [m for m in spec.enabled_methods() if spec.method(m).resources.num_gpus > 0]
    if options.gpus_per_worker == 0 and gpu_pools:
        problems.append(
            f"methods {', '.join(gpu_pools)} reserve GPUs but --gpus-per-worker is 0 (set "
            "methods.<name>.resources.num_gpus: 0 for a CPU-only run)"
        )
    elif spec.model.precision == "bf16" and options.gpus_per_worker == 0:
        problems.append("model.precision bf16 needs GPU workers")
    if options.sample_input and (spec.input.manifest_format != "jsonl" or not isinstance(spec.input.uri, str)):
        problems.append(
            f"--sample-input writes a JSON-lines manifest, but input.uri {spec.input.shown!r} is not one .jsonl file"
        )
    if problems:
        raise K8sError("; ".join(problems))

    notes = []
    cpus, gpus = _cpu_value(options.cpus), options.gpus_per_worker
    try:
        check_resources(spec, {"CPU": cpus * options.min_workers, "GPU": gpus * options.min_workers})
    except ValueError as e:
        raise K8sError(
            f"at --min-workers {options.min_workers} ({options.cpus} CPUs and {gpus} GPUs each) the job "
            f"cannot start: {e}; or raise --min-workers"
        ) from None
    for m in spec.enabled_methods():
        pool = spec.method(m).resources
        if pool.num_gpus > 0:
            fits = int(gpus * options.max_workers / pool.num_gpus + 1e-9)
            if pool.max_actors > fits:
                notes.append(
                    f"methods.{m}.resources.max_actors is {pool.max_actors} but --max-workers "
                    f"{options.max_workers} x {gpus} GPU hold at most {fits} such actors"
                )
    return notes


def _secret_keys(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    found = []
    for k, v in options.items():
        if isinstance(v, Mapping):
            found += _secret_keys(v, f"{prefix}{k}.")
        elif isinstance(k, str) and is_secret_name(k):
            found.append(prefix + k)
    return found


# --------------------------------------------------------------------------------------------------- render


def _security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_GROUP,
        "fsGroup": RUN_AS_GROUP,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(options: RenderOptions) -> list[dict]:
    env = []
    if options.secret is not None:
        for key, required in SECRET_KEYS:
            ref = {"name": options.secret, "key": key}
            if not required:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    env.append({"name": "CLIPMAPS_CACHE", "value": CACHE_DIR})
    return env


def _resources(cpus: str, memory: str, gpus: int = 0) -> dict:
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": str(memory)}
    if gpus:
        amounts["nvidia.com/gpu"] = gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod(options: RenderOptions, container: str, resources: dict, *, gpu: bool) -> dict:
    spec: dict[str, Any] = {
        "serviceAccountName": options.name,
        "securityContext": _pod_security_context(),
        "containers": [
            {
                "name": container,
                "image": options.image,
                "resources": resources,
                "env": _env(options),
                "securityContext": _security_context(),
                "volumeMounts": [
                    {"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True},
                    {"name": "weights-cache", "mountPath": CACHE_DIR},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "job-spec", "configMap": {"name": options.name}},
            {"name": "weights-cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # Ray's object store lives in /dev/shm
        ],
    }
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": dict(LABELS)}, "spec": spec}


def _meta(options: RenderOptions) -> dict:
    meta: dict[str, Any] = {"name": options.name, "labels": dict(LABELS)}
    if options.namespace:
        meta["namespace"] = options.namespace
    return meta


def render(spec_text: str, options: RenderOptions) -> list[dict]:
    """The ServiceAccount, ConfigMap and RayJob (as plain dicts) that run the job spec ``spec_text`` (YAML).

    The spec is validated (``load_spec``) and checked against the options (:func:`check_spec`); the ConfigMap holds
    ``spec_text`` unchanged. Raises ``SpecError`` or :class:`K8sError`.
    """
    return _render(spec_text, options)[0]


def _render(spec_text: str, options: RenderOptions) -> tuple[list[dict], list[str]]:
    from clipmaps.pipeline.spec import load_spec

    spec = load_spec(yaml.safe_load(spec_text) or {})
    notes = check_spec(spec, options)
    service_account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(options)}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(options), "data": {SPEC_KEY: spec_text}}
    gpus = options.gpus_per_worker
    head = _pod(options, "ray-head", _resources(options.head_cpus, options.head_memory), gpu=False)
    worker = _pod(options, "ray-worker", _resources(options.cpus, options.memory, gpus), gpu=gpus > 0)
    submitter = {
        "metadata": {"labels": dict(LABELS)},
        "spec": {
            "serviceAccountName": options.name,
            "restartPolicy": "Never",
            "securityContext": _pod_security_context(),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": options.image,
                    "resources": _resources("500m", "512Mi"),
                    "securityContext": _security_context(),
                }
            ],
        },
    }
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(options),
        "spec": {
            "entrypoint": options.entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
            "activeDeadlineSeconds": options.active_deadline_seconds,
            "backoffLimit": options.backoff_limit,
            "submitterPodTemplate": submitter,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 120,
                    "resources": _resources("500m", "512Mi"),
                    "securityContext": _security_context(),
                },
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},
                "workerGroupSpecs": [
                    {
                        "groupName": options.group_name,
                        "replicas": options.min_workers,
                        "minReplicas": options.min_workers,
                        "maxReplicas": options.max_workers,
                        "rayStartParams": {},
                        "template": worker,
                    }
                ],
            },
        },
    }
    return [service_account, config_map, rayjob], notes


def render_file(
    path: str | Path, options: RenderOptions, overrides: Sequence[str] = ()
) -> tuple[list[dict], list[str]]:
    """:func:`render` for a spec file, with ``--set`` overrides; returns ``(objects, notes)``."""
    from clipmaps.pipeline.spec import SpecError, apply_overrides

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError((), f"cannot read job spec {str(path)!r}: {e.strerror or e}") from None
    if overrides:
        raw = apply_overrides(yaml.safe_load(text) or {}, overrides)
        text = f"# {Path(path).name} with --set {' --set '.join(overrides)}\n" + yaml.safe_dump(
            raw, sort_keys=False, allow_unicode=True
        )
    return _render(text, options)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump_manifests(objects: Sequence[Mapping], header: str = "") -> str:
    """The objects as one multi-document YAML stream (the job spec as a block literal)."""
    body = yaml.dump_all(
        [dict(o) for o in objects],
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=120,
    )
    return header + body


# --------------------------------------------------------------------------------------------------- sample input


def write_sample_input(spec, scenes: int = 6) -> tuple[str, bool]:
    """Write ``scenes`` generated scenes (``jobs.synth.scene_set``: JPEGs, masks, prompts, ground truth; what
    ``clipmaps demo`` uses) next to ``input.uri`` (one ``.jsonl`` file) and the JSON-lines manifest itself, through
    fsspec with ``input.storage_options``.

    Does nothing when the manifest already exists, so a retried smoke job reuses its input. Returns
    ``(manifest URI, written)``.
    """
    from .synth.scene_set import write_scene_set

    uri = spec.input.uri
    if spec.input.manifest_format != "jsonl" or not isinstance(uri, str):
        raise K8sError(f"sample input is a JSON-lines manifest; input.uri {spec.input.shown!r} is not one .jsonl file")
    fs, path = filesystem(uri, spec.input.storage_options)
    if fs.exists(path):
        return uri, False
    write_scene_set(uri, scenes, storage_options=dict(spec.input.storage_options))
    return uri, True


# --------------------------------------------------------------------------------------------------- CLI


def _render_cli(args: argparse.Namespace) -> int:
    from clipmaps.pipeline.spec import SpecError

    try:
        options = RenderOptions(
            name=args.name,
            namespace=args.namespace,
            image=args.image,
            gpus_per_worker=args.gpus_per_worker,
            min_workers=args.min_workers,
            max_workers=args.max_workers,
            worker_cpus=args.worker_cpus,
            worker_memory=args.worker_memory,
            head_cpus=args.head_cpus,
            head_memory=args.head_memory,
            secret=None if args.no_secret else args.secret,
            backoff_limit=args.backoff_limit,
            active_deadline_seconds=args.active_deadline_seconds,
            ttl_seconds_after_finished=args.ttl_seconds_after_finished,
            sample_input=args.sample_input,
        )
        objects, notes = render_file(args.spec, options, args.set or ())
    except (SpecError, K8sError) as e:
        print(f"clipmaps k8s render: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"clipmaps k8s render: note: {note}", file=sys.stderr)
    secret = (
        (
            f"# Credentials: Secret {options.secret!r} (keys {', '.join(k for k, _ in SECRET_KEYS)}), e.g.\n"
            f"#   kubectl create secret generic {options.secret} --from-literal=AWS_ACCESS_KEY_ID=… "
            "--from-literal=AWS_SECRET_ACCESS_KEY=…\n"
        )
        if options.secret
        else ""
    )
    header = (
        f"# clipmaps RayJob for {args.spec} (clipmaps k8s render); apply with kubectl apply -f\n{secret}"
        "# A retry (backoffLimit) reruns the same command on the same output.uri and resumes there.\n"
    )
    text = dump_manifests(objects, header)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def _sample_input_cli(args: argparse.Namespace) -> int:
    from clipmaps.pipeline.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec, overrides=args.set or ())
        uri, written = write_sample_input(spec, args.scenes)
    except (SpecError, K8sError) as e:
        print(f"clipmaps k8s sample-input: {e}", file=sys.stderr)
        return 2
    print(f"{'wrote' if written else 'kept the existing'} sample input {uri}")
    return 0
