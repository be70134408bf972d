"""Filtering memory: peak RSS of `filter_store` on stores of 600 and 2,400 synthetic traces, against holding
every trace of the store in memory at once (what the filter did before it streamed groups).

Each store is recorded for real through `record()` from a toy graph (no model): G inputs x 3 samples, each
trace a 64x64 photo (a blob), an answer, one object with its mask, three sources, the answer's top-5
log-probabilities over 96 tokens with their texts (what visual_rag's reason node writes as ``llm``; the
consensus row keeps the chosen sample's), and a 32 KB node output that stays in the spans. Every measurement runs in a fresh
process (`cost.PeakRSS`: the peak RSS inside the call over the RSS at its start).

    python benchmarks/filter_memory.py --out benchmarks/results/filter_memory.json
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
from typing import Any

HERE = Path(__file__).resolve().parent
SAMPLES = 3
PAYLOAD = 32_000  # bytes of text a node writes into its span, per trace
TOKENS, TOPK = 96, 5  # the answer's top-k log-probabilities: visual_rag's limit and default


def _graph() -> Any:
    import numpy as np

    from graphdistill.graphs.builder import GraphBuilder
    from graphdistill.trace import RLE, ObjectOut, TokenLogprobs

    def look(state: dict[str, Any], config: Any) -> dict[str, Any]:
        i = int(config["configurable"].get("gd_sample_index", 0))
        yy, xx = np.mgrid[:64, :64]
        mask = ((yy - 24) / 16) ** 2 + ((xx - 30) / 20) ** 2 <= 1  # an ellipse inside its box
        cat = ObjectOut(
            label="cat", class_id=15, score=0.9, box=[10.0, 8.0, 50.0, 40.0], mask=RLE.encode(mask)
        )
        rng = np.random.default_rng(i)
        ids = rng.integers(0, 49_000, (TOKENS, TOPK))
        llm = TokenLogprobs(
            tokenizer="toy",
            token_ids=[int(t) for t in ids[:, 0]],
            topk_ids=ids.tolist(),
            topk_logprobs=np.sort(rng.normal(-3.0, 1.0, (TOKENS, TOPK)), axis=1)[:, ::-1].round(4).tolist(),
            token_texts=[f" w{t}" for t in ids[:, 0]],
            topk_texts=[[f" w{t}" for t in row] for row in ids],
        )
        return {
            "scratch": "".join(rng.choice(list("abcdefgh "), PAYLOAD)),  # stays in the spans
            "llm": llm,
            "answer": "There is a cat.",
            "objects": [cat],
            "sources": ["coco/cat/1", "coco/cat/2", "coco/cat/3"],
        }

    b = GraphBuilder("filter_memory").input("image", "image").input("question", "text")
    b.output("answer", "text").output("objects", "objects").output("sources", "sources")
    b.node(
        "look", look, reads=["image", "question"], writes=["scratch", "llm", "answer", "objects", "sources"]
    )
    return b.edge("__start__", "look").edge("look", "__end__").compile()


def make_store(root: Path, groups: int) -> None:
    import numpy as np

    from graphdistill.recording.recorder import record

    live = record(_graph(), root)
    for g in range(groups):
        image = np.random.default_rng(g).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        for i in range(SAMPLES):
            live.invoke(
                {"image": image, "question": "What is in the picture?"},
                config={
                    "metadata": {
                        "graphdistill_group_id": f"g{g:05d}",
                        "graphdistill_sample_index": i,
                        "graphdistill_provenance": {"photos": [f"photo/{g}"]},
                    },
                    "configurable": {"gd_sample_index": i},
                },
            )


def measure(mode: str, store: str, out_dir: str, warm: str) -> dict[str, Any]:
    """In this process: the peak RSS increase of one filter_store call, or of reading every trace."""
    from graphdistill.eval.cost import PeakRSS
    from graphdistill.filter.filtering import FilterConfig, filter_store
    from graphdistill.store.trace_store import TraceStore

    s = TraceStore(store, readonly=True)
    if mode == "filter":  # every module the filter imports on first use, imported before the clock starts
        filter_store(
            TraceStore(warm, readonly=True), out_dir + "-warm", FilterConfig(dedup=False), report=False
        )
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if mode == "filter":
            result = filter_store(s, out_dir, FilterConfig(dedup=False), report=False)
            kept = result.summary()["kept"]
        else:  # every trace of the store in memory at once
            traces = [s.get(tid) for ids in s.groups().values() for tid in ids]
            kept = len(traces)
    return {"peak_rss_increase_mb": mem.increase / 1e6, "seconds": time.perf_counter() - t0, "n": kept}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results" / "filter_memory.json"))
    ap.add_argument("--groups", default="200,800,1600", help="inputs per store (x3 samples each)")
    ap.add_argument("--measure", nargs=4, metavar=("MODE", "STORE", "OUT", "WARM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # the child process
        print(json.dumps(measure(*args.measure)))
        return 0
    points = []
    with tempfile.TemporaryDirectory(prefix="gd-filter-mem-") as tmp:
        warm = Path(tmp) / "warm"
        make_store(warm, 2)
        for g in (int(x) for x in args.groups.split(",")):
            store = Path(tmp) / f"store-{g}"
            t0 = time.perf_counter()
            make_store(store, g)
            made = time.perf_counter() - t0
            point: dict[str, Any] = {"groups": g, "traces": g * SAMPLES, "record_seconds": round(made, 1)}
            for mode in ("filter", "read_all"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--measure",
                    mode,
                    str(store),
                    str(Path(tmp) / f"ds-{g}-{mode}"),
                    str(warm),
                ]
                got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                point[mode] = got
                print(g * SAMPLES, "traces", mode, got, flush=True)
            point["store_mb"] = round(sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6, 1)
            points.append(point)
    result = {
        "benchmark": "filter_memory",
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "samples_per_input": SAMPLES,
        "span_payload_bytes": PAYLOAD,
        "logprobs_per_trace": {"tokens": TOKENS, "topk": TOPK},
        "points": points,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
