"""End to end: the demo's student against the demo's teacher graph, every runtime, in one process.

Runs (or resumes) `graphdistill demo` into a working folder, then re-measures in this one run on this one
machine: the teacher graph's ms per query, the PyTorch student's, and each exported bundle's (ONNX Runtime,
ExecuTorch/XNNPACK; float and int8), all on the same held-out real photos, plus the bundles' sizes and the
student's fidelity to the teacher on the held-out split. Writes JSON with a `headline` block that
`benchmarks/run_all.py` turns into the README table.

    python benchmarks/e2e.py --out benchmarks/results/e2e.json            # full demo (~30 min the first time)
    python benchmarks/e2e.py --quick                                       # quick demo; numbers mean little
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from graphdistill.eval.result import read_eval

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _graphdistill(*args: str) -> None:
    cmd = [sys.executable, "-m", "graphdistill.cli", *args]
    print("$ graphdistill " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _models_only_ms(bundle: Path, dataset: Path, n: int, repeats: int) -> float:
    """Median ms of ``BundleRunner.run_models`` on the first ``n`` test rows, best of 1 and 2 threads."""
    import statistics

    from graphdistill.dataset import open_dataset
    from graphdistill.runner.bundle import BundleRunner
    from graphdistill.runner.preprocess import load_rgb, preprocess

    ds = open_dataset(dataset)
    rows = ds.rows("test")[: max(1, n)]
    best = float("inf")
    for threads in (1, 2):
        runner = BundleRunner(bundle, threads=threads)
        inputs = [(preprocess(load_rgb(ds.image(r)), runner.spec)[0], r.question) for r in rows]
        for x, q in inputs:  # warm-up
            runner.run_models(x, q)
        times = []
        for _ in range(repeats):
            for x, q in inputs:
                t0 = time.perf_counter()
                runner.run_models(x, q)
                times.append((time.perf_counter() - t0) * 1e3)
        best = min(best, statistics.median(times))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results" / "e2e.json"))
    ap.add_argument(
        "--demo-dir", default=None, help="demo working folder (default: demo-out, or demo-out-quick)"
    )
    ap.add_argument("--quick", action="store_true", help="use the quick demo (minutes); numbers mean little")
    ap.add_argument(
        "--inputs", type=int, default=None, help="demo size: inputs made from the built-in photos"
    )
    ap.add_argument("--teacher-n", type=int, default=3, help="held-out photos timed for teacher and students")
    # 20 passes (60 queries, ~0.5 s per bundle and thread setting): 5 passes were a 0.1 s snapshot of a
    # machine whose speed drifts in phases of seconds
    ap.add_argument("--repeats", type=int, default=20, help="timed passes of each student over those photos")
    args = ap.parse_args()
    demo = Path(args.demo_dir or (ROOT / ("demo-out-quick" if args.quick else "demo-out")))
    t0 = time.perf_counter()
    sizes = ["--inputs", str(args.inputs)] if args.inputs else []
    _graphdistill("demo", "--out", str(demo), *(["--quick"] if args.quick else []), *sizes)
    demo_s = time.perf_counter() - t0
    run, dataset = demo / "run", demo / "dataset"
    bundles = sorted(p for p in (demo / "bundles").iterdir() if (p / "manifest.json").exists())
    bundle_args = [a for b in bundles for a in ("--bundle", str(b))]
    # one fresh measurement of everything, in one process, on this machine
    _graphdistill(
        "eval",
        str(run),
        "--dataset",
        str(dataset),
        "--split",
        "test",
        "--val",
        "--teacher-n",
        str(args.teacher_n),
        "--repeats",
        str(args.repeats),
        "--graph",
        "graphdistill.demo:demo_graph_cpu",
        *bundle_args,
    )
    ev = read_eval(run)
    cost, fid, exported = ev["cost"], ev["fidelity"], ev.get("exported", {})
    by_name = {Path(k).name: v for k, v in exported.items()}
    ms = {
        "teacher graph (PyTorch, CPU)": cost.get("teacher_ms"),
        "student, PyTorch eager": cost.get("student_ms"),
    }
    runtime_label = {"executorch": "student, ExecuTorch XNNPACK", "onnx": "student, ONNX Runtime CPU"}
    for name, v in by_name.items():
        fmt, q = name.rsplit("-", 1)
        ms[f"{runtime_label.get(fmt, fmt)} {'int8' if q == 'int8' else 'float'}"] = v.get("ms")

    models_only = {
        f"{runtime_label.get(b.name.rsplit('-', 1)[0], b.name)} {'int8' if b.name.endswith('int8') else 'float'}": (
            _models_only_ms(b, dataset, args.teacher_n, args.repeats)
        )
        for b in bundles
    }

    def speedup(name: str) -> float | None:
        v = by_name.get(name, {})
        return v.get("speedup_vs_teacher")

    # fidelity to the teacher on the held-out rows, with 95 % bootstrap intervals, for each runtime that
    # answered them (eval scores every bundle on every test row)
    fidelity_by_runtime = {
        "student, PyTorch eager": {"fidelity": fid, "ci": ev.get("fidelity_ci") or {}},
    }
    for name, v in by_name.items():
        if v.get("fidelity"):
            fmt, q = name.rsplit("-", 1)
            label = f"{runtime_label.get(fmt, fmt)} {'int8' if q == 'int8' else 'float'}"
            fidelity_by_runtime[label] = {"fidelity": v["fidelity"], "ci": v.get("fidelity_ci") or {}}

    headline = {
        "speedup_pytorch": cost.get("speedup"),
        "speedup_executorch": speedup("executorch-int8"),
        "speedup_onnx": speedup("onnx-int8"),
        "int8_pte_mb": by_name.get("executorch-int8", {}).get("bytes", 0) / 1e6 or None,
        "answer_f1": fid.get("answer_f1"),
        "box_map50": fid.get("box_map50"),
        "mask_miou": fid.get("mask_miou"),
        "size_ratio": cost.get("size_ratio"),
    }
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "load_average": os.getloadavg()[0],
        "demo_dir": str(demo),
        "demo_seconds_this_call": round(demo_s, 1),
        "demo_stage_seconds": {
            p.stem: json.loads(p.read_text()).get("seconds")
            for p in sorted((demo / ".stamps").glob("*.json"))
        },
        "held_out_n": ev.get("n"),
        "held_out_photos": ev.get("photos"),
        "fidelity_by_runtime": fidelity_by_runtime,
        # the teacher's other recorded samples against the same reference: how far the teacher follows itself
        "teacher_self": ev.get("teacher_self"),
        "ci": ev.get("ci"),
        "refused_bundles": {
            p.stem.removeprefix("export ").replace(" ", "-"): json.loads(p.read_text())["failed"]
            for p in sorted((demo / ".stamps").glob("export *.json"))
            if "failed" in json.loads(p.read_text())
        },
        "demo_inputs": args.inputs or "default",
        "headline": headline,
        "ms_per_query": ms,
        # the exported programs alone (encode + the whole answer's decode steps), without the runner's
        # Pillow/numpy work at the photo's full resolution (letterbox in, masks pasted and RLE-encoded out)
        "ms_models_only": models_only,
        "bytes": {
            "teacher": cost.get("teacher_bytes"),
            "student": cost.get("student_bytes"),
            **{name: v.get("bytes") for name, v in by_name.items()},
        },
        "fidelity_test": fid,
        "eval": ev,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({"headline": headline, "ms_per_query": ms}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
