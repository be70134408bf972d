"""`make bench`'s table: every goal beside its measured figure, met or not, from the benchmarks' JSON."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run_all() -> Any:
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(md: str, label: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


RESULTS: dict[str, dict[str, Any]] = {
    "e2e": {
        "held_out_n": 24,
        "held_out_photos": 4,
        "ci": {"level": 0.95, "resamples": 1000},
        "teacher_self": {
            "samples": 48,
            "fidelity": {"answer_f1": 0.43, "box_map50": 0.85},
            "fidelity_ci": {"answer_f1": [0.35, 0.50]},
        },
        "fidelity_by_runtime": {
            "student, PyTorch eager": {
                "fidelity": {"answer_exact": 0.5, "answer_f1": 0.72, "box_map50": 0.2, "sources_recall": 0.9},
                "ci": {"answer_exact": [0.3, 0.7], "answer_f1": [0.61, 0.8], "box_map50": [0.05, 0.41]},
            },
            "student, ExecuTorch XNNPACK int8": {
                "fidelity": {
                    "answer_exact": 0.5,
                    "answer_f1": 0.55,
                    "box_map50": 0.1,
                    "sources_recall": 0.85,
                },
                "ci": {"answer_f1": [0.4, 0.7], "box_map50": [0.0, 0.3], "sources_recall": [0.7, 0.95]},
            },
        },
        "demo_inputs": "default",
        "demo_stage_seconds": {"record": 900.0, "train": 360.0, "export onnx int8": None, "report": 60.0},
        "refused_bundles": {"onnx-int8": "failed with exit code 2"},
        "headline": {
            "speedup_executorch": 310.0,
            "speedup_pytorch": 60.0,
            "int8_pte_mb": 5.4,
            "answer_f1": 0.95,
            "box_map50": 0.2,
        },
        "ms_per_query": {
            "teacher graph (PyTorch, CPU)": 3000.0,
            "student, ExecuTorch XNNPACK int8": 9.7,
            "student, ONNX Runtime CPU int8": 12.0,
        },
        "ms_models_only": {"student, ExecuTorch XNNPACK int8": 6.0},
    },
    "record": {"headline": {"recording_overhead_pct": 4.0}},
    "student": {
        "tiny": {"query": [{"threads": 1, "ms_per_query_median": 24.0}, {"ms_per_query_median": 41.0}]}
    },
    "teacher": {"batched_speedup": 1.5},
    "scaling": {
        "train_minutes_per_point": 2.0,
        "points": [
            {"n_inputs": 20, "filtered": False, "train_rows": 20, "answer_f1": 0.1, "box_map50": None},
            {
                "n_inputs": 20,
                "replays": 40,
                "filtered": True,
                "train_rows": 12,
                "answer_f1": 0.3,
                "box_map50": 0.5,
                "sources_recall": 0.75,
            },
        ],
    },
}


def test_each_goal_is_judged_from_the_measured_figure() -> None:
    md = _run_all().table(RESULTS)
    assert _row(md, "speedup, ExecuTorch int8 student vs teacher graph") == [
        "speedup, ExecuTorch int8 student vs teacher graph", "310×", "≥ 200×", "yes"
    ]  # fmt: skip
    assert _row(md, "int8 ExecuTorch bundle size (MB)")[1:] == ["5.40", "≤ 5 MB", "**no**"]
    # a bundle its gate refused counts as a goal not met, with the reason
    assert _row(md, "speedup, ONNX Runtime int8 student vs teacher graph")[1:] == [
        "refused by its int8 fidelity gate", "≥ 200×", "**no**"
    ]  # fmt: skip
    assert _row(md, "recording overhead (%)")[3] == "**no**"
    assert _row(md, "teacher throughput, batched vs one-by-one")[1] == "1.50×"
    # the demo's own stage times, summed (a stage with no time is skipped): 1320 s = 22 min
    assert _row(md, "full `make demo`, sum of its stage times (min)")[1:] == ["22.0", "≤ 30", "yes"]
    # runtimes with their speedup against the teacher
    assert _row(md, "student, ExecuTorch XNNPACK int8")[1:] == ["9.7", "309×", "6.0", "500×"]
    assert _row(md, "student, ONNX Runtime CPU int8")[1:] == ["12.0", "250×", "—", "—"]
    assert "Held-out real photos: 24 test rows about 4 photos" in md
    # the ms goals: a whole ExecuTorch int8 query from e2e, the eager model query at its faster thread count
    assert _row(md, "whole query, ExecuTorch int8 bundle (ms)")[1:] == ["9.70", "≤ 15", "yes"]
    assert _row(md, "student model query, PyTorch eager (ms, `student.py`)")[1:] == ["24.0", "≤ 30", "yes"]
    # the filter's memory on the largest store measured, beside every trace of it held at once
    points = [
        {"traces": 600, "filter": {"peak_rss_increase_mb": 4.4}, "read_all": {"peak_rss_increase_mb": 29.7}},
        {
            "traces": 2400,
            "filter": {"peak_rss_increase_mb": 15.93},
            "read_all": {"peak_rss_increase_mb": 116.85},
        },
    ]
    md = _run_all().table({**RESULTS, "filter_memory": {"points": points}})
    assert _row(md, "filter peak RSS increase on the largest store (MB)")[1:] == ["15.9", "(no goal)", "—"]
    assert _row(md, "the same store's traces all held at once (MB)")[1] == "116.8"


def test_fidelity_is_tabled_with_intervals_for_pytorch_and_the_int8_bundle() -> None:
    md = _run_all().table(RESULTS)
    assert "(24 rows about 4 photos; 95 % bootstrap intervals, 1000 resamples" in md
    # figure [interval] per runtime; met only where every runtime measured meets the goal
    assert _row(md, "answer token F1")[1:5] == [
        "0.72 [0.61, 0.80]", "0.55 [0.40, 0.70]", "≥ 0.6", "PyTorch eager only"
    ]  # fmt: skip
    assert _row(md, "box mAP@0.5")[1:5] == ["0.20 [0.05, 0.41]", "0.10 [0.00, 0.30]", "≥ 0.7", "**no**"]
    assert _row(md, "sources recall")[1:5] == ["0.900", "0.85 [0.70, 0.95]", "≥ 0.8", "yes"]  # no interval
    assert _row(md, "mask mIoU")[1:5] == ["not measured", "not measured", "≥ 0.6", "—"]
    assert _row(md, "answer exact match")[3:5] == ["(reported)", "—"]
    # the teacher against itself: its own column, never part of "met"
    assert [_row(md, m)[5] for m in ("answer token F1", "box mAP@0.5", "mask mIoU")] == [
        "0.43 [0.35, 0.50]", "0.850", "not measured"
    ]  # fmt: skip
    assert "the teacher's 48 other recorded samples" in md
    bare = {**RESULTS, "e2e": {k: v for k, v in RESULTS["e2e"].items() if k != "teacher_self"}}
    assert _row(_run_all().table(bare), "answer token F1")[5] == "not measured"
    # an e2e.json written before intervals: the PyTorch figures of its headline, no interval
    old = {**RESULTS, "e2e": {k: v for k, v in RESULTS["e2e"].items() if k != "fidelity_by_runtime"}}
    old["e2e"]["headline"] = {**old["e2e"]["headline"], "answer_f1": 0.168}
    assert _row(_run_all().table(old), "answer token F1")[1:3] == ["0.168", "not measured"]


def test_scaling_points_are_tabled_filtered_first_and_missing_values_shown_as_such() -> None:
    md = _run_all().table(RESULTS)
    rows = [ln for ln in md.splitlines() if ln.startswith("| 20 |")]
    assert rows == [
        "| 20 | 40 | on | 12 | 0.300 | 0.500 | — | 0.750 |",
        "| 20 | 0 | off | 20 | 0.100 | — | — | — |",
    ]
    assert "2.0 training minutes per point" in md  # a scaling.json from before epochs: its time budget


def test_demo_time_is_not_judged_for_a_resized_demo() -> None:
    results = {**RESULTS, "e2e": {**RESULTS["e2e"], "demo_inputs": 8}}
    md = _run_all().table(results)
    assert _row(md, "full `make demo`, sum of its stage times (min)")[1] == "not measured"
