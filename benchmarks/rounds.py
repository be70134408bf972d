"""Rounds study (issue 20): active learning against random selection with the same teacher budget, and
self-training with and without filtering, over rounds, on the demo's recorded data and its held-out photos.

From the demo's trace store (`make demo` first, or `--demo-dir`): a base student is trained on the held-out
groups (test only) plus `--initial` recorded training inputs picked at random (no replays, for every arm); the
other recorded training inputs of the demo's inputs file are the unlabelled pool. Each arm then runs
`graphdistill.improve.rounds.improve` for `--rounds` rounds of `--budget` inputs from that same base run. The
teacher arms' labels are the demo's own recordings of the picked inputs (`StoreLabeller`: K = 3 samples each, as
recorded; each copied trace counts as one teacher call), so the study measures selection, not recording speed;
the self-training arms label with the student. Everything is scored on the same held-out rows.

Writes benchmarks/results/rounds.json ({"arms": {arm: {"rounds": [...]}}, "active_vs_random": ...}) and
docs/rounds.png (the report's rounds picture).

    python benchmarks/rounds.py --demo-dir demo-out [--rounds 3 --budget 8 --initial 8 --epochs 15]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = ("answer_f1", "box_map50", "mask_miou", "sources_recall")


def initial_store(src_dir: Path, dst_dir: Path, n_train: int, seed: int) -> list[str]:
    """Every held-out group and ``n_train`` recorded training inputs (not replays) of ``src_dir`` into a new
    store; returns the training groups copied."""
    from graphdistill.recording.replay import replay_of
    from graphdistill.store.trace_store import TraceStore

    with TraceStore(src_dir, readonly=True, check=False) as src, TraceStore(dst_dir) as dst:
        groups = src.groups()
        heldout, train = [], []
        for gid, ids in sorted(groups.items()):
            first = src.get(ids[0])
            if replay_of(first.provenance) is not None:
                continue
            (heldout if (first.provenance.recipe or {}).get("heldout") else train).append(gid)
        random.Random(seed).shuffle(train)
        chosen = sorted(train[:n_train])
        for gid in heldout + chosen:
            for tid in groups[gid]:
                t = src.get(tid)
                dst.copy_from(src, t)
    return chosen


def pool_file(inputs: Path, store: Path, chosen: set[str], out: Path) -> int:
    """The demo's training inputs the store recorded and the base run was not trained on, as an inputs
    file (absolute image paths); how many."""
    from graphdistill.images import load_image
    from graphdistill.improve.labels import input_group
    from graphdistill.recording.batch import read_inputs
    from graphdistill.store.trace_store import TraceStore

    rows, _ = read_inputs(inputs)
    with TraceStore(store, readonly=True, check=False) as s:
        recorded = set(s.groups())
    n = 0
    with out.open("w") as fh:
        for r in rows:
            if (r["provenance"].get("recipe") or {}).get("heldout"):
                continue
            gid = input_group(load_image(r["image"]), r["question"])
            if gid in recorded and gid not in chosen:
                fh.write(json.dumps(r) + "\n")
                n += 1
    return n


def calls_to_match(
    active: list[dict[str, Any]], random_arm: list[dict[str, Any]], key: str
) -> dict[str, Any]:
    """Teacher calls active learning needed to reach random selection's last-round figure ``key``."""
    target = random_arm[-1]["fidelity"].get(key)
    spent = random_arm[-1]["teacher_calls"]
    if target is None or not spent:
        return {"random_final": target, "random_calls": spent, "active_calls": None, "share": None}
    for r in active:
        v = r["fidelity"].get(key)
        if v is not None and v >= target - 1e-9:
            return {"random_final": target, "random_calls": spent, "active_calls": r["teacher_calls"],
                    "share": r["teacher_calls"] / spent}  # fmt: skip
    return {"random_final": target, "random_calls": spent, "active_calls": None, "share": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default=str(ROOT / "demo-out"))
    ap.add_argument("--out", default=str(HERE / "results" / "rounds.json"))
    ap.add_argument("--picture", default=str(ROOT / "docs" / "rounds.png"))
    ap.add_argument("--work", default=None, help="keep the arms' folders here (default: a temporary folder)")
    ap.add_argument("--arms", default="active,random,self-filtered,self-unfiltered")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=8, help="inputs labelled per round")
    ap.add_argument(
        "--initial", type=int, default=8, help="recorded training inputs the base run starts from"
    )
    ap.add_argument("--epochs", type=int, default=15, help="warm-start epochs per round")
    ap.add_argument("--base-epochs", type=int, default=40, help="the base run's epochs (the demo's schedule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="one round of 2 inputs, 1 epoch: proves it runs")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.budget, args.initial, args.epochs, args.base_epochs = 1, 2, 4, 1, 2

    import tempfile

    from graphdistill._env import apply_offline_env

    apply_offline_env()
    from graphdistill.eval.report import plot_rounds, validate_rounds
    from graphdistill.filter.filtering import filter_store
    from graphdistill.filter.vote import default_embedder
    from graphdistill.improve.labels import StoreLabeller
    from graphdistill.improve.rounds import ImproveConfig, filter_config, improve
    from graphdistill.store.trace_store import TraceStore
    from graphdistill.student.train import TrainConfig, train

    demo = Path(args.demo_dir)
    store = demo / "store"
    if not (store / "traces.sqlite").exists():
        raise SystemExit(f"{store}: no demo trace store; run `make demo` (or pass --demo-dir)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gd-rounds-"))
    work.mkdir(parents=True, exist_ok=True)
    embedder = default_embedder()
    t_all = time.perf_counter()

    def tick(stage: str, done: int, total: int) -> None:
        if done == total:
            print(f"  {stage}: {done}/{total}", flush=True)

    base_store, base_ds, base_run = work / "base-store", work / "base-dataset", work / "base-run"
    if not (base_run / "model.safetensors").exists():
        chosen = initial_store(store, base_store, args.initial, args.seed)
        (work / "initial.json").write_text(json.dumps(chosen))
        with TraceStore(base_store, readonly=True, check=False) as traces:
            filter_store(traces, base_ds, filter_config("active", 0.0), embedder=embedder,
                         source_store=str(base_store.resolve()))  # fmt: skip
        train(TrainConfig(dataset=str(base_ds), out=str(base_run), epochs=args.base_epochs, device="cpu",
                          seed=args.seed))  # fmt: skip
    chosen = json.loads((work / "initial.json").read_text())
    pool = work / "pool.jsonl"
    n_pool = pool_file(demo / "inputs.jsonl", store, set(chosen), pool)
    print(f"base run on {len(chosen)} inputs; pool of {n_pool} inputs", flush=True)

    arms: dict[str, Any] = {}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        t0 = time.perf_counter()
        print(f"arm {arm}", flush=True)
        state = improve(
            base_run, pool, work / arm,
            ImproveConfig(arm=arm, rounds=args.rounds, budget=args.budget, samples=3, epochs=args.epochs,
                          seed=args.seed),
            labeller=StoreLabeller(store, samples=3), embedder=embedder, progress=tick,
            on_round=lambda r: print(json.dumps({k: r[k] for k in ("round", "teacher_calls", "train_rows",
                                                                   "fidelity", "diversity")}), flush=True),
        )  # fmt: skip
        arms[arm] = {"rounds": state["rounds"], "seconds": time.perf_counter() - t0}
    result: dict[str, Any] = {
        "benchmark": "rounds",
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "demo_dir": str(demo),
        "initial_inputs": len(chosen),
        "pool_inputs": n_pool,
        "budget": args.budget,
        "rounds": args.rounds,
        "epochs_per_round": args.epochs,
        "base_epochs": args.base_epochs,
        "teacher_samples": 3,
        "seconds": time.perf_counter() - t_all,
        "arms": arms,
    }
    if "active" in arms and "random" in arms:
        result["active_vs_random"] = {
            k: calls_to_match(arms["active"]["rounds"], arms["random"]["rounds"], k) for k in FIGURES
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    uri = plot_rounds(validate_rounds(result))
    pic = Path(args.picture)
    pic.parent.mkdir(parents=True, exist_ok=True)
    pic.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    print(f"wrote {out} and {pic} in {result['seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
