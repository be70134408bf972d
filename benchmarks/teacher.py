"""The reference teacher graph's cost: per-node and whole-graph ms per query, one-by-one vs `graph.batch`.

Warm numbers (after one warm-up query) over the built-in real photos; written as JSON (``--out``), with a short
table printed. Per-node times come from LangGraph's callbacks (the node runs as LangGraph sees them; parallel
nodes overlap, so they do not add up to the whole graph).

    python benchmarks/teacher.py --n 9 --out benchmarks/results/teacher.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
QUESTIONS = [
    "What is in this picture?",
    "What objects can you see, and where are they?",
    "Describe the main object in one sentence.",
]


def node_timer() -> Any:
    """A langchain-core callback that times every LangGraph node run (by its run id)."""
    from langchain_core.callbacks import BaseCallbackHandler

    class NodeTimer(BaseCallbackHandler):
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.started: dict[Any, tuple[str, float]] = {}
            self.ms: dict[str, list[float]] = {}

        def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: Any, **kw: Any) -> None:
            node = (kw.get("metadata") or {}).get("langgraph_node")
            if node and kw.get("name") == node:
                with self.lock:
                    self.started[run_id] = (node, time.perf_counter())

        def on_chain_end(self, outputs: Any, *, run_id: Any, **kw: Any) -> None:
            with self.lock:
                if run_id in self.started:
                    node, t0 = self.started.pop(run_id)
                    self.ms.setdefault(node, []).append((time.perf_counter() - t0) * 1000)

    return NodeTimer()


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "mean": round(statistics.fmean(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "count": len(values),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "teacher.json"))
    ap.add_argument("--n", type=int, default=9, help="queries (built-in photos, cycled; default 9)")
    ap.add_argument("--quick", action="store_true", help="--n 2: proves it runs, the numbers mean little")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    n = 2 if args.quick else args.n
    if n < 1:
        ap.error("--n must be at least 1")

    from rich.console import Console
    from rich.table import Table

    from graphdistill._env import apply_offline_env

    apply_offline_env()
    from graphdistill.graphs.builder import schema_of
    from graphdistill.graphs.visual_rag import VisualRagConfig, visual_rag
    from graphdistill.recording.photos import builtin_photos

    con = Console(stderr=True)
    photos = builtin_photos()
    inputs = [
        {"image": photos[i % len(photos)].image(), "question": QUESTIONS[i % len(QUESTIONS)]}
        for i in range(n)
    ]
    with con.status("loading the teacher models…"):
        t0 = time.perf_counter()
        graph = visual_rag(VisualRagConfig(device=args.device))
        load_s = time.perf_counter() - t0
    with con.status("warm-up query…"):
        graph.invoke(inputs[0])

    timer = node_timer()
    one_ms: list[float] = []
    with con.status("one by one…") as status:
        for i, x in enumerate(inputs):
            status.update(f"one by one: query {i + 1}/{n}")
            t0 = time.perf_counter()
            graph.invoke(x, config={"callbacks": [timer]})
            one_ms.append((time.perf_counter() - t0) * 1000)
    batch_timer = node_timer()
    with con.status(f"graph.batch of {n}…"):
        t0 = time.perf_counter()
        graph.batch(inputs, config={"callbacks": [batch_timer]})
        batch_total_ms = (time.perf_counter() - t0) * 1000

    one_per_query = statistics.fmean(one_ms)
    batch_per_query = batch_total_ms / n
    result = {
        "benchmark": "teacher",
        "graph": schema_of(graph).model_dump(mode="json"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "device": args.device,
        },
        "n": n,
        "questions": QUESTIONS,
        "photos": [photos[i % len(photos)].id for i in range(n)],
        "load_s": round(load_s, 2),
        "one_by_one": {
            "ms_per_query": summarize(one_ms),
            "per_node_ms": {k: summarize(v) for k, v in timer.ms.items()},
        },
        "batch": {
            "ms_per_query": round(batch_per_query, 2),
            "total_ms": round(batch_total_ms, 2),
            "per_node_ms": {k: summarize(v) for k, v in batch_timer.ms.items()},
        },
        "batched_speedup": round(one_per_query / batch_per_query, 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)

    table = Table(
        "node", "one-by-one median ms", "in graph.batch median ms", title=f"teacher graph, {n} queries"
    )
    for node, s in result["one_by_one"]["per_node_ms"].items():
        b = result["batch"]["per_node_ms"].get(node, {})
        table.add_row(node, f"{s['median']:,.1f}", f"{b.get('median', float('nan')):,.1f}")
    table.add_row(
        "[bold]whole graph / query[/]", f"{statistics.median(one_ms):,.1f}", f"{batch_per_query:,.1f}"
    )
    Console().print(table)
    Console().print(f"batched speedup: {result['batched_speedup']:.2f}×  (results: {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
