"""What recording costs: recorded vs bare graph on the same inputs, throughput one-by-one vs batched vs N
worker processes, and the store's append rate for small traces.

By default the graph is synthetic, with node times like the real teacher's lighter nodes (sleep + a little
numpy on a 640x480 image); ``--graph SPEC`` measures a real one (e.g. the default visual_rag: ``--graph ''``).

    python benchmarks/record.py --out benchmarks/results/record.json          # a few minutes
    python benchmarks/record.py --quick                                         # seconds; numbers mean little
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NODE_SLEEP_S = {"detect": 0.060, "segment": 0.040, "answer": 0.080}


class _State(TypedDict, total=False):
    image: Any
    question: str
    boxes: Any
    mask: Any
    answer: str


def synthetic_graph() -> Any:
    """Three nodes with realistic-ish times: detect (boxes), segment (a mask), answer (text)."""
    from langgraph.graph import END, START, StateGraph

    def detect(s: _State) -> dict[str, Any]:
        time.sleep(NODE_SLEEP_S["detect"])
        img = s["image"]
        ys, xs = np.nonzero(img[::8, ::8, 0] > 200)
        box = (
            [float(xs.min() * 8), float(ys.min() * 8), float(xs.max() * 8), float(ys.max() * 8)]
            if len(xs)
            else []
        )
        return {"boxes": [box] if box else []}

    def segment(s: _State) -> dict[str, Any]:
        time.sleep(NODE_SLEEP_S["segment"])
        return {"mask": s["image"][..., 1] > 128}

    def answer(s: _State) -> dict[str, Any]:
        time.sleep(NODE_SLEEP_S["answer"])
        return {"answer": f"{len(s['boxes'])} objects, {int(s['mask'].sum())} mask pixels"}

    g = StateGraph(_State)
    g.add_node("detect", detect, metadata={"graphdistill_model_id": "synthetic-detector"})
    g.add_node("segment", segment, metadata={"graphdistill_model_id": "synthetic-segmenter"})
    g.add_node("answer", answer)
    g.add_edge(START, "detect")
    g.add_edge("detect", "segment")
    g.add_edge("segment", "answer")
    g.add_edge("answer", END)
    return g.compile(name="synthetic")


def _inputs(n: int, size: tuple[int, int]) -> list[dict[str, Any]]:
    """The built-in real photos (PNG-encoding noise would overstate the cost), cycled, distinct questions."""
    try:
        from graphdistill.recording.photos import builtin_photos

        photos = [p.image() for p in builtin_photos()]
    except Exception:  # no photos in this install: random images
        rng = np.random.default_rng(0)
        photos = [rng.integers(0, 255, (*size, 3), dtype=np.uint8)]
    return [{"image": photos[i % len(photos)], "question": f"What is in picture {i}?"} for i in range(n)]


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def overhead(graph: Any, inputs: list[dict[str, Any]], rounds: int, work: Path) -> dict[str, Any]:
    """Interleaved bare / recorded rounds over the same inputs; min of each (least disturbed by others).

    ``sync``: each trace is durable when invoke returns; ``background``: encoding and the fsynced append
    run on the recorder's writer thread (the time to flush the last ones is included)."""
    from graphdistill.recording.recorder import TraceRecorder, graph_identity
    from graphdistill.store.trace_store import TraceStore

    schema, gid = graph_identity(graph)
    graph.invoke(inputs[0])  # warm-up
    times: dict[str, list[float]] = {"bare": [], "sync": [], "background": []}
    for r in range(rounds):
        times["bare"].append(_time(lambda: [graph.invoke(x) for x in inputs]))
        for mode in ("sync", "background"):
            store = TraceStore(work / f"overhead-{mode}-{r}")
            rec = TraceRecorder(store, schema=schema, graph_id=gid, background=mode == "background")

            def run(rec: TraceRecorder = rec) -> None:
                for x in inputs:
                    graph.invoke(x, config={"callbacks": [rec]})
                rec.flush()

            times[mode].append(_time(run))
            rec.close()
            assert store.count() == len(inputs), f"{mode}: {store.count()} traces for {len(inputs)} inputs"
            store.close()
    best = {k: min(v) for k, v in times.items()}
    n = len(inputs)
    return {
        "inputs": n,
        "rounds": rounds,
        "bare_s_per_query": best["bare"] / n,
        **{
            f"{m}_{k}": v
            for m in ("sync", "background")
            for k, v in (
                ("s_per_query", best[m] / n),
                ("overhead_pct", 100.0 * (best[m] - best["bare"]) / best["bare"]),
                ("overhead_ms_per_query", 1000.0 * (best[m] - best["bare"]) / n),
            )
        },
        "rounds_s": times,
    }


def throughput(graph: Any, inputs: list[dict[str, Any]], batch: int, work: Path) -> dict[str, Any]:
    """Recorded traces per second (background writer, flushed): one-by-one ``invoke`` vs ``graph.batch``."""
    from graphdistill.recording.recorder import TraceRecorder, graph_identity
    from graphdistill.store.trace_store import TraceStore

    schema, gid = graph_identity(graph)
    seconds: dict[str, float] = {}
    for mode in ("one_by_one", "batched"):
        store = TraceStore(work / mode)
        rec = TraceRecorder(store, schema=schema, graph_id=gid, background=True)
        cfg = {"callbacks": [rec]}

        def run(mode: str = mode, rec: TraceRecorder = rec, cfg: dict[str, Any] = cfg) -> None:
            if mode == "one_by_one":
                for x in inputs:
                    graph.invoke(x, config=cfg)
            else:
                for i in range(0, len(inputs), batch):
                    graph.batch(inputs[i : i + batch], config=cfg)
            rec.flush()

        seconds[mode] = _time(run)
        rec.close()
        assert store.count() == len(inputs)
    return {
        "one_by_one_traces_per_s": len(inputs) / seconds["one_by_one"],
        "batched_traces_per_s": len(inputs) / seconds["batched"],
        "batch_size": batch,
        "batched_speedup": seconds["one_by_one"] / seconds["batched"],
    }


def workers(
    spec: str, n_inputs: int, n_workers: list[int], size: tuple[int, int], work: Path
) -> dict[str, Any]:
    """`graphdistill record --workers N` on a folder of images (includes starting the worker processes)."""
    from PIL import Image

    folder = work / "images"
    folder.mkdir(exist_ok=True)
    for i, x in enumerate(_inputs(n_inputs, size)):
        Image.fromarray(x["image"]).save(folder / f"{i:04d}.png")
    out: dict[str, Any] = {}
    for n in n_workers:
        cmd = [sys.executable, "-m", "graphdistill.cli", "record", "--graph", spec, "--inputs", str(folder),
               "--store", str(work / f"workers-{n}"), "--workers", str(n), "--json"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
        summary = json.loads(proc.stdout)
        out[str(n)] = {**summary, "traces_per_s": summary["recorded"] / summary["seconds"]}
    return out


def append_rate(n: int, work: Path) -> dict[str, Any]:
    """Small traces (a 64x64 image and a short answer) appended one by one, each durable (fsync)."""
    from graphdistill.store.trace_store import TraceStore
    from graphdistill.trace import GraphId, Trace, content_hash, encode_value

    store = TraceStore(work / "append")
    rng = np.random.default_rng(1)
    prepared = []
    for _ in range(n):
        blobs: dict[str, bytes] = {}
        inputs = encode_value(
            {"image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "question": "q"}, blobs
        )
        ih = content_hash(inputs)
        t = Trace(graph=GraphId(name="bench", hash="b"), inputs=inputs, output={"answer": "a"}, group_id=ih,
                  input_hash=ih)  # fmt: skip
        prepared.append((t, blobs))
    seconds = _time(lambda: [store.append(t, b) for t, b in prepared])
    return {"traces": n, "seconds": seconds, "appends_per_s": n / seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results" / "record.json"))
    ap.add_argument("--graph", default=None, help="graph spec (default: the synthetic graph here)")
    ap.add_argument("--n", type=int, default=24, help="inputs per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", default="1,2", help="worker counts to compare")
    ap.add_argument("--appends", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs, numbers mean little")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds, args.appends, args.workers = 4, 1, 30, "1"

    from graphdistill._env import apply_offline_env

    apply_offline_env()
    size = (480, 640)
    if args.graph is None:
        spec = f"{Path(__file__).resolve()}:synthetic_graph"
        graph = synthetic_graph()
    else:
        from graphdistill.graphs.spec import load_graph

        spec = args.graph
        graph = load_graph(args.graph or None)
    inputs = _inputs(args.n, size)
    with tempfile.TemporaryDirectory(prefix="gd-bench-record-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {
            "benchmark": "record",
            "graph": spec
            if args.graph is not None
            else "synthetic (detect 60 ms, segment 40 ms, answer 80 ms)",
            "image_size": list(size),
            "quick": args.quick,
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "overhead": overhead(graph, inputs, args.rounds, work),
            "throughput": throughput(graph, inputs, args.batch, work),
            "workers": workers(spec, args.n, [int(w) for w in args.workers.split(",")], size, work),
            "store_append": append_rate(args.appends, work),
        }
    result["headline"] = {
        "recording_overhead_pct": round(result["overhead"]["background_overhead_pct"], 2),
        "recording_overhead_sync_pct": round(result["overhead"]["sync_overhead_pct"], 2),
        "batched_speedup": round(result["throughput"]["batched_speedup"], 2),
        "appends_per_s": round(result["store_append"]["appends_per_s"], 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    ov = result["overhead"]
    print(
        f"recording overhead: background {ov['background_overhead_pct']:.2f}%, sync {ov['sync_overhead_pct']:.2f}% "
        f"({ov['sync_overhead_ms_per_query']:.1f} ms/query) on {ov['bare_s_per_query'] * 1000:.0f} ms/query; batched x{result['throughput']['batched_speedup']:.2f}; "
        f"workers {json.dumps({k: round(v['traces_per_s'], 2) for k, v in result['workers'].items()})} traces/s; "
        f"store {result['store_append']['appends_per_s']:.0f} appends/s -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
