"""The numbers of an evaluation as Markdown that can be pasted into a README."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphdistill.eval.result import EvalResult

FIDELITY_ROWS = (
    ("answer_exact", "Answer exact match"),
    ("answer_f1", "Answer token F1"),
    ("answer_semantic", "Answer meaning agreement (MiniLM cosine)"),
    ("box_map50", "Box mAP@0.5"),
    ("box_map", "Box mAP@0.5:0.95"),
    ("mask_miou", "Mask mIoU (matched objects; missed = 0)"),
    ("sources_recall", "Sources recall@k"),
)


def fmt_num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{float(v):.{digits}f}"


def fmt_ci(v: Any, ci: Any, digits: int = 2) -> str:
    """A figure with its interval, "0.72 [0.61, 0.80]"; the figure alone when it has none."""
    if v is None or not ci:
        return fmt_num(v)
    lo, hi = ci
    return f"{float(v):.{digits}f} [{float(lo):.{digits}f}, {float(hi):.{digits}f}]"


def fidelity_columns(ev: EvalResult) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    """(name, fidelity, intervals) of the PyTorch student, then of each exported bundle scored against the
    teacher on the same rows."""
    cols: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]] = [
        ("PyTorch student", ev.get("fidelity") or {}, ev.get("fidelity_ci") or {})
    ]
    for name, info in (ev.get("exported") or {}).items():
        if info.get("fidelity"):
            cols.append((Path(name).name, info["fidelity"], info.get("fidelity_ci") or {}))
    return cols


def teacher_self_column(ev: EvalResult) -> tuple[str, Mapping[str, Any], Mapping[str, Any]] | None:
    """(name, fidelity, intervals) of the teacher's other recorded samples against the same reference (the
    most a student can expect to follow it), when the evaluation could read them."""
    own = ev.get("teacher_self")
    if not own or not own.get("fidelity"):
        return None
    return ("teacher (another sample)", own["fidelity"], own.get("fidelity_ci") or {})


def fmt_bytes(n: Any) -> str:
    if n is None:
        return "n/a"
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} GB"


def fmt_ratio(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{float(v):.0f}×" if float(v) >= 100 else f"{float(v):.1f}×"


def headline(ev: EvalResult) -> str:
    """One sentence: speedup, size ratio and the answer/box fidelity, each with its 95 % interval."""
    c, f, ci = ev.get("cost", {}), ev.get("fidelity", {}), ev.get("fidelity_ci") or {}
    parts = []
    if c.get("speedup") is not None:
        parts.append(f"{fmt_ratio(c['speedup'])} faster")
    if c.get("size_ratio") is not None:
        parts.append(f"{fmt_ratio(c['size_ratio'])} smaller")
    fid = []
    for key, label in (("answer_f1", "answer F1"), ("box_map50", "box mAP@0.5"), ("mask_miou", "mask mIoU")):
        if f.get(key) is not None:
            fid.append(f"{label} {fmt_ci(f[key], ci[key]) if ci.get(key) else fmt_num(f[key], 2)}")
    what = "The student is " + (" and ".join(parts) if parts else "measured") + " than the teacher graph"
    if not parts:
        what = "The student, against the teacher graph"
    n = f"n = {ev.get('n', '?')} held-out inputs" + (
        f" about {ev['photos']} photos" if ev.get("photos") else ""
    )
    return (
        what
        + (", keeping " + ", ".join(fid) if fid else "")
        + f" ({n}"
        + ("; 95 % intervals" if ci else "")
        + ")."
    )


def markdown_summary(ev: EvalResult) -> str:
    """A headline, the fidelity table and the cost table of one ``eval.json``."""
    c = ev.get("cost", {})
    cols = fidelity_columns(ev)
    itself = teacher_self_column(ev)
    if itself is not None:
        cols.append(itself)
    gt = ev.get("ground_truth")
    head = "| Fidelity [95 % interval] | " + " | ".join(f"{n} vs teacher" for n, _, _ in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    if gt:
        head += " Student vs human labels | Teacher vs human labels |"
        rule += "---:|---:|"
    lines = [f"**{headline(ev)}**", "", head, rule]
    for key, label in FIDELITY_ROWS:
        row = f"| {label} | " + " | ".join(fmt_ci(f.get(key), ci.get(key)) for _, f, ci in cols) + " |"
        if gt:
            row += f" {fmt_num(gt['student'].get(key))} | {fmt_num(gt['teacher'].get(key))} |"
        lines.append(row)
    if ev.get("fidelity_ci"):
        lines += ["", ci_note(ev)]
    lines += [
        "",
        "| Cost (same machine, warm, median) | Teacher graph | Student | Ratio |",
        "|---|---:|---:|---:|",
        f"| ms per query | {fmt_num(c.get('teacher_ms'), 1)} | {fmt_num(c.get('student_ms'), 1)} | "
        f"{fmt_ratio(c.get('speedup'))} |",
        f"| Model bytes | {fmt_bytes(c.get('teacher_bytes'))} | {fmt_bytes(c.get('student_bytes'))} | "
        f"{fmt_ratio(c.get('size_ratio'))} |",
        f"| Parameters | {fmt_num(c.get('teacher_params'))} | {fmt_num(c.get('student_params'))} | "
        f"{fmt_ratio(c.get('params_ratio'))} |",
        f"| Peak RSS increase | {fmt_bytes(c.get('teacher_peak_rss_increase_bytes'))} | "
        f"{fmt_bytes(c.get('student_peak_rss_increase_bytes'))} | {fmt_ratio(c.get('memory_ratio'))} |",
    ]
    for name, info in (ev.get("exported") or {}).items():
        lines.append(
            f"| {name} ms per query | | {fmt_num(info.get('ms'), 1)} | {fmt_ratio(info.get('speedup_vs_teacher'))} |"
        )
    lines += [
        "",
        f"Split `{ev.get('split', '?')}` of `{ev.get('dataset', '?')}`; run `{ev.get('run', '?')}`.",
    ]
    return "\n".join(lines) + "\n"


def ci_note(ev: EvalResult) -> str:
    ci: Mapping[str, Any] = ev.get("ci") or {}
    return (
        f"Intervals: {100 * float(ci.get('level', 0.95)):.0f} % percentile bootstrap, "
        f"{ci.get('resamples', '?')} resamples of the {ev.get('photos', '?')} held-out photos and then of each "
        "photo's rows (rows about one photo are not independent)."
    )
