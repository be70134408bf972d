"""Recording on Ray: throughput with 1 and 2 actors, the per-trace overhead of the Ray path against the
local path, and what each way of getting traces into the store costs per trace (the writer choice).

The graph is a toy whose one node sleeps a fixed time on a 320x240 photo-like image, so the figures measure
the engine, not a model. One local Ray cluster (``num_cpus=2``, loopback, no dashboard) serves every Ray
measurement; its start is not counted, each run's actor start is (``seconds``) and is not in the steady
rate (``steady_traces_per_s``: from the first finished batch to the last).

Writer choice, per trace, on the same recorded traces:
- ``driver``: an actor's output table (trace JSON + blobs) through Ray's object store to the driver, which
  appends it to the store (what ``record_inputs(engine="ray")`` does);
- ``shard_merge``: the actor appends to its own shard store, then a merge reads each trace and its blobs
  back and appends them to the main store (the alternative).

    python benchmarks/ray_record.py --out benchmarks/results/ray_record.json   # about two minutes
    python benchmarks/ray_record.py --quick                                     # seconds; numbers mean little
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from run_all import machine

HERE = Path(__file__).resolve().parent
NODE_SLEEP_S = 0.1

GRAPH_SRC = textwrap.dedent(
    f"""
    import time
    from typing import Any, TypedDict

    from langgraph.graph import END, START, StateGraph


    class State(TypedDict, total=False):
        image: Any
        question: str
        answer: str


    def answer(state: State) -> dict:
        time.sleep({NODE_SLEEP_S})
        return {{"answer": f"{{state['question']}} {{int(state['image'][..., 0].mean())}}"}}


    def build():
        g = StateGraph(State)
        g.add_node("answer", answer)
        g.add_edge(START, "answer")
        g.add_edge("answer", END)
        return g.compile()
    """
)


def make_inputs(folder: Path, n: int) -> Path:
    """``n`` photo-like images (smooth gradients and noise: PNGs of realistic size) and their JSONL."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(n):
        rng = np.random.default_rng(i)
        base = np.stack([(xx + 7 * i) % 256, (yy + 13 * i) % 256, (xx + yy) // 3 % 256], axis=-1)
        img = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "imgs" / f"{i:04d}.png")
        rows.append({"image": f"imgs/{i:04d}.png", "question": f"what is {i}?"})
    path = folder / "inputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed_record(inputs: Path, store: Path, spec: str, **kw: Any) -> dict[str, Any]:
    from graphdistill.recording.batch import record_inputs

    stamps: list[tuple[float, int]] = []  # (when, traces recorded so far) at each progress call
    t0 = time.perf_counter()
    summary = record_inputs(
        inputs,
        store,
        graph=spec,
        progress=lambda _, t: stamps.append((time.perf_counter(), t["recorded"])),
        **kw,
    )
    total = time.perf_counter() - t0
    n = summary["recorded"]
    # the steady rate: traces recorded after the first progress call over the time since it (start excluded)
    (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
    steady = (n_last - n_first) / (t_last - t_first) if t_last > t_first else None
    return {  # steady: from progress calls, coarse when an engine reports few of them (Ray's output blocks)
        "recorded": n,
        "failed": summary["failed"],
        "seconds": round(total, 3),
        "traces_per_s": round(n / total, 3),
        "steady_traces_per_s": None if steady is None else round(steady, 3),
    }


def writer_costs(store_dir: Path, work: Path, rounds: int = 3) -> dict[str, Any]:
    """Per-trace ms of the two ways traces can reach the store, on the traces of ``store_dir``."""
    import ray

    from graphdistill.recording.ray_engine import _write, traces_table
    from graphdistill.store.trace_store import TraceStore

    with TraceStore(store_dir, readonly=True) as src:
        items = []
        for t in src.iter():
            blobs = {ref.blob: src.blob(ref.blob) for ref in t.blob_refs()}
            items.append((t, blobs))
    n = len(items)
    blob_bytes = sum(len(b) for _, blobs in items for b in blobs.values()) / max(n, 1)

    def driver(root: Path) -> tuple[float, float]:
        """The actor's output table -> object store -> the driver appends: (ship s, append s)."""
        t0 = time.perf_counter()
        got = ray.get(ray.put(traces_table(items, 0, 0)))
        ship = time.perf_counter() - t0
        with TraceStore(root) as main:
            t1 = time.perf_counter()
            counts, _ = _write(main, got)
            write = time.perf_counter() - t1
        assert counts["recorded"] == n
        return ship, write

    def shard_merge(root: Path) -> tuple[float, float]:
        """The actor appends to its shard; a merge reads it back into the main store: (shard s, merge s)."""
        t0 = time.perf_counter()
        with TraceStore(root / "shard") as shard:
            for t, blobs in items:
                shard.append(t, blobs)
        shard_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        with TraceStore(root / "shard", readonly=True) as shard, TraceStore(root / "main") as main:
            for t in shard.iter():
                main.copy_from(shard, t)
        return shard_write, time.perf_counter() - t0

    # interleaved rounds, the fastest of each: fsync times on a shared disk drift between runs
    ds, ss = [], []
    for r in range(rounds):
        order = [("d", driver), ("s", shard_merge)] if r % 2 == 0 else [("s", shard_merge), ("d", driver)]
        for kind, fn in order:
            (ds if kind == "d" else ss).append(fn(work / f"{kind}{r}"))
    ship, write = min(ds, key=sum)
    shard_write, merge = min(ss, key=sum)

    def ms(s: float) -> float:
        return round(1000 * s / max(n, 1), 3)

    return {
        "traces": n,
        "rounds": rounds,
        "blob_bytes_per_trace": round(blob_bytes),
        "driver": {
            "ship_ms": ms(ship),
            "driver_append_ms": ms(write),
            "total_ms": ms(ship + write),
            "single_writer_ceiling_traces_per_s": round(n / write, 1) if write else None,
        },
        "shard_merge": {
            "shard_append_ms": ms(shard_write),
            "merge_ms": ms(merge),
            "total_ms": ms(shard_write + merge),
        },
        "shard_merge_over_driver": round((shard_write + merge) / (ship + write), 2),
        # what only one process can do (the rest runs on the actors, in parallel): append vs merge
        "serial_merge_over_driver_append": round(merge / write, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results" / "ray_record.json"))
    ap.add_argument("--n", type=int, default=48, help="inputs per measurement")
    ap.add_argument("--batch", type=int, default=4, help="runs per actor call (and per local graph.batch)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs, numbers mean little")
    args = ap.parse_args()
    n = 8 if args.quick else args.n

    from graphdistill.recording.ray_engine import connect

    work = Path(tempfile.mkdtemp(prefix="gd-ray-bench-"))
    try:
        (work / "toy.py").write_text(GRAPH_SRC)
        spec = f"{work / 'toy.py'}:build"
        inputs = make_inputs(work / "data", n)
        # one run at a time (batch 1) and batched, locally: the reference for the per-trace overhead
        local1 = timed_record(inputs, work / "local1", spec, batch_size=1)
        local = timed_record(inputs, work / "local", spec, batch_size=args.batch)
        connect(num_cpus=2)  # imports ray: on the loopback only
        import ray

        try:
            ray1_b1 = timed_record(inputs, work / "ray1b1", spec, engine="ray", actors=1, batch_size=1)
            ray1 = timed_record(inputs, work / "ray1", spec, engine="ray", actors=1, batch_size=args.batch)
            ray2 = timed_record(inputs, work / "ray2", spec, engine="ray", actors=2, batch_size=args.batch)
            writers = writer_costs(work / "local", work / "writers")
        finally:
            ray.shutdown()

        def per_trace_ms(r: dict[str, Any]) -> float:
            return 1000 / r["steady_traces_per_s"]

        result = {
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
            "node_sleep_s": NODE_SLEEP_S,
            "inputs": n,
            "batch_size": args.batch,
            "local_batch1": local1,
            "local": local,
            "ray_1_actor_batch1": ray1_b1,
            "ray_1_actor": ray1,
            "ray_2_actors": ray2,
            "writer": writers,
            "headline": {
                # a ratio: steady throughput of 2 actors over 1, same batch size
                "ray_2_over_1_actor": round(ray2["steady_traces_per_s"] / ray1["steady_traces_per_s"], 2),
                # the Ray path's extra cost per trace over the local path, one run at a time (ms)
                "ray_overhead_ms_per_trace": round(per_trace_ms(ray1_b1) - per_trace_ms(local1), 2),
                "ray_1_actor_over_local": round(
                    ray1["steady_traces_per_s"] / local["steady_traces_per_s"], 2
                ),
                "shard_merge_over_driver_write": writers["shard_merge_over_driver"],
                "driver_single_writer_ceiling_traces_per_s": writers["driver"][
                    "single_writer_ceiling_traces_per_s"
                ],
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["headline"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
