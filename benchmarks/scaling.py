"""Scaling study: fidelity on the held-out real photos against the number of recorded inputs (each with its
counterfactual replays), with the filtering on and off. This is where the claim that filtering matters is
checked on our own data.

It takes the demo's trace store (run `graphdistill demo` or `benchmarks/e2e.py` first, or pass --store),
keeps every held-out group, subsamples the recorded training inputs to each size together with the replays
made from them, then for each size and for filtering on (default checks + `--min-agreement`) and off (no
checks, no agreement threshold, no dedup): filter -> train (same budget each) -> eval on the dataset's test
split, which is every held-out row whatever the filter's settings (the filter keeps them all for evaluation),
so every point is scored on the same rows. Writes JSON in the shape the report's scaling section reads:
{"points": [{"n_inputs", "replays", "filtered", "answer_f1", "box_map50", "mask_miou", ...}]}.

    python benchmarks/scaling.py --out benchmarks/results/scaling.json --sizes 16,32,64 --minutes 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from graphdistill.eval.result import read_eval

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# filtering off: `graphdistill filter --no-filtering` (FilterConfig.unfiltered: no checks, no agreement
# threshold, no dedup; the samples are still voted into one row per input)
UNFILTERED = ["--no-filtering"]


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "graphdistill.cli", *args], check=True, cwd=ROOT)


def subset_store(src_dir: Path, dst_dir: Path, n_train_groups: int, seed: int) -> tuple[int, int]:
    """Copy every held-out group, ``n_train_groups`` recorded training inputs and every replay made from
    them (traces + their blobs) into a new store. Returns (training inputs, replay groups) copied."""
    from graphdistill.recording.replay import replay_of
    from graphdistill.store.trace_store import TraceStore

    src, dst = TraceStore(src_dir), TraceStore(dst_dir)
    groups = src.groups()
    heldout, train, replays = [], [], {}
    for gid, ids in sorted(groups.items()):
        first = src.get(ids[0])
        recipe = first.provenance.recipe or {}
        edit = replay_of(first.provenance)
        if edit is not None:
            replays[gid] = str(edit.get("parent_group"))
        else:
            (heldout if recipe.get("heldout") else train).append(gid)
    random.Random(seed).shuffle(train)
    parents = set(train[:n_train_groups])
    kept_replays = [g for g, parent in replays.items() if parent in parents]
    for gid in heldout + sorted(parents) + kept_replays:
        for tid in groups[gid]:
            t = src.get(tid)
            dst.copy_from(src, t)
    return len(parents), len(kept_replays)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    ap.add_argument("--store", default=None, help="trace store (default: demo-out/store)")
    ap.add_argument(
        "--sizes", default="16,32,64", help="training inputs per point (capped at what was recorded)"
    )
    ap.add_argument("--epochs", type=int, default=40, help="training epochs per point (the demo's schedule)")
    ap.add_argument("--minutes", type=float, default=4.0, help="training time cap per point")
    ap.add_argument("--min-agreement", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="two tiny points; numbers mean little")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.minutes, args.epochs = "4,8", 0.3, 5
    store = (
        Path(args.store) if args.store else ROOT / ("demo-out-quick" if args.quick else "demo-out") / "store"
    )
    if not (store / "traces.sqlite").exists():
        _cli("demo", "--out", str(store.parent), *(["--quick"] if args.quick else []))
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gd-scaling-") as tmp:
        work = Path(tmp)
        for size in [int(s) for s in args.sizes.split(",")]:
            sub = work / f"store-{size}"
            n_inputs, n_replays = subset_store(store, sub, size, args.seed)
            for filtered in (True, False):
                tag = f"{size}-{'on' if filtered else 'off'}"
                ds, run = work / f"ds-{tag}", work / f"run-{tag}"
                flt = ["--min-agreement", str(args.min_agreement)] if filtered else UNFILTERED
                _cli("filter", str(sub), "--out", str(ds), *flt)
                manifest = json.loads((ds / "manifest.json").read_text())
                if not manifest.get("splits", {}).get("train"):
                    points.append({"n_inputs": n_inputs, "replays": n_replays, "filtered": filtered,
                                   "train_rows": 0, "note": "filtering kept no training rows"})  # fmt: skip
                    continue
                _cli(
                    "train",
                    str(ds),
                    "--out",
                    str(run),
                    "--epochs",
                    str(args.epochs),
                    "--max-minutes",
                    str(args.minutes),
                    "--seed",
                    str(args.seed),
                )
                _cli(
                    "eval", str(run), "--dataset", str(ds), "--split", "test", "--no-teacher-timing",
                    "--ci-resamples", "200",
                )  # fmt: skip
                ev = read_eval(run)
                fid, ci = ev["fidelity"], ev.get("fidelity_ci") or {}
                points.append({
                    "n_inputs": n_inputs, "replays": n_replays, "filtered": filtered,
                    "train_rows": manifest["splits"]["train"],
                    "answer_f1": fid.get("answer_f1"), "box_map50": fid.get("box_map50"),
                    "mask_miou": fid.get("mask_miou"), "sources_recall": fid.get("sources_recall"),
                    "answer_f1_ci": ci.get("answer_f1"), "sources_recall_ci": ci.get("sources_recall"),
                    "test_n": ev.get("n"),
                })  # fmt: skip
                print(json.dumps(points[-1]), flush=True)
    result = {
        "benchmark": "scaling",
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "store": str(store),
        "train_minutes_per_point": args.minutes,
        "train_epochs_per_point": args.epochs,
        "min_agreement": args.min_agreement,
        "points": points,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
