"""`graphdistill demo --quick`: every stage on the real default models, the headline, and a rerun that skips
what is up to date. Real models, a few minutes: marked slow (CI runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _netguard import subprocess_env

pytest.importorskip("torch")
pytest.importorskip("ultralytics")
pytest.importorskip("onnxruntime")

STAGES = ["weights", "knowledge base", "inputs", "record", "filter", "train", "export onnx none",
          "export onnx int8", "evaluate", "report"]  # fmt: skip


def _demo(out: Path) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(COLUMNS="200")  # the test network guard holds in the CLI process too
    return subprocess.run(
        [sys.executable, "-m", "graphdistill.cli", "demo", "--quick", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def _headline(stdout: str) -> dict:
    """The last top-level JSON object printed (stages may print their own before it)."""
    return json.loads(stdout[stdout.rfind("\n{") + 1 :])


@pytest.mark.slow
def test_quick_demo_runs_every_stage_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = _demo(out)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in STAGES:
        assert f"✓ {stage}" in first.stderr or f"✗ {stage}" in first.stderr, stage
    headline = _headline(first.stdout)
    # what `make demo` promises to print: speedup, size, fidelity on held-out photos, where the report is
    assert (
        headline["cost"]["speedup"] > 1
        and headline["cost"]["teacher_bytes"] > headline["cost"]["student_bytes"]
    )
    assert headline["n"] >= 1 and "answer_f1" in headline["fidelity"]
    # every question about the held-out photos (one each in the quick demo) is evaluated, each figure with
    # its interval
    from graphdistill.recording.photos import DEFAULT_HELDOUT

    assert headline["photos"] == len(DEFAULT_HELDOUT) == 12 and headline["n"] == 12
    lo, hi = headline["fidelity_ci"]["answer_f1"]
    assert lo <= headline["fidelity"]["answer_f1"] <= hi
    assert Path(headline["report"]).is_file() and Path(headline["report"]).stat().st_size > 10_000
    assert "onnx-none" in headline["bundle_bytes"]  # the float bundle always passes its parity gate
    # a bundle's size is the whole bundle (program, tokenizer, manifest), the figure eval reports for it
    exported = {
        Path(k).name: v for k, v in json.loads((out / "run" / "eval.json").read_text())["exported"].items()
    }
    assert headline["bundle_bytes"]["onnx-none"] == exported["onnx-none"]["bytes"]
    programs = sum(f.stat().st_size for f in (out / "bundles" / "onnx-none").glob("*.onnx"))
    assert headline["bundle_bytes"]["onnx-none"] > programs
    assert headline["bundle_timing"]["onnx-none"]["ms"] > 0
    bundle = json.loads((out / "bundles" / "onnx-none" / "manifest.json").read_text())
    # visual_rag's detect node offers YOLO11n: the student started from it and its bundle says so
    assert bundle["started_from"]["kind"] == "ultralytics-detect" and "AGPL-3.0" in bundle["licence"]
    assert "speedup" in first.stderr and "report" in first.stderr

    stamps = {p.stem: p.stat().st_mtime_ns for p in (out / ".stamps").glob("*.json")}
    second = _demo(out)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in STAGES:  # nothing recomputed: every stage is up to date (or refused earlier, same inputs)
        assert f"✓ {stage}: up to date, skipped" in second.stderr or f"✗ {stage}: refused earlier" in (
            second.stderr
        ), stage
    assert {p.stem: p.stat().st_mtime_ns for p in (out / ".stamps").glob("*.json")} == stamps
    assert _headline(second.stdout)["fidelity"] == headline["fidelity"]


def test_the_demo_says_when_its_training_budget_cut_the_schedule() -> None:
    """On a busy machine the demo's minutes buy fewer epochs: it says so, with what to do, and is silent when
    the schedule ran whole."""
    from graphdistill.demo import FULL, cut_short

    assert cut_short(FULL.train_epochs, FULL) is None
    said = cut_short(6, FULL)
    assert said is not None and f"after 6 of its {FULL.train_epochs} epochs" in said and "--minutes" in said
