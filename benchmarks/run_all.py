"""`make bench`: run every benchmark, one JSON each in benchmarks/results/, then one markdown table.

Every headline is a ratio measured in one run on one machine. The table (benchmarks/results/summary.md) is
also written into README.md between the BENCH markers, with the machine it was measured on and the command
that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent

# name -> extra args; each script takes --out PATH
BENCHMARKS: dict[str, list[str]] = {
    "teacher": ["--n", "9"],
    # the real visual_rag graph; 3 interleaved rounds (min of each): one round cannot resolve 3 % when a
    # teacher query drifts by tens of percent (1 round measured +7.7 % on 2026-12-01, 3 rounds: see record.json)
    "record": ["--graph", "", "--n", "8", "--rounds", "3", "--batch", "4"],
    "student": [],
    "export": [],
    "e2e": [],  # runs (or resumes) the full demo first
    # issue 16: how far int8 moves the demo student's detector scores (needs e2e's demo-out/run)
    "int8_noise": ["--run", str(ROOT / "demo-out" / "run")],
    # issue 21: test-time augmentation on the demo's held-out photos, PyTorch and the int8 ExecuTorch bundle
    "tta": ["--demo-dir", str(ROOT / "demo-out")],
    # issue 21: recurrent depth (a student trained with --max-depth 4 on the demo's dataset) with and without TTA
    "depth": ["--demo-dir", str(ROOT / "demo-out")],
    # issue 20: active learning vs random selection, self-training filtered and not, 3 rounds on the demo's data
    "rounds": ["--demo-dir", str(ROOT / "demo-out")],
    "filter_memory": [],  # issue 18: the filter's memory is bounded by the largest group, not the store
    "scaling": [
        "--sizes",
        "12,24,48",
        "--epochs",
        "40",
        "--minutes",
        "9",
    ],  # the full demo records 48 training inputs; its training budget (9 min) holds their 40 epochs
    "ray_record": [],  # issue 19: recording on a local 2-CPU Ray cluster, 1 and 2 actors, vs the local path
}
# where each headline figure of the table comes from: benchmark -> keys of its "headline" (or top level)
SOURCES = {
    "record": ["recording_overhead_pct"],
    "teacher": ["batched_speedup"],
    "ray_record": ["ray_2_over_1_actor"],
}

GOALS = [
    # key in e2e.json "headline", label, goal text, predicate
    # issue 16: the inherited YOLO trunk costs more than the old student's, so ≤ 15 ms and ≥ 200× (were 10, 300)
    ("speedup_executorch", "speedup, ExecuTorch int8 student vs teacher graph", "≥ 200×", lambda v: v >= 200),
    ("speedup_onnx", "speedup, ONNX Runtime int8 student vs teacher graph", "≥ 200×", lambda v: v >= 200),
    ("speedup_pytorch", "speedup, PyTorch eager student vs teacher graph", "(no goal)", None),
    ("executorch_int8_ms", "whole query, ExecuTorch int8 bundle (ms)", "≤ 15", lambda v: v <= 15.0),
    (
        "student_eager_ms",
        "student model query, PyTorch eager (ms, `student.py`)",
        "≤ 30",
        lambda v: v <= 30.0,
    ),
    ("int8_pte_mb", "int8 ExecuTorch bundle size (MB)", "≤ 5 MB", lambda v: v <= 5.0),
    ("recording_overhead_pct", "recording overhead (%)", "< 3 %", lambda v: v < 3.0),
    ("batched_speedup", "teacher throughput, batched vs one-by-one", "(no goal)", None),
    ("ray_2_over_1_actor", "recording throughput on Ray, 2 actors vs 1 (toy graph)", "(no goal)", None),
    ("size_ratio", "teacher bytes / student bytes", "(no goal)", None),
    ("filter_peak_rss_mb", "filter peak RSS increase on the largest store (MB)", "(no goal)", None),
    ("read_all_peak_rss_mb", "the same store's traces all held at once (MB)", "(no goal)", None),
    ("demo_minutes", "full `make demo`, sum of its stage times (min)", "≤ 30", lambda v: v <= 30.0),
]


# fidelity to the teacher on the held-out real photos (issue 16's targets), for the PyTorch student and the
# shipped bundle: key in eval's fidelity, label, goal text, predicate
FIDELITY_GOALS = [
    ("answer_exact", "answer exact match", "(reported)", None),
    ("answer_f1", "answer token F1", "≥ 0.6", lambda v: v >= 0.6),
    ("box_map50", "box mAP@0.5", "≥ 0.7", lambda v: v >= 0.7),
    ("mask_miou", "mask mIoU", "≥ 0.6", lambda v: v >= 0.6),
    ("sources_recall", "sources recall", "≥ 0.8", lambda v: v >= 0.8),
]
FIDELITY_RUNTIMES = {  # column -> e2e.json fidelity_by_runtime key
    "PyTorch eager": "student, PyTorch eager",
    "ExecuTorch int8 bundle": "student, ExecuTorch XNNPACK int8",
}


def write_result(out: str | Path, result: dict[str, Any]) -> None:
    """One benchmark's JSON at ``out`` (folders made), as a benchmark writes it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def run(names: list[str], quick: bool) -> dict[str, dict]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}
    for name in names:
        script = HERE / f"{name}.py"
        target = RESULTS / f"{name}.json"
        cmd = [sys.executable, str(script), "--out", str(target), *BENCHMARKS[name]]
        if quick:
            cmd.append("--quick")
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        print(f"== {name}: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode == 0 and target.exists():
            out[name] = json.loads(target.read_text())
        else:
            out[name] = {"error": f"exit code {proc.returncode}"}
    return out


def table(results: dict[str, dict]) -> str:
    head = dict(results.get("e2e", {}).get("headline", {}))
    for bench, keys in SOURCES.items():
        data = results.get(bench, {})
        for k in keys:
            v = data.get("headline", {}).get(k, data.get(k))
            if v is not None:
                head[k] = v
    points = results.get("filter_memory", {}).get("points") or []
    if points:  # the largest store measured: streaming keeps the filter flat, holding every trace does not
        big = max(points, key=lambda p: p["traces"])
        head["filter_peak_rss_mb"] = big["filter"]["peak_rss_increase_mb"]
        head["read_all_peak_rss_mb"] = big["read_all"]["peak_rss_increase_mb"]
    e2e = results.get("e2e", {})
    ms = e2e.get("ms_per_query") or {}
    et_int8 = next((v for k, v in ms.items() if "ExecuTorch" in k and "int8" in k), None)
    if et_int8 is not None:
        head["executorch_int8_ms"] = et_int8
    eager = [
        q["ms_per_query_median"] for q in (results.get("student", {}).get("tiny") or {}).get("query", [])
    ]
    if eager:
        head["student_eager_ms"] = min(eager)  # the faster of 1 and 2 threads, as for the bundles
    stage_s = [v for v in (e2e.get("demo_stage_seconds") or {}).values() if v is not None]
    if stage_s and e2e.get("demo_inputs") == "default":
        head["demo_minutes"] = sum(stage_s) / 60
    refused = {
        f"speedup_{name.split('-')[0]}": "refused by its int8 fidelity gate"
        for name in e2e.get("refused_bundles", {})
        if name.endswith("-int8")
    }
    photos = f" about {e2e['held_out_photos']} photos" if e2e.get("held_out_photos") else ""
    lines = [
        f"Held-out real photos: {e2e.get('held_out_n', '?')} test rows{photos}. Measured on: {machine()}, {time.strftime('%Y-%m-%d')}. Reproduce: `make bench` "
        "(JSON per benchmark in `benchmarks/results/`).",
        "",
        "| measure | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for key, label, goal, ok in GOALS:
        v = head.get(key)
        if v is None:
            why = refused.get(key, "not measured")
            lines.append(f"| {label} | {why} | {goal} | {'**no**' if key in refused else '—'} |")
            continue
        met = "—" if ok is None else ("yes" if ok(v) else "**no**")
        if key in ("batched_speedup", "ray_2_over_1_actor"):
            fmt = f"{v:.2f}×"
        elif key.startswith("speedup") or key == "size_ratio":
            fmt = f"{v:,.0f}×"
        elif key.endswith("_rss_mb"):
            fmt = f"{v:,.1f}"
        else:
            fmt = f"{v:#.3g}"  # keeps its trailing zeros: 6.00, not 6
        lines.append(f"| {label} | {fmt} | {goal} | {met} |")
    lines += fidelity_table(e2e)
    ms = results.get("e2e", {}).get("ms_per_query", {})
    models_only = results.get("e2e", {}).get("ms_models_only", {})
    if ms:
        lines += [
            "",
            "| runtime | ms per query | speedup vs teacher | models only (ms) | speedup, models only |",
            "|---|---|---|---|---|",
        ]
        teacher = next((v for k, v in ms.items() if k.startswith("teacher")), None)
        for k, v in ms.items():
            sp = f"{teacher / v:,.0f}×" if teacher and v and not k.startswith("teacher") else "—"
            mo = models_only.get(k)
            mo_cells = f"{mo:,.1f} | {teacher / mo:,.0f}×" if mo and teacher else "— | —"
            lines.append(f"| {k} | {v:,.1f} | {sp} | {mo_cells} |")
        lines.append("")
        lines.append(
            "ms per query: the whole query on the held-out photos — for bundles `BundleRunner.predict`: "
            "letterbox the photo, the models, the whole answer, each mask pasted back inside its box at the photo's "
            "resolution and RLE-encoded — the faster of 1 and 2 runtime threads; teacher and PyTorch student with torch's "
            "default threads. Models only: the exported programs alone (encode + every decode step)."
        )
    points = results.get("scaling", {}).get("points") or []
    if points:
        lines += [
            "",
            f"Scaling study (`benchmarks/scaling.py`, {_budget(results['scaling'])} per point, held-out real "
            "photos):",
            "",
            "| training inputs | replays | filtered | train rows | answer F1 | box mAP@0.5 | mask mIoU | sources recall |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in sorted(points, key=lambda p: (p["n_inputs"], not p["filtered"])):
            cells = [_num(p.get(k)) for k in ("answer_f1", "box_map50", "mask_miou", "sources_recall")]
            lines.append(
                f"| {p['n_inputs']} | {p.get('replays', 0)} | {'on' if p['filtered'] else 'off'} | "
                f"{p.get('train_rows', '?')} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def _budget(scaling: dict) -> str:
    epochs, minutes = scaling.get("train_epochs_per_point"), scaling.get("train_minutes_per_point")
    if epochs:
        return f"{epochs} training epochs (at most {minutes} minutes)"
    return f"{minutes} training minutes"


def fidelity_table(e2e: dict) -> list[str]:
    """Each fidelity figure with its 95 % interval, "0.72 [0.61, 0.80]", for the PyTorch student and the
    ExecuTorch int8 bundle; met when every runtime measured meets the goal."""
    from graphdistill.eval.summary import fmt_ci

    by_runtime = dict(e2e.get("fidelity_by_runtime") or {})
    if not by_runtime and e2e.get("headline"):  # an e2e.json from before intervals: the PyTorch figures
        by_runtime = {FIDELITY_RUNTIMES["PyTorch eager"]: {"fidelity": e2e["headline"], "ci": {}}}
    if not by_runtime:
        return []
    photos = f" about {e2e['held_out_photos']} photos" if e2e.get("held_out_photos") else ""
    ci = e2e.get("ci") or {}
    how = (
        f"; 95 % bootstrap intervals, {ci.get('resamples')} resamples of the photos, then of each photo's rows"
        if ci.get("resamples")
        else ""
    )
    lines = [
        "",
        f"Fidelity to the teacher on the held-out real photos ({e2e.get('held_out_n', '?')} rows{photos}{how}):",
        "",
        "| measure vs teacher | " + " | ".join(FIDELITY_RUNTIMES) + " | goal | met | teacher vs itself |",
        "|---|" + "---|" * (len(FIDELITY_RUNTIMES) + 3),
    ]
    own = e2e.get("teacher_self") or {}
    for key, label, goal, ok in FIDELITY_GOALS:
        cells, verdicts = [], {}
        for column, runtime in FIDELITY_RUNTIMES.items():
            got = by_runtime.get(runtime) or {}
            v = (got.get("fidelity") or {}).get(key)
            cells.append("not measured" if v is None else fmt_ci(v, (got.get("ci") or {}).get(key)))
            if v is not None and ok is not None:
                verdicts[column] = bool(ok(v))
        if ok is None or not verdicts:
            met = "—"
        elif all(verdicts.values()):
            met = "yes"
        elif any(verdicts.values()):
            met = ", ".join(c for c, good in verdicts.items() if good) + " only"
        else:
            met = "**no**"
        mine = (own.get("fidelity") or {}).get(key)
        itself = "not measured" if mine is None else fmt_ci(mine, (own.get("fidelity_ci") or {}).get(key))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {goal} | {met} | {itself} |")
    if own.get("samples"):
        lines += [
            "",
            f"Teacher vs itself: the teacher's {own['samples']} other recorded samples of the same rows (sampled "
            "answers, flip/scale views mapped back) scored against the same reference with the same metrics: "
            "how closely one run of the teacher follows it. Not a goal; a student is not expected to beat it.",
        ]
    return lines


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def report_outputs(results: dict[str, dict]) -> None:
    """The scaling plot as a PNG beside the JSON, and the demo's report rebuilt with every study's section
    (scaling, test-time compute, rounds) whose results are there."""
    import base64

    from graphdistill.eval.report import plot_scaling, validate_scaling

    data = results.get("scaling", {})
    studies: list[str] = []
    if data.get("points"):
        uri = plot_scaling(validate_scaling(data))
        (RESULTS / "scaling.png").write_bytes(base64.b64decode(uri.split(",", 1)[1]))
        studies += ["--scaling", str(RESULTS / "scaling.json")]
    for name in ("tta", "depth"):
        if results.get(name, {}).get("settings"):
            studies += ["--tta", str(RESULTS / f"{name}.json")]
    if results.get("rounds", {}).get("arms"):
        studies += ["--rounds", str(RESULTS / "rounds.json")]
    run = ROOT / "demo-out" / "run"
    if studies and (run / "eval.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "graphdistill.cli",
            "report",
            str(run),
            "--out",
            str(run.parent / "report.html"),
        ]
        subprocess.run([*cmd, *studies], cwd=ROOT, check=False)


def write_readme(md: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- BENCH:START -->", "<!-- BENCH:END -->"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        _, post = rest.split(end, 1)
        readme.write_text(f"{pre}{start}\n{md}{end}{post}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {list(BENCHMARKS)})")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: proves the benchmarks run, numbers mean little"
    )
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument(
        "--table-only", action="store_true", help="rebuild the table from benchmarks/results/*.json"
    )
    args = ap.parse_args()
    names = args.names or list(BENCHMARKS)
    results = {} if args.table_only else run(names, args.quick)
    for p in RESULTS.glob("*.json"):  # keep earlier results of benchmarks not rerun
        results.setdefault(p.stem, json.loads(p.read_text()))
    md = table(results)
    (RESULTS / "summary.md").write_text(md)
    if not args.quick:
        report_outputs(results)
    print(md)
    if not args.no_readme and not args.quick:
        write_readme(md)
    return 0 if args.table_only or all("error" not in results[n] for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
