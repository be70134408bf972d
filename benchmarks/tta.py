"""Test-time augmentation (issue 21): what each view buys in fidelity to the teacher and costs in milliseconds.

For each setting (none, flip, scale, flip+scale, and the adaptive ``AUGS@SCORE``) the demo's student is evaluated on
the held-out photos (the dataset's test split: photos no training input was made from) with
:func:`graphdistill.eval.evaluate_run`'s ``tta``, as the PyTorch student and as the shipped int8 ExecuTorch bundle
(its runner fuses the views as ``BundleRunner.predict(..., tta=)`` does). Then both are timed on the same machine
in the same run, one after the other, each with its settings interleaved round by round (a query's time drifts
on a shared CPU; an answer's length, and so its decoding time, differs from view to view): the median of every
setting's per-query times over ``--rounds`` passes of ``--timed`` held-out rows. Nothing is chosen from these
figures; the default stays no augmentation.

    python benchmarks/tta.py --demo-dir demo-out [--out benchmarks/results/tta.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# "AUGS@SCORE": the adaptive policy, the views only when the photo's own answer has an object under SCORE (or
# none); 0.5 is set here a priori (halfway from the detector's 0.25 to certainty), not chosen from these photos
SETTINGS = ("", "flip", "scale", "flip,scale", "flip@0.5", "scale@0.5", "flip,scale@0.5")
FIGURES = ("answer_f1", "answer_exact", "box_map50", "mask_miou", "sources_recall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default=str(HERE.parent / "demo-out"))
    ap.add_argument("--bundle", default="executorch-int8", help="the bundle under DEMO/bundles to measure")
    ap.add_argument("--settings", default=";".join(SETTINGS), help="';'-separated tta settings ('' = none)")
    ap.add_argument("--threads", type=int, default=2, help="runtime threads the bundle is timed with")
    ap.add_argument("--timed", type=int, default=8, help="held-out rows every setting is timed on")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing passes over them")
    ap.add_argument("--ci-resamples", type=int, default=1000)
    ap.add_argument("--out", default=str(HERE / "results" / "tta.json"))
    args = ap.parse_args()

    from graphdistill.eval.evaluate import evaluate_run

    demo = Path(args.demo_dir)
    run, dataset, bundle = demo / "run", demo / "dataset", demo / "bundles" / args.bundle
    for need in (run / "model.safetensors", dataset / "manifest.json", bundle / "manifest.json"):
        if not need.is_file():
            raise SystemExit(f"{need} is missing: run `make demo` first (or pass --demo-dir)")
    rows: list[dict[str, Any]] = []
    for setting in args.settings.split(";"):
        augs, below = parse_setting(setting)
        t0 = time.perf_counter()
        res = evaluate_run(
            run,
            dataset,
            split="test",
            teacher_timing=False,
            teacher_n=1,
            student_repeats=1,
            bundles=[bundle],
            bundle_threads=(args.threads,),
            semantic=False,
            ci_resamples=args.ci_resamples,
            tta=augs,
            tta_below=below,
        )
        exported = res["exported"][str(bundle)]
        row = {
            "tta": setting or "none",
            "n": res["n"],
            "photos": res.get("photos"),
            "pytorch": {k: res["fidelity"].get(k) for k in FIGURES},
            "pytorch_ci": {k: (res.get("fidelity_ci") or {}).get(k) for k in FIGURES},
            "bundle": {k: exported["fidelity"].get(k) for k in FIGURES},
            "bundle_ci": {k: (exported.get("fidelity_ci") or {}).get(k) for k in FIGURES},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    knobs = {r["tta"]: knobs_of(r["tta"]) for r in rows}
    timing = time_settings(run, dataset, bundle, knobs, args.timed, args.rounds, args.threads)
    shares = views_shares(run, dataset, bundle, [r["tta"] for r in rows], args.threads)
    for r in rows:
        r.update(timing[r["tta"]], **shares.get(r["tta"], {}))
    base = rows[0]
    for r in rows:
        r["bundle_ms_ratio"] = round(r["bundle_ms"] / base["bundle_ms"], 2)
        r["pytorch_ms_ratio"] = round(r["pytorch_ms"] / base["pytorch_ms"], 2)
    out = {
        "demo_dir": str(demo),
        "bundle": args.bundle,
        "threads": args.threads,
        "timed_rows": args.timed,
        "timing_rounds": args.rounds,
        "split": "test",
        "settings": rows,
    }
    write_study(out, Path(args.out), "tta", "none")


def write_study(out: dict[str, Any], path: Path, name: str, base: str) -> None:
    """Write a test-time compute study's JSON to ``path`` and print its bundle's table (each setting named by
    its ``name`` key, the ms ratio against the ``base`` setting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"| {name} | bundle ms (× {base}) | answer F1 | box mAP@0.5 | mask mIoU | sources recall |")
    for r in out["settings"]:
        b = r["bundle"]
        print(
            f"| {r[name]} | {r['bundle_ms']:.1f} ({r['bundle_ms_ratio']}×) | {b['answer_f1']:.2f} | "
            f"{b['box_map50']:.2f} | {b['mask_miou']:.2f} | {b['sources_recall']:.2f} |"
        )


def parse_setting(setting: str) -> tuple[str, float | None]:
    """``"flip,scale@0.5"`` -> (``"flip,scale"``, 0.5); ``"flip"`` -> (``"flip"``, None)."""
    augs, _, below = setting.partition("@")
    return augs, float(below) if below else None


def knobs_of(setting: str) -> dict[str, Any]:
    """The ``predict`` keywords of a setting ("none" or ``AUGS[@SCORE]``)."""
    augs, below = parse_setting("" if setting == "none" else setting)
    return {"tta": augs, "tta_below": below}


def time_settings(
    run: Path,
    dataset: Path,
    bundle: Path,
    knobs: dict[str, dict[str, Any]],
    timed: int,
    rounds: int,
    threads: int,
) -> dict[str, Any]:
    """Median ms of one query for each setting (name -> ``predict`` keywords), PyTorch and the bundle, the
    settings interleaved round by round over the first ``timed`` held-out rows."""
    import statistics

    from graphdistill.dataset import open_dataset
    from graphdistill.runner import BundleRunner
    from graphdistill.student.predict import load_student

    ds = open_dataset(dataset)
    rows = [r for r in ds.rows("test") if not r.is_replay][:timed]
    inputs = [(ds.image(r), r.question) for r in rows]
    student, runner = load_student(run), BundleRunner(bundle, threads=threads)
    models: dict[str, Any] = {"pytorch": student.predict, "bundle": runner.predict}
    ms: dict[tuple[str, str], list[float]] = {}
    for predict in models.values():  # warm up
        predict(*inputs[0], tta=())
    # one model at a time (PyTorch's worker threads spin for a while after a call and would slow the runtime
    # timed next), its settings interleaved round by round
    for name, predict in models.items():
        for _ in range(rounds):
            for setting, kw in knobs.items():
                for image, question in inputs:
                    t0 = time.perf_counter()
                    predict(image, question, **kw)
                    ms.setdefault((setting, name), []).append((time.perf_counter() - t0) * 1000)
    return {s: {f"{n}_ms": round(statistics.median(ms[(s, n)]), 2) for n in models} for s in knobs}


def views_shares(run: Path, dataset: Path, bundle: Path, settings: list[str], threads: int) -> dict[str, Any]:
    """For each adaptive setting: on what share of the held-out rows the photo's own answer was unsure (the
    views were spent), PyTorch and the bundle."""
    from graphdistill.dataset import open_dataset
    from graphdistill.runner import BundleRunner
    from graphdistill.runner.tta import unsure
    from graphdistill.student.predict import load_student

    adaptive = {s: parse_setting(s)[1] for s in settings if parse_setting(s)[1] is not None}
    if not adaptive:
        return {}
    ds = open_dataset(dataset)
    student, runner = load_student(run), BundleRunner(bundle, threads=threads)
    models: dict[str, Any] = {"pytorch": student, "bundle": runner}
    all_rows = [r for r in ds.rows("test") if not r.is_replay]
    # each photo's own answer and whether it holds a near miss: what the policy decides from
    first = {n: [m.first_answer(ds.image(r), r.question) for r in all_rows] for n, m in models.items()}
    return {
        s: {
            f"{n}_views_share": round(
                sum(unsure(a, runner.outputs, below, near) for a, near in first[n]) / len(all_rows), 3
            )
            for n in models
        }
        for s, below in adaptive.items()
    }


if __name__ == "__main__":
    main()
