"""The numbers of an evaluation as Markdown that can be pasted into a README."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def headline(ev: Mapping[str, Any]) -> str:
    """One sentence: speedup, size ratio and the answer/box fidelity."""
    c, f = ev.get("cost", {}), ev.get("fidelity", {})
    parts = []
    if c.get("speedup") is not None:
        parts.append(f"{fmt_ratio(c['speedup'])} faster")
    if c.get("size_ratio") is not None:
        parts.append(f"{fmt_ratio(c['size_ratio'])} smaller")
    fid = []
    if f.get("answer_f1") is not None:
        fid.append(f"answer F1 {fmt_num(f['answer_f1'], 2)}")
    if f.get("box_map50") is not None:
        fid.append(f"box mAP@0.5 {fmt_num(f['box_map50'], 2)}")
    if f.get("mask_miou") is not None:
        fid.append(f"mask mIoU {fmt_num(f['mask_miou'], 2)}")
    what = "The student is " + (" and ".join(parts) if parts else "measured") + " than the teacher graph"
    if not parts:
        what = "The student, against the teacher graph"
    return (
        what + (", keeping " + ", ".join(fid) if fid else "") + f" (n = {ev.get('n', '?')} held-out inputs)."
    )


def markdown_summary(ev: Mapping[str, Any]) -> str:
    """A headline, the fidelity table and the cost table of one ``eval.json``."""
    f, c = ev.get("fidelity", {}), ev.get("cost", {})
    lines = [f"**{headline(ev)}**", "", "| Fidelity to the teacher | Student |", "|---|---:|"]
    gt = ev.get("ground_truth")
    if gt:
        lines[2] = "| Fidelity | Student vs teacher | Student vs human labels | Teacher vs human labels |"
        lines[3] = "|---|---:|---:|---:|"
    for key, label in FIDELITY_ROWS:
        row = f"| {label} | {fmt_num(f.get(key))} |"
        if gt:
            row += f" {fmt_num(gt['student'].get(key))} | {fmt_num(gt['teacher'].get(key))} |"
        lines.append(row)
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
