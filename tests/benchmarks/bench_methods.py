"""Throughput of upstream vs clipmaps for GEM, LeGrad, MaskInversion and MaskCLIP on the same machine,
same seeded weights and same inputs. A benchmark, not a test (pytest does not collect ``bench_*.py``).

    /work/main/.venv/bin/python tests/benchmarks/bench_methods.py                       # CPU, defaults
    .venv/bin/python tests/benchmarks/bench_methods.py --images 2 --size 224 --repeats 1   # smoke run
    .venv/bin/python tests/benchmarks/bench_methods.py --device cuda --bf16 --json out.json
    .venv/bin/python tests/benchmarks/bench_methods.py --no-upstream --compile          # roofline only

For every repeat and method it runs ``upstream_worker.py`` (in ``--upstream-python``, default
``.venv-parity/bin/python``) and ``clipmaps_worker.py`` (in this python) as separate processes, one after the
other (the order alternates between repeats), so both sides see the same machine noise; each worker builds
the model and inputs untimed, warms up on one image, times the whole batch and prints one JSON line. The
table shows medians over the repeats. In the first repeat both workers also save their outputs and the
driver compares them (a check that both sides did the same work, not the parity test).

Then (unless ``--no-roofline``) ``roofline.py`` runs clipmaps alone in one more process on the same inputs and
prints, per method: counted GFLOP per image (or region), achieved GFLOP/s, the fraction of a matrix-product
ceiling measured on the same device in the same run, on CUDA the fraction of the device's bf16/fp32 dense peak
(MFU), and the operator calls of one batch; medians of ``--repeats`` calls. ``--no-upstream`` skips the
comparison (no ``.venv-parity`` needed) and ``--compile`` adds a roofline row per method through torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
METHODS = ("gem", "legrad", "maskinversion", "maskclip")
UNITS = {"gem": "images/s", "legrad": "images/s", "maskinversion": "regions/s", "maskclip": "images/s"}
# speed-up targets for the 2-core CPU (from the issue); printed, never enforced
CPU_TARGETS = {"gem": 2.0, "legrad": 3.0, "maskinversion": 8.0, "maskclip": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", type=int, default=448, help="square input size (default 448)")
    p.add_argument("--images", type=int, default=8, help="images per timed batch (default 8)")
    p.add_argument(
        "--mi-images",
        type=int,
        default=None,
        help="images for MaskInversion only (default --images); for slow upstream runs",
    )
    p.add_argument("--prompts", type=int, default=3, help="prompts per image for GEM and LeGrad (default 3)")
    p.add_argument("--masks", type=int, default=4, help="masks per image for MaskInversion (default 4)")
    p.add_argument("--classes", type=int, default=5, help="MaskCLIP vocabulary size (default 5)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="cuda: clipmaps also under bf16 autocast, with parity gap")
    p.add_argument("--upstream-python", default=str(REPO / ".venv-parity" / "bin" / "python"))
    p.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: all cores)")
    p.add_argument("--no-check", action="store_true", help="skip saving/comparing outputs in the first repeat")
    p.add_argument("--json", default=None, help="write all raw results and the summary here")
    p.add_argument("--no-upstream", action="store_true", help="skip the comparison with upstream (roofline only)")
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline table")
    p.add_argument("--compile", action="store_true", help="roofline: also time the methods through torch.compile")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {','.join(METHODS)}")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.mi_images is None:
        args.mi_images = args.images
    if args.bf16 and args.device != "cuda":
        p.error("--bf16 needs --device cuda")
    return args


# ------------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args) -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": args.threads,
        "platform": platform.platform(),
        "device": args.device,
    }


# ------------------------------------------------------------------------------------------------ workers
def worker_cmd(args, side: str, method: str, save: str | None) -> list[str]:
    python = args.upstream_python if side == "upstream" else sys.executable
    script = HERE / ("upstream_worker.py" if side == "upstream" else "clipmaps_worker.py")
    images = args.mi_images if method == "maskinversion" else args.images
    cmd = [
        python,
        str(script),
        "--method",
        method,
        "--model",
        args.model,
        "--size",
        str(args.size),
        "--images",
        str(images),
        "--prompts",
        str(args.prompts),
        "--masks",
        str(args.masks),
        "--classes",
        str(args.classes),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    if side == "clipmaps" and args.bf16:
        cmd.append("--bf16")
    if side == "clipmaps" and method == "maskclip":
        cmd.append("--text-cost")
    if save:
        cmd += ["--save", save]
    return cmd


def run_worker(args, side: str, method: str, save: str | None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # each side sees only its own venv
    cmd = worker_cmd(args, side, method, save)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if not lines:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
        return {"side": side, "method": method, "error": f"worker exited {proc.returncode} without a result:\n{tail}"}
    res = json.loads(lines[-1][len("BENCH_RESULT ") :])
    res["process_wall_seconds"] = wall
    # 1-minute load average around the worker: > threads means something else competed for the cores
    res["loadavg_1min"] = [load_before, load_after]
    if "seconds" in res and res.get("items"):
        res["throughput"] = res["items"] / res["seconds"]
    if "bf16_seconds" in res and res.get("items"):
        res["bf16_throughput"] = res["items"] / res["bf16_seconds"]
    return res


def compare_outputs(method: str, up_path: str, cm_path: str) -> dict:
    import numpy as np

    try:
        up, cm = np.load(up_path), np.load(cm_path)
    except OSError as e:
        return {"error": str(e)}
    key = up.files[0]
    a, b = up[key].astype(np.float64), cm[key].astype(np.float64)
    if a.shape != b.shape:
        return {"error": f"shape {a.shape} (upstream) vs {b.shape} (clipmaps)"}
    out = {
        "what": key,
        "shape": list(a.shape),
        "max_abs": float(np.abs(a - b).max()),
        "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)),
    }
    if method == "maskinversion":
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        out["min_cosine"] = float(cos.min())
    return out


# ------------------------------------------------------------------------------------------------ report
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def summarise(args, results: dict) -> dict:
    summary = {}
    for m in args.methods:
        ups, cms = results[m]["upstream"], results[m]["clipmaps"]
        row = {"unit": UNITS[m]}
        ok_up = [r for r in ups if "error" not in r]
        ok_cm = [r for r in cms if "error" not in r]
        if m == "gem" and ok_up:
            items = ok_up[0]["items"]
            modes = {
                "forward": median([items / r["seconds_forward"] for r in ok_up]),
                "batched_forward": median([items / r["seconds_batched"] for r in ok_up]),
            }
            best = max(modes, key=modes.get)
            row["upstream"] = modes[best]
            row["upstream_mode"] = f"GEMWrapper.{best}"
            row["upstream_modes"] = modes
        else:
            row["upstream"] = median([r.get("throughput") for r in ok_up])
            row["upstream_mode"] = ok_up[0].get("mode") if ok_up else None
        row["clipmaps"] = median([r.get("throughput") for r in ok_cm])
        row["ratio"] = row["clipmaps"] / row["upstream"] if row["upstream"] and row["clipmaps"] else None
        row["upstream_seconds"] = [r.get("seconds") for r in ok_up]
        row["clipmaps_seconds"] = [r.get("seconds") for r in ok_cm]
        if args.device == "cpu":
            row["target"] = CPU_TARGETS[m]
        if args.bf16:
            row["clipmaps_bf16"] = median([r.get("bf16_throughput") for r in ok_cm])
            row["ratio_bf16"] = (
                row["clipmaps_bf16"] / row["upstream"] if row["upstream"] and row["clipmaps_bf16"] else None
            )
            gaps = {}
            for r in ok_cm:
                for k, v in r.items():
                    if k.startswith("bf16_gap"):
                        gaps.setdefault(k, []).append(v)
            agg = {k: (min(v) if "cosine" in k and "min" in k else max(v)) for k, v in gaps.items()}
            row["bf16_gap"] = agg
            errs = [r["bf16_error"] for r in ok_cm if "bf16_error" in r]
            if errs:
                row["bf16_error"] = errs[0]
        if m == "maskclip":
            k_up = [r["text_seconds_uncached"] / r["text_classes"] for r in ok_up if "text_seconds_uncached" in r]
            k_cm = [r["text_seconds_uncached"] / r["text_classes"] for r in ok_cm if "text_seconds_uncached" in r]
            k_cc = [r["text_seconds_cached"] / r["text_classes"] for r in ok_cm if "text_seconds_cached" in r]
            row["text_seconds_per_class"] = {
                "upstream_uncached": median(k_up),
                "clipmaps_uncached": median(k_cm),
                "clipmaps_cached": median(k_cc),
            }
        row["errors"] = [r["error"] for r in ups + cms if "error" in r]
        summary[m] = row
    return summary


def print_report(args, info: dict, versions: dict, summary: dict, checks: dict) -> None:
    print()
    dev = versions.get("device_name") or info["cpu"]
    print(
        f"machine: {info['cpu']} | {info['cores']} cores ({info['cores_usable']} usable) | torch threads "
        f"{info['threads']} | device {args.device} ({dev}) | torch {versions.get('torch', '?')} | open_clip "
        f"upstream {versions.get('open_clip_upstream', '?')} / clipmaps {versions.get('open_clip_clipmaps', '?')}"
        f" | {versions.get('upstream_packages', '')}"
    )
    print(
        f"config: model {args.model}, {args.size}x{args.size}, {args.images} images"
        + (f" ({args.mi_images} for MaskInversion)" if args.mi_images != args.images else "")
        + f", {args.prompts} prompts/image, {args.masks} masks/image, {args.classes} MaskCLIP classes, "
        f"MaskInversion iterations=10 lr=0.5, {args.repeats} repeats (medians), fp32"
    )
    cols = ["method", "unit", "upstream", "clipmaps", "ratio", "target"]
    if args.bf16:
        cols += ["clipmaps bf16", "ratio bf16", "bf16 gap"]
    rows = []
    for m, r in summary.items():
        target = "-"
        if "target" in r:
            target = f">= {r['target']:g}x"
            if r["ratio"] is not None:
                target += " ok" if r["ratio"] >= r["target"] else " MISS"
        ratio = fmt(r["ratio"], ".2f") + ("x" if r["ratio"] else "")
        row = [m, r["unit"], fmt(r["upstream"]), fmt(r["clipmaps"]), ratio, target]
        if args.bf16:
            gap = ", ".join(f"{k.replace('bf16_gap_', '')}={v:.3g}" for k, v in r.get("bf16_gap", {}).items())
            row += [
                fmt(r.get("clipmaps_bf16")),
                fmt(r.get("ratio_bf16"), ".2f") + ("x" if r.get("ratio_bf16") else ""),
                gap or ("ERROR" if r.get("bf16_error") else "-"),
            ]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print()
    for m, r in summary.items():
        print(
            f"{m}: upstream = {r.get('upstream_mode')}; seconds per batch upstream "
            f"{[round(s, 2) for s in r['upstream_seconds']]} clipmaps {[round(s, 2) for s in r['clipmaps_seconds']]}"
        )
        if m == "gem" and "upstream_modes" in r:
            print(
                "  upstream GEM modes (images/s): " + ", ".join(f"{k} {fmt(v)}" for k, v in r["upstream_modes"].items())
            )
        if m == "maskclip" and "text_seconds_per_class" in r:
            t = r["text_seconds_per_class"]
            print(
                f"  85-template text encoding, seconds per class: upstream (reference, uncached) "
                f"{fmt(t['upstream_uncached'])}, clipmaps uncached {fmt(t['clipmaps_uncached'])}, clipmaps cached "
                f"{fmt(t['clipmaps_cached'], '.2e')} (image timings above use cached text on both sides)"
            )
        if m in checks:
            c = checks[m]
            if "error" in c:
                print(f"  output check: {c['error']}")
            else:
                extra = f", min cosine {c['min_cosine']:.6f}" if "min_cosine" in c else ""
                print(
                    f"  output check (upstream vs clipmaps, {c['what']} {c['shape']}): max-abs {c['max_abs']:.3g}, "
                    f"rel-L2 {c['rel_l2']:.3g}{extra}"
                )
        if r.get("bf16_error"):
            print(f"  bf16 FAILED in clipmaps:\n{r['bf16_error']}")
        for e in r["errors"]:
            print(f"  ERROR:\n{e}")


def run_roofline(args, *, dtype: str = "fp32", compile_: bool = False) -> list[dict]:
    """``roofline.py`` in a subprocess with this run's inputs; its ``ROOFLINE`` results (an ``error`` entry if none)."""
    cmd = [
        sys.executable,
        str(HERE / "roofline.py"),
        "--methods",
        ",".join(args.methods),
        "--model",
        args.model,
        "--size",
        str(args.size),
        "--images",
        str(args.images),
        "--prompts",
        str(args.prompts),
        "--masks",
        str(args.masks),
        "--classes",
        str(args.classes),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--dtype",
        dtype,
        "--quiet",
    ]
    if compile_:
        cmd.append("--compile")
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    out = [json.loads(ln[len("ROOFLINE ") :]) for ln in proc.stdout.splitlines() if ln.startswith("ROOFLINE ")]
    if proc.returncode or not out:
        out.append({"error": f"roofline.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"})
    return out


def roofline_section(args) -> list[dict]:
    """The roofline runs this invocation asks for, printed as one table."""
    sys.path.insert(0, str(HERE))
    import roofline

    runs = [("fp32", False)]
    if args.bf16:
        runs.append(("bf16", False))
    if args.compile:
        runs += [(dtype, True) for dtype, _ in list(runs)]
    results = []
    for dtype, compile_ in runs:
        results += run_roofline(args, dtype=dtype, compile_=compile_)
    ok = [r for r in results if "error" not in r]
    print()
    if ok:
        print(roofline.table(ok))
    for r in results:
        if "error" in r:
            print(f"roofline ERROR: {r['error']}")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_upstream:
        if args.no_roofline:
            print("--no-upstream with --no-roofline leaves nothing to run", file=sys.stderr)
            return 2
        results = roofline_section(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "roofline": results}, indent=1) + "\n")
        return 1 if any("error" in r for r in results) else 0
    if not Path(args.upstream_python).exists():
        print(
            f"upstream python {args.upstream_python} not found; create it with "
            "tests/parity/make_fixtures.py --setup-only",
            file=sys.stderr,
        )
        return 2
    info = machine_info(args)
    results = {m: {"upstream": [], "clipmaps": []} for m in args.methods}
    checks = {}
    tmp = tempfile.mkdtemp(prefix="clipmaps-bench-")
    t_start = time.perf_counter()
    try:
        for rep in range(args.repeats):
            for m in args.methods:
                order = ("upstream", "clipmaps") if rep % 2 == 0 else ("clipmaps", "upstream")
                saves = {}
                for side in order:
                    save = None if (rep or args.no_check) else os.path.join(tmp, f"{m}_{side}.npz")
                    res = run_worker(args, side, m, save)
                    results[m][side].append(res)
                    saves[side] = save
                    status = (
                        f"{res['seconds']:.2f} s, {res.get('throughput', 0):.3f} {UNITS[m]}"
                        if "seconds" in res
                        else "ERROR"
                    )
                    if "bf16_seconds" in res:
                        status += f"; bf16 {res['bf16_seconds']:.2f} s"
                    if res.get("loadavg_1min") and res["loadavg_1min"][1] is not None:
                        status += f"  (load {res['loadavg_1min'][1]:.1f})"
                    print(
                        f"[{time.perf_counter() - t_start:7.1f} s] repeat {rep + 1}/{args.repeats} {m:13s} "
                        f"{side:8s} {status}",
                        flush=True,
                    )
                if all(saves.values()) and all("error" not in results[m][s][-1] for s in saves):
                    checks[m] = compare_outputs(m, saves["upstream"], saves["clipmaps"])
                    for s in saves.values():
                        Path(s).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # consistency: same weights and inputs on both sides
    versions = {}
    problems = []
    for m in args.methods:
        ok = [r for side in ("upstream", "clipmaps") for r in results[m][side] if "error" not in r]
        if len({r.get("state_dict_sha256") for r in ok}) > 1:
            problems.append(f"{m}: state_dict differs between sides")
        if len({r.get("inputs_sha256") for r in ok}) > 1:
            problems.append(f"{m}: inputs differ between sides")
        for r in ok:
            mach = r.get("machine", {})
            versions.setdefault("torch", mach.get("torch"))
            versions[f"open_clip_{r['side']}"] = mach.get("open_clip")
            if mach.get("device_name"):
                versions["device_name"] = mach["device_name"]
            if r["side"] == "upstream" and mach.get("packages"):
                versions["upstream_packages"] = " ".join(f"{k} {v}" for k, v in mach["packages"].items())
            if mach.get("torch") != versions["torch"]:
                problems.append(f"{m}: torch versions differ ({mach.get('torch')} vs {versions['torch']})")
    summary = summarise(args, results)
    print_report(args, info, versions, summary, checks)
    for p in sorted(set(problems)):
        print(f"WARNING: {p}")
    loads = [
        r["loadavg_1min"][1]
        for m in args.methods
        for side in ("upstream", "clipmaps")
        for r in results[m][side]
        if r.get("loadavg_1min") and r["loadavg_1min"][1] is not None
    ]
    if loads and args.device == "cpu":
        busy = max(loads) > args.threads + 0.5
        print(
            f"1-min load average after the workers: median {statistics.median(loads):.1f}, max {max(loads):.1f}"
            + (
                f" (> {args.threads} threads: other processes competed for the cores; timings are noisy)"
                if busy
                else ""
            )
        )
    roof = [] if args.no_roofline else roofline_section(args)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        payload = {
            "args": vars(args),
            "machine": info,
            "versions": versions,
            "summary": summary,
            "checks": checks,
            "problems": sorted(set(problems)),
            "raw": results,
            "roofline": roof,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(s["errors"] for s in summary.values()) or any("error" in r for r in roof) else 0


if __name__ == "__main__":
    sys.exit(main())
