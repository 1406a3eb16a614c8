"""The command line: building the parser imports no command's library, handlers resolve, defaults agree.

``clipmaps --help``, ``clipmaps run --help`` and ``clipmaps k8s render`` run in a fresh interpreter, which then
reports what it imported: none of torch, Ray, FAISS or open_clip may be among it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipmaps.jobs.cli import build_parser, main
from clipmaps.jobs.commands import Handler

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "faiss", "open_clip")
COMMANDS = {
    "demo",
    "run",
    "manifest",
    "export",
    "k8s",
    "models",
    "schema",
    "index",
    "query",
    "report",
    "eval",
    "train",
    "figures",
}

PROBE = """
import json, sys
from clipmaps.jobs.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:  # --help exits
    rc = e.code
print(json.dumps({"rc": rc, "heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)}))
"""


def imported_by(argv: list[str], cwd: Path) -> dict:
    """Run ``clipmaps argv`` in a fresh interpreter; its exit code and which of :data:`HEAVY` it imported."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["k8s", "render", "--help"]], ids=" ".join)
def test_help_imports_no_heavy_library(argv, tmp_path):
    assert imported_by(argv, tmp_path) == {"rc": 0, "heavy": []}


def test_k8s_render_imports_no_heavy_library(tmp_path):
    spec = tmp_path / "job.yaml"
    shutil.copy(ROOT / "k8s" / "overlays" / "cpu-smoke" / "job.yaml", spec)
    out = tmp_path / "rayjob.yaml"
    argv = ["k8s", "render", str(spec), "--gpus-per-worker", "0", "--max-workers", "2", "-o", str(out)]
    assert imported_by(argv, tmp_path) == {"rc": 0, "heavy": []}
    assert "kind: RayJob" in out.read_text()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _leaves(parser: argparse.ArgumentParser, prefix: str = ""):
    """Every runnable (sub)command: ``(name, its parser)``."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not children:
        yield prefix.strip(), parser
    for action in children:
        for name, sub in action.choices.items():
            yield from _leaves(sub, f"{prefix} {name}")


def test_every_command_is_there_and_its_handler_resolves():
    parser = build_parser()
    assert set(_subparsers(parser)) == COMMANDS
    leaves = dict(_leaves(parser))
    assert {"manifest coco", "manifest sa1b", "manifest folder", "k8s render", "k8s sample-input"} <= set(leaves)
    for name, sub in leaves.items():
        handler = sub.get_default("func")
        assert isinstance(handler, Handler), name
        module, _, function = handler.target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), name


def test_defaults_agree_with_the_libraries():
    """The parser repeats some library defaults (so that it imports no library); they must not drift."""
    from clipmaps.jobs.index import build_index
    from clipmaps.jobs.k8s import RenderOptions
    from clipmaps.jobs.train import TrainConfig

    parser = build_parser()
    index = vars(parser.parse_args(["index", "out"]))
    for name, p in inspect.signature(build_index).parameters.items():
        if name in index and p.default is not inspect.Parameter.empty:
            assert index[name] == p.default, name
    render = vars(parser.parse_args(["k8s", "render", "job.yaml"]))
    for f in dataclasses.fields(RenderOptions):
        if f.name in render:
            assert render[f.name] == f.default, f.name
    assert render["secret"] == RenderOptions().secret and not render["no_secret"]
    train = vars(parser.parse_args(["train"]))
    for f in dataclasses.fields(TrainConfig):
        if f.name in train:
            assert train[f.name] == f.default, f.name


def test_a_command_without_its_required_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["eval"])
    assert e.value.code == 2 and "the following arguments are required: output" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- run refusals


def _job(tmp_path: Path, **model) -> Path:
    spec = {
        "input": {"manifest": str(tmp_path / "manifest.jsonl")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"name": "clipmaps-tiny-vit", "seed": 0, **model},
        "methods": {"legrad": {"size": 64}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.name=clipmaps-tiny-vt"], "model.name: unknown model 'clipmaps-tiny-vt' (did you mean"),
        (["model.name=convnext_tiny"], "methods.legrad: LeGrad cannot run on convnext_tiny (another timm image tower"),
        (["model.name=coca_ViT-B-32", "methods.gem.depth=7"], "methods.gem: GEM cannot run on coca_ViT-B-32 (CoCa"),
        (["methods.legrad.layers=9"], "methods.legrad.layers: 9 is out of range for the 8-layer image tower"),
        (["methods.legrad.size=60"], "methods.legrad.size: 60 is not a multiple of the patch size 8"),
        (["methods.legrad.layers=0", "methods.legrad.templates=[no placeholder]"], "2 problems in the job spec"),
        (["methods.gem.dept=2"], "methods.gem: --set 'methods.gem.dept=2': unknown key 'dept' (did you mean 'depth'?)"),
    ],
)
def test_dry_run_refuses_what_cannot_run_with_exit_2(tmp_path, capsys, sets, message):
    """The spec is checked against the model's configuration before anything is read or started: a typo, a backbone
    the method is not defined for, a parameter out of the model's range (no manifest exists here)."""
    from clipmaps.jobs.cli import main

    argv = ["run", str(_job(tmp_path)), "--dry-run", *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "resume" not in err and "Traceback" not in err


def test_dry_run_checks_the_weights(tmp_path, capsys):
    from clipmaps.jobs.cli import main

    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"image_id": "a", "image_uri": "/nowhere/a.png", "prompts": ["x"]}) + "\n"
    )
    job = _job(tmp_path)
    missing = ["--set", "model.seed=null", "--set", f"model.weights={tmp_path / 'nope.safetensors'}"]
    assert main(["run", str(job), "--dry-run", *missing]) == 2
    assert "model.weights: " in capsys.readouterr().err
    (tmp_path / "w.safetensors").write_bytes(b"not really weights")
    wrong = ["--set", "model.seed=null", "--set", f"model.weights={tmp_path / 'w.safetensors'}"]
    assert main(["run", str(job), "--dry-run", *wrong, "--set", f"model.weights_sha256={'0' * 64}"]) == 2
    assert "model.weights_sha256: " in capsys.readouterr().err
    assert main(["run", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "output    empty: 1 shards (1 images) to do" in out and "weights   random (seed 0)" in out


def test_schema_and_models_commands(tmp_path, capsys):
    from clipmaps.jobs.cli import main

    assert main(["schema", "-o", str(tmp_path / "schema.json")]) == 0
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert schema["title"] == "clipmaps job spec" and "GEMSettings" in schema["$defs"]
    assert main(["models", "--no-tags", "convnext"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("convnext")]
    assert rows and all(r[1] == "timm" and r[2] == "-" for r in rows)  # none of the methods runs on ConvNeXt
    assert main(["models", "--no-tags", "clipmaps-tiny"]) == 0
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()[1:5]}
    assert rows == {
        "clipmaps-tiny-coca": "legrad,maskinversion",
        "clipmaps-tiny-mappool": "legrad,maskinversion",
        "clipmaps-tiny-rn": "maskclip",
        "clipmaps-tiny-vit": "maskclip,gem,legrad,maskinversion",
    }


def test_weights_and_output_problems_are_configuration_errors(tmp_path, capsys):
    """Found trying clipmaps as a user: a missing weights file failed the run with exit 4 and 're-run to resume';
    a corrupt safetensors file and an output path that is a file passed --dry-run. All are exit 2 before Ray."""
    from clipmaps.jobs.cli import main

    row = {"image_id": "a", "image_uri": "/nowhere/a.png", "prompts": ["x"]}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    job = str(_job(tmp_path))
    weights = ["--set", "model.seed=null", "--set"]
    assert main(["run", job, *weights, f"model.weights={tmp_path / 'nope.safetensors'}"]) == 2  # a real run
    err = capsys.readouterr().err
    assert "model.weights: " in err and "not found" in err and "resume" not in err
    (tmp_path / "cut.safetensors").write_bytes((10**6).to_bytes(8, "little") + b'{"a": ')
    assert main(["run", job, "--dry-run", *weights, f"model.weights={tmp_path / 'cut.safetensors'}"]) == 2
    assert "is not a valid safetensors file (its header claims 1000000 bytes" in capsys.readouterr().err
    (tmp_path / "afile").write_text("not a folder")
    assert main(["run", job, "--dry-run", "--set", f"output.uri={tmp_path / 'afile'}"]) == 2
    assert "output.uri: " in capsys.readouterr().err


def test_every_bad_override_is_reported_at_once(tmp_path, capsys):
    from clipmaps.jobs.cli import main

    argv = ["run", str(_job(tmp_path)), "--dry-run", "--set", "methods.gem.dept=3", "--set", "methods.legrad.layrs=3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "'dept'" in err and "'layrs'" in err


def test_models_with_a_filter_that_matches_nothing(capsys):
    from clipmaps.jobs.cli import main

    assert main(["models", "--no-tags", "no-such-architecture"]) == 2
    assert "no architecture name contains 'no-such-architecture'" in capsys.readouterr().err


def test_version_and_logging_flags_before_or_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("clipmaps ")
    parser = build_parser()
    for argv in (["-v", "models"], ["models", "-v"], ["models", "--verbose"]):
        args = parser.parse_args(argv)
        assert args.verbose is True and args.quiet is False, argv
    for argv in (["-q", "schema"], ["schema", "-q"], ["k8s", "render", "job.yaml", "-q"]):
        args = parser.parse_args(argv)
        assert args.quiet is True and args.verbose is False, argv
    assert parser.parse_args(["models"]).verbose is False  # a subcommand's absent flag keeps the top level's default
    with pytest.raises(SystemExit):  # both at once, split around the subcommand
        main(["-v", "schema", "-q"])
    assert "exclude each other" in capsys.readouterr().err


def test_quiet_silences_the_summary_lines_of_every_command(tmp_path, capsys):
    """``-q`` is errors only for the commands that print a summary (here ``manifest``; ``export``, ``index``,
    ``report`` and ``demo`` share :func:`clipmaps.jobs.cli.printer`)."""
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (8, 8), (i * 90, 10, 10)).save(tmp_path / f"img{i}.png")
    assert main(["manifest", "folder", str(tmp_path), "-o", str(tmp_path / "m.jsonl")]) == 0
    assert "2 images" in capsys.readouterr().out
    assert main(["manifest", "folder", str(tmp_path), "-o", str(tmp_path / "m2.jsonl"), "-q"]) == 0
    assert capsys.readouterr().out == "" and (tmp_path / "m2.jsonl").exists()
