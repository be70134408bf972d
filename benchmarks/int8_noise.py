"""Where int8 moves the student's detector: class scores of the int8 vision part against the float one.

The int8 ExecuTorch bundle can lose objects the float student finds with scores just above the detector's
threshold. This measures why, on a trained run and its dataset's *training* images only (never the held-out
photos): the student's trunk and dense head, quantized exactly as ``graphdistill export --quantize int8``
quantizes them (PT2E, XNNPACK's int8 convolutions and linear layers, calibrated on the export's calibration
rows, :func:`graphdistill.export.programs.collect_samples`), simulated in PyTorch; every cell whose float
score is above 0.1 is compared:

- ``mean_abs_shift``: mean |int8 logit − float logit| of the cell's best float class;
- ``median_shift``: the median signed shift (a systematic bias would move it away from 0);
- ``lost`` / ``gained``: cells that cross the detector's score threshold downwards / upwards;

separately on the images calibration used and on the training images it did not see. With ``--per-stage``
it repeats the measurement with one of the trunk's layers, or the head, kept float (mixed precision:
:func:`graphdistill.export.quantize.quantize_pt2e`'s ``float_modules``): a stage whose float copy removes most
of the noise would be the one to keep float.

    python benchmarks/int8_noise.py --run demo-out/run [--per-stage] [--out benchmarks/results/int8_noise.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def vision_of(model: Any) -> Any:
    """The student's trunk + dense head as one module: image -> class logits of every cell [1,C,A]."""
    import torch

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = model

        def forward(self, image: Any) -> Any:
            return self.student.dense(self.student.trunk(image))["det_cls"]

    return Vision().eval()


def shifts(int8: Any, float_logits: list[Any], images: list[Any], threshold: float) -> dict[str, float | int]:
    import torch

    diffs, lost, gained, above = [], 0, 0, 0
    with torch.no_grad():
        for x, lf_all in zip(images, float_logits, strict=True):
            lf, best = lf_all.max(1)
            lq = int8(x).gather(1, best[:, None])[:, 0]
            sf, sq = lf.sigmoid(), lq.sigmoid()
            near = sf > 0.1
            diffs.append((lq - lf)[near])
            lost += int(((sf > threshold) & (sq <= threshold)).sum())
            gained += int(((sf <= threshold) & (sq > threshold)).sum())
            above += int((sf > threshold).sum())
    d = torch.cat(diffs)
    return {
        "cells": int(d.numel()),
        "mean_abs_shift": round(float(d.abs().mean()), 4),
        "median_shift": round(float(d.median()), 4),
        "lost": lost,
        "gained": gained,
        "above_threshold": above,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, help="a trained run with a detection head started from YOLO")
    ap.add_argument("--dataset", default=None, help="its dataset (default: the one the run names)")
    ap.add_argument("--out", default=str(HERE / "results" / "int8_noise.json"))
    ap.add_argument("--per-stage", action="store_true", help="also keep each trunk layer / the head float")
    args = ap.parse_args()
    import torch

    from graphdistill.dataset import open_dataset
    from graphdistill.export.bundle import GATE_CALIBRATION, N_CALIBRATION
    from graphdistill.export.programs import collect_samples, load_run, make_sample
    from graphdistill.export.quantize import QUANTIZED_WITH_CONVS, quantize_pt2e
    from run_all import machine, write_result  # benchmarks/ is this script's folder

    loaded = load_run(Path(args.run), args.dataset)
    if not loaded.config.has_objects or loaded.config.trunk != "ultralytics":
        raise SystemExit(
            f"{args.run}: the student has no detection head started from an Ultralytics detector"
        )
    vision = vision_of(loaded.model.eval())
    calib = collect_samples(loaded, "calibration", N_CALIBRATION, leave=GATE_CALIBRATION)
    seen_images = {s.row.image for s in calib if s.row is not None}
    assert loaded.dataset_path is not None  # collect_samples refused a run without one
    ds = open_dataset(loaded.dataset_path)
    groups: dict[str, list[Any]] = {"calibration_images": [], "unseen_training_images": []}
    done: set[str] = set()
    for row in ds.rows("train") + ds.rows("val"):
        if row.image in done:
            continue
        done.add(row.image)
        x = make_sample(loaded, ds.image(row), row.question, row).torch_inputs()[0]
        groups["calibration_images" if row.image in seen_images else "unseen_training_images"].append(x)
    with torch.no_grad():
        float_logits = {k: [vision(x) for x in xs] for k, xs in groups.items()}
    example = (groups["calibration_images"][0],)
    calibration = [(s.torch_inputs()[0],) for s in calib]
    threshold = float(loaded.config.score_threshold)

    def measure(name: str, float_modules: tuple[str, ...] = ()) -> dict[str, Any]:
        t0 = time.perf_counter()
        int8 = quantize_pt2e(vision, example, calibration, QUANTIZED_WITH_CONVS, float_modules=float_modules)
        row: dict[str, Any] = {"variant": name, "float_modules": list(float_modules)}
        for k, xs in groups.items():
            row[k] = shifts(int8, float_logits[k], xs, threshold)
        print(json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return row

    rows = [measure("as exported")]
    if args.per_stage:
        rows.append(measure("head float", ("student.trunk.head",)))
        for i in range(len(loaded.model.trunk.layers)):
            rows.append(measure(f"layer {i} float", (f"student.trunk.layers.{i}",)))
    result = {
        "what": "int8 (as exported) against float class logits of the student's detector, on training images",
        "run": str(args.run),
        "dataset": str(loaded.dataset_path),
        "images": {k: len(v) for k, v in groups.items()},
        "calibration_rows": len(calib),
        "score_threshold": threshold,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "variants": rows,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
