"""What the exported student costs on this CPU: ms per full query (image + question -> answer with every
token, objects with masks, sources) through the runtime-only runner, for ExecuTorch (XNNPACK) and ONNX
Runtime (CPU provider), float and int8, with 1 and 2 threads; bundle sizes; parity and fidelity deltas.

    python benchmarks/export.py --run RUN --out benchmarks/results/export.json
    python benchmarks/export.py --quick        # trains a tiny student on a synthetic set first; numbers mean little

Targets (read here, not asserted by tests): the int8 ExecuTorch bundle <= 5 MB and a full query <= 10 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET_INT8_PTE_MB = 5.0
TARGET_QUERY_MS = 10.0


def tiny_run(root: Path, quick: bool) -> Path:
    """Train a small student on a synthetic dataset (so the benchmark runs with no prior artefacts)."""
    from graphdistill.dataset import make_synthetic_dataset
    from graphdistill.student.train import TrainConfig, train

    ds = make_synthetic_dataset(root / "ds", n=12 if quick else 48, seed=0)
    overrides: dict[str, Any] = {"num_classes": len(ds.class_names), "num_sources": len(ds.documents)}
    if quick:
        overrides.update(image_size=64, d_model=32, n_heads=2, enc_layers=1, dec_layers=1, max_answer_len=16)
    cfg = TrainConfig(
        dataset=str(root / "ds"), out=str(root / "run"), epochs=1, batch_size=8, device="cpu",
        vocab_size=300 if quick else 512, overrides=overrides,
    )  # fmt: skip
    train(cfg)
    return root / "run"


def time_queries(
    bundle: Path, threads: int, samples: list[tuple[Any, str]], repeats: int
) -> dict[str, float]:
    from graphdistill.runner import BundleRunner

    runner = BundleRunner(bundle, threads=threads)
    for image, question in samples[:2]:  # warm-up
        runner.predict(image, question)
    times, tokens = [], []
    for _ in range(repeats):
        for image, question in samples:
            t0 = time.perf_counter()
            out = runner.predict(image, question)
            times.append((time.perf_counter() - t0) * 1000)
            tokens.append(len(runner.tokenizer.encode(out["answer"])))
    return {
        "ms_median": statistics.median(times),
        "ms_p90": sorted(times)[int(0.9 * (len(times) - 1))],
        "answer_tokens_mean": statistics.mean(tokens),
        "queries": len(times),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="student run folder (default: train a small one on a synthetic set)")
    ap.add_argument("--out", default=str(HERE / "results" / "export.json"))
    ap.add_argument("--formats", default="executorch,onnx")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("torch", "executorch", "torchao", "onnx", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from graphdistill._env import apply_offline_env

    apply_offline_env()
    from graphdistill.dataset import open_dataset
    from graphdistill.export.bundle import ExportError, export_run

    repeats = args.repeats or (1 if args.quick else 5)
    n = 2 if args.quick else 8
    with tempfile.TemporaryDirectory(prefix="gd-bench-export-") as tmp:
        root = Path(tmp)
        run = Path(args.run) if args.run else tiny_run(root, args.quick)
        meta = json.loads((run / "meta.json").read_text())
        ds = open_dataset(meta["dataset"])
        rows = (ds.rows("test") + ds.rows("val"))[: 4 if args.quick else 16]
        samples = [(ds.image(r), r.question) for r in rows]
        results: dict[str, Any] = {}
        for fmt in args.formats.split(","):
            for q in ("none", "int8"):
                key = f"{fmt}-{q}"
                t0 = time.perf_counter()
                try:
                    m = export_run(run, fmt, root / key, quantize=q, n_calibration=n, n_heldout=n)
                except ExportError as exc:  # the gate failed: record it
                    results[key] = {"error": str(exc)}
                    continue
                except Exception as exc:  # a toolchain failure of one bundle must not hide the others
                    logging.exception("export %s failed", key)
                    results[key] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                model_bytes = sum(v for f, v in m["file_bytes"].items() if f != "tokenizer.json")
                results[key] = {
                    "export_s": round(time.perf_counter() - t0, 1),
                    "model_bytes": model_bytes,
                    "bundle_bytes": sum(m["file_bytes"].values()),
                    "parity": m["parity"],
                    "timing": {f"{t}_threads": time_queries(root / key, t, samples, repeats) for t in (1, 2)},
                }
                print(f"{key}: {model_bytes / 1e6:.2f} MB, {results[key]['timing']}", flush=True)
    headline: dict[str, Any] = {}
    et8 = results.get("executorch-int8", {})
    if "model_bytes" in et8:
        headline["int8_pte_mb"] = et8["bundle_bytes"] / 1e6
        # the faster runtime thread setting, as eval reports a bundle
        threads, best = min(et8["timing"].items(), key=lambda kv: kv[1]["ms_median"])
        headline["int8_pte_query_ms"] = best["ms_median"]
        headline["int8_pte_query_threads"] = int(threads.split("_")[0])
        headline["meets_size_target"] = headline["int8_pte_mb"] <= TARGET_INT8_PTE_MB
        headline["meets_latency_target"] = headline["int8_pte_query_ms"] <= TARGET_QUERY_MS
    for fmt in args.formats.split(","):
        fl, q8 = results.get(f"{fmt}-none", {}), results.get(f"{fmt}-int8", {})
        if "model_bytes" in fl and "model_bytes" in q8:
            headline[f"{fmt}_int8_size_ratio"] = q8["model_bytes"] / fl["model_bytes"]
            headline[f"{fmt}_int8_fidelity_drop"] = q8["parity"]["fidelity_vs_teacher"]["drop"]
    report = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "quick": args.quick,
        "run": str(args.run or "tiny synthetic run (trained by this script)"),
        "targets": {"int8_pte_mb": TARGET_INT8_PTE_MB, "query_ms": TARGET_QUERY_MS},
        "headline": headline,
        "bundles": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(headline, indent=2))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
