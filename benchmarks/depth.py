"""Recurrent depth (issue 21): what each iteration of the student's recurrent block buys in fidelity to the teacher
and costs in milliseconds, with and without test-time augmentation.

The demo's student has no recurrence (``max_depth`` 1). This benchmark trains one that has (the demo's own
training recipe, read from ``DEMO/run/meta.json``, with ``max_depth = --max-depth``; the depth of each batch drawn
uniformly), exports it to int8 ExecuTorch the way the demo ships its bundle, then evaluates every setting on the
held-out photos (the dataset's test split: photos no training input was made from) with
:func:`graphdistill.eval.evaluate_run` (``depth=``, ``tta=``), as the PyTorch student and as the bundle. The
demo's own student (no recurrence, the same recipe) is the reference the depth-trained one at r = 1 is compared
with. Timing: PyTorch then the bundle, settings interleaved round by round (:func:`tta.time_settings`).

The exported shape is measured too: the shipped one (``encode`` + ``deepen`` run r - 1 times by the runner)
against one ``encode`` program per depth (float XNNPACK, encode only: ms per call and the file size of a
program holding the depths 1..R as methods).

    python benchmarks/depth.py --demo-dir demo-out [--out benchmarks/results/depth.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tta import FIGURES, time_settings, write_study  # noqa: E402

# test-time augmentation the depths are crossed with ("": none); the adaptive policy ("scale@0.5") as the TTA
# benchmark sets it a priori
TTAS = ("", "scale")
ADAPTIVE = "scale@0.5"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default=str(HERE.parent / "demo-out"))
    ap.add_argument("--work", default=None, help="where the depth-trained run and its bundle go (DEMO/depth)")
    ap.add_argument("--max-depth", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="runtime threads the bundle is timed with")
    ap.add_argument("--timed", type=int, default=8, help="held-out rows every setting is timed on")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing passes over them")
    ap.add_argument("--ci-resamples", type=int, default=1000)
    ap.add_argument("--no-shape", dest="shape", action="store_false", help="skip the exported-shape timing")
    ap.add_argument(
        "--only-shape",
        action="store_true",
        help="re-measure the exported shapes only, into the existing --out",
    )
    ap.add_argument("--out", default=str(HERE / "results" / "depth.json"))
    args = ap.parse_args()
    if args.only_shape:
        demo = Path(args.demo_dir)
        work = Path(args.work) if args.work else demo / "depth"
        out = json.loads(Path(args.out).read_text())
        shape = time_exported_shapes(
            work / "run", demo / "dataset", work / "shapes", out["max_depth"], args.threads
        )
        out["exported_shape"] = shape
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(shape, indent=2))
        return

    from graphdistill.eval.evaluate import evaluate_run
    from graphdistill.export.bundle import export_run

    demo = Path(args.demo_dir)
    work = Path(args.work) if args.work else demo / "depth"
    dataset, base_run = demo / "dataset", demo / "run"
    for need in (base_run / "meta.json", dataset / "manifest.json"):
        if not need.is_file():
            raise SystemExit(f"{need} is missing: run `make demo` first (or pass --demo-dir)")
    run, bundle = work / "run", work / "bundle-executorch-int8"
    t0 = time.perf_counter()
    if not (run / "model.safetensors").is_file():
        train_depth_student(base_run, dataset, run, args.max_depth)
    train_s = round(time.perf_counter() - t0, 1)
    if not (bundle / "manifest.json").is_file():
        export_run(run, "executorch", bundle, quantize="int8", progress=print)
    size = sum(
        (bundle / f).stat().st_size for f in json.loads((bundle / "manifest.json").read_text())["files"]
    )

    def evaluate(r: Path, **kw: Any) -> dict[str, Any]:
        return dict(
            evaluate_run(
                r,
                dataset,
                split="test",
                teacher_timing=False,
                teacher_n=1,
                student_repeats=1,
                semantic=False,
                ci_resamples=args.ci_resamples,
                **kw,
            )
        )

    reference = _row("demo student (no recurrence)", evaluate(base_run), None)
    print(json.dumps(reference), flush=True)
    rows: list[dict[str, Any]] = []
    settings = [(r, t) for t in TTAS for r in range(1, args.max_depth + 1)] + [(args.max_depth, ADAPTIVE)]
    knobs: dict[str, dict[str, Any]] = {}
    for depth, tta in settings:
        augs, _, below = tta.partition("@")
        kw = {"depth": depth, "tta": augs, "tta_below": float(below) if below else None}
        name = f"r={depth}" + (f" + {tta}" if tta else "")
        res = evaluate(run, bundles=[bundle], bundle_threads=(args.threads,), **kw)
        rows.append(_row(name, res, bundle) | {"depth": depth, "tta": tta or "none"})
        knobs[name] = kw
        print(json.dumps(rows[-1]), flush=True)
    timing = time_settings(run, dataset, bundle, knobs, args.timed, args.rounds, args.threads)
    base = timing["r=1"]
    for r in rows:
        r.update(timing[r["setting"]])
        r["bundle_ms_ratio"] = round(r["bundle_ms"] / base["bundle_ms"], 2)
        r["pytorch_ms_ratio"] = round(r["pytorch_ms"] / base["pytorch_ms"], 2)
    out: dict[str, Any] = {
        "demo_dir": str(demo),
        "run": str(run),
        "max_depth": args.max_depth,
        "train_seconds": train_s,
        "bundle": str(bundle),
        "bundle_bytes": size,
        "threads": args.threads,
        "timed_rows": args.timed,
        "timing_rounds": args.rounds,
        "split": "test",
        "reference": reference,
        "settings": rows,
    }
    if args.shape:
        out["exported_shape"] = time_exported_shapes(
            run, dataset, work / "shapes", args.max_depth, args.threads
        )
    write_study(out, Path(args.out), "setting", "r=1")


def _row(name: str, res: dict[str, Any], bundle: Path | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "setting": name,
        "n": res["n"],
        "photos": res.get("photos"),
        "pytorch": {k: res["fidelity"].get(k) for k in FIGURES},
        "pytorch_ci": {k: (res.get("fidelity_ci") or {}).get(k) for k in FIGURES},
    }
    if bundle is not None:
        exported = res["exported"][str(bundle)]
        row["bundle"] = {k: exported["fidelity"].get(k) for k in FIGURES}
        row["bundle_ci"] = {k: (exported.get("fidelity_ci") or {}).get(k) for k in FIGURES}
    return row


def train_depth_student(base_run: Path, dataset: Path, out: Path, max_depth: int) -> None:
    """The demo's training recipe (its run's ``train_config``), with recurrent depth and no time limit (the
    epochs it ran, whatever the machine's load)."""
    from graphdistill.student.train import TrainConfig, train

    recipe = json.loads((base_run / "meta.json").read_text())["train_config"]
    epochs = json.loads((base_run / "meta.json").read_text()).get("epochs") or recipe["epochs"]
    cfg = TrainConfig(**recipe)
    cfg = replace(
        cfg,
        dataset=str(dataset),
        out=str(out),
        epochs=epochs,
        max_minutes=None,
        resume=False,
        overrides={**cfg.overrides, "max_depth": max_depth},
    )
    print(f"training a student with max_depth {max_depth} into {out} ({epochs} epochs)", flush=True)
    train(cfg, on_epoch=lambda rec: print(f"  epoch {rec['epoch']}/{epochs}", flush=True))


def time_exported_shapes(
    run: Path, dataset: Path, work: Path, max_depth: int, threads: int
) -> dict[str, Any]:
    """The shipped shape (encode, then deepen r - 1 times) against one encode program per depth (every method
    with the shipped encode's outputs), both int8 XNNPACK ExecuTorch calibrated as the export calibrates:
    encode's work only (no answer decoding), the median ms of ``REPEATS`` calls of each, interleaved; and the
    size of each ``.pte``."""
    import numpy as np

    from graphdistill.export.executorch import export_executorch
    from graphdistill.export.programs import (
        collect_samples,
        deepen_names,
        load_run,
        programs_for,
        torch_reference,
    )
    from graphdistill.runner.bundle import ExecuTorchPrograms

    loaded = load_run(run, dataset)
    calib = collect_samples(loaded, "calibration", 32)
    shipped_programs, _ = programs_for(loaded, channels_last=True)
    deepen_calls: list[tuple[Any, ...]] = []
    for s in calib:
        torch_reference(shipped_programs, s, loaded, depth=max_depth, deepen_calls=deepen_calls)
    inputs = [s.torch_inputs() for s in calib]
    shipped, per_depth = work / "shipped", work / "per-depth"
    for d in (shipped, per_depth):
        d.mkdir(parents=True, exist_ok=True)
    export_executorch(
        {k: shipped_programs[k] for k in ("encode", "deepen")},
        shipped,
        quantize="int8",
        calibration={"encode": inputs, "deepen": deepen_calls},
        int8_patterns=_patterns(loaded),
    )
    names = [f"encode_r{r}" for r in range(1, max_depth + 1)]
    export_executorch(
        {
            n: programs_for(loaded, channels_last=True, encode_depth=r)[0]["encode"]
            for r, n in enumerate(names, 1)
        },
        per_depth,
        quantize="int8",
        calibration=dict.fromkeys(names, inputs),
        int8_patterns=_patterns(loaded),
    )
    example = shipped_programs["encode"][1]

    def spec(examples: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
        progs: dict[str, Any] = {}
        for n, ex in examples.items():
            ins = [
                {"name": f"in{i}", "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
                for i, x in enumerate(ex)
            ]
            if n.startswith("encode"):
                ins[0]["dim_order"] = [0, 2, 3, 1]
            progs[n] = {"file": "model.pte", "method": n, "inputs": ins, "outputs": []}
        return {"programs": progs, "quantize": "int8"}

    a = ExecuTorchPrograms(
        shipped, spec({"encode": example, "deepen": shipped_programs["deepen"][1]}), threads
    )
    b = ExecuTorchPrograms(per_depth, spec(dict.fromkeys(names, example)), threads)
    deep_in, deep_out = deepen_names(loaded)
    x = np.ascontiguousarray(calib[0].image_input.transpose(0, 2, 3, 1))
    ids, mask = calib[0].question_ids, calib[0].question_mask
    ms: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        for r in range(1, max_depth + 1):
            t0 = time.perf_counter()
            outs = dict(zip(loaded.encode_outputs, a.run("encode", x, ids, mask), strict=True))
            for _ in range(r - 1):
                args = [mask if n == "question_mask" else outs[n] for n in deep_in]
                outs.update(zip(deep_out, a.run("deepen", *args), strict=True))
            ms.setdefault(f"shipped r={r}", []).append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            b.run(f"encode_r{r}", x, ids, mask)
            ms.setdefault(f"per-depth r={r}", []).append((time.perf_counter() - t0) * 1000)
    return {
        "ms": {k: round(statistics.median(v), 2) for k, v in ms.items()},
        "pte_bytes": {
            "shipped (encode + deepen)": (shipped / "model.pte").stat().st_size,
            f"per depth (encode_r1..r{max_depth})": (per_depth / "model.pte").stat().st_size,
        },
        "note": f"int8 XNNPACK, encode's work only (no answer decoding), {REPEATS} interleaved calls each, "
        f"{threads} threads",
    }


def _patterns(loaded: Any) -> tuple[str, ...]:
    from graphdistill.export.quantize import QUANTIZED, QUANTIZED_WITH_CONVS

    return QUANTIZED_WITH_CONVS if loaded.config.trunk == "ultralytics" else QUANTIZED


REPEATS = 20

if __name__ == "__main__":
    main()
