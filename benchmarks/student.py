"""Student benchmark: parameters, bytes on disk, ms per full query on CPU (1 and 2 threads), train s/epoch.

A full query = letterboxed image + question -> encode (trunk, dense head, the in-graph selection of the objects
with their masks, object tokens, joint encoder, sources) -> a whole greedy answer of ``--answer-tokens``
tokens through the KV cache (forced to that length, never stopping at <eos> early, so the number is an upper
bound for answers of that length).

``--trunk ultralytics`` (the default: what a student of the default visual_rag graph starts from) times the
YOLO11n trunk and head (its architecture from Ultralytics' YAML; random weights time the same) and trains
from the detector's real weights; ``--trunk timm`` the preset's timm backbone from scratch.

    .venv/bin/python benchmarks/student.py --preset tiny [--trunk timm] [--out benchmarks/results/student.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _full_query(model: Any, img: Any, q: Any, qm: Any, n_tokens: int) -> None:
    """What ``StudentPredictor.predict`` runs on the model: encode (with the objects), greedy answer (KV cache)."""
    encoded = model.encode(img, q, qm)
    model.generate(img, q, qm, n_tokens, encoded=encoded, stop_at_eos=False)


def _trunk_overrides(trunk: str) -> dict[str, Any]:
    if trunk == "timm":
        return {}
    from ultralytics.nn.tasks import yaml_model_load

    return {"trunk": "ultralytics", "trunk_spec": yaml_model_load("yolo11n.yaml")}


def bench_query(preset_name: str, trunk: str, threads: int, n_tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    from graphdistill.student.model import Student, count_parameters, preset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = preset(preset_name, **_trunk_overrides(trunk))
    model = Student(cfg).eval()
    s = cfg.image_size
    img = torch.randn(1, 3, s, s)
    q = torch.randint(4, cfg.vocab_size, (1, 16))
    qm = torch.ones(1, 16, dtype=torch.bool)
    n = min(n_tokens, cfg.max_answer_len)
    times, parts = [], {"encode": [], "generate_1_token": []}
    with torch.inference_mode():
        for _ in range(3):
            _full_query(model, img, q, qm, n)
        for _ in range(repeats):
            t0 = time.perf_counter()
            _full_query(model, img, q, qm, n)
            times.append((time.perf_counter() - t0) * 1000)
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoded = model.encode(img, q, qm)
            t1 = time.perf_counter()
            model.generate(img, q, qm, 1, encoded=encoded, stop_at_eos=False)
            t2 = time.perf_counter()
            parts["encode"].append((t1 - t0) * 1000)
            parts["generate_1_token"].append((t2 - t1) * 1000)
    return {
        "trunk": cfg.trunk,
        "image_size": s,
        "parameters": count_parameters(model),
        "threads": threads,
        "answer_tokens": n,
        "ms_per_query_median": statistics.median(times),
        "ms_per_query_min": min(times),
        "ms_median_parts": {k: statistics.median(v) for k, v in parts.items()},
    }


def bench_train(preset_name: str, trunk: str, n: int, epochs: int) -> dict[str, Any]:
    from graphdistill.dataset import make_synthetic_dataset
    from graphdistill.student.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_dataset(Path(tmp) / "ds", n=n, seed=0, size=160)
        if (
            trunk == "ultralytics"
        ):  # the dataset's graph offers the detector, as a recorded visual_rag graph does
            from graphdistill.teachers.detector import YoloDetector

            manifest_path = Path(tmp) / "ds" / "manifest.json"
            manifest = json.loads(manifest_path.read_text())
            manifest["graph"]["offers"] = {"detect": YoloDetector().student_offer()}
            manifest_path.write_text(json.dumps(manifest))
        t0 = time.perf_counter()
        metrics = train(
            TrainConfig(
                dataset=str(Path(tmp) / "ds"),
                out=str(Path(tmp) / "run"),
                preset=preset_name,
                epochs=epochs,
                batch_size=16,
                device="cpu",
                val_every=epochs,
                start="auto" if trunk == "ultralytics" else "none",
            )
        )
        wall = time.perf_counter() - t0
        size = (Path(tmp) / "run" / "model.safetensors").stat().st_size
    return {
        "trunk": trunk,
        "train_rows": n,
        "epochs": epochs,
        "seconds_per_epoch": metrics["seconds_per_epoch"],
        "wall_seconds_incl_setup_and_validation": wall,
        "model_safetensors_bytes": size,
        "parameters": metrics["parameters"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--trunk", choices=["ultralytics", "timm"], default="ultralytics")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--train-rows", type=int, default=64)
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "student.json"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs, numbers mean little")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.train_rows, args.train_epochs = 3, 8, 1
    import torch

    result: dict[str, Any] = {
        "preset": args.preset,
        "trunk": args.trunk,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),  # other work on the machine skews every number
        },
        "query": [bench_query(args.preset, args.trunk, t, args.answer_tokens, args.repeats) for t in (1, 2)],
    }
    torch.set_num_threads(2)
    result["train"] = bench_train(args.preset, args.trunk, args.train_rows, args.train_epochs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[args.preset] = result
    out.write_text(json.dumps(existing, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
