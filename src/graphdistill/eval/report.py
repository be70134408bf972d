"""One self-contained HTML report of one or more evaluated student runs.

Everything is inline (CSS, matplotlib PNGs and gallery pictures as base64 ``data:`` URIs): the file reads
offline on a phone, with no external font, script or URL. Sections, each with a stable ``id``:
``headline`` · ``fidelity`` (table) · ``cost`` (table) · ``plots`` (per-class AP, latency, answer agreement
vs training-set size when several runs are given) · ``scaling`` (when a scaling study is given) · ``tta``
(fidelity against ms per query for each test-time setting, when that study is given) ·
``gallery`` (held-out photos, teacher and student outputs side by side, worst disagreements first).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill.eval.result import EvalResult, read_eval
from graphdistill.eval.summary import (
    FIDELITY_ROWS,
    ci_note,
    fidelity_columns,
    fmt_bytes,
    fmt_ci,
    fmt_num,
    fmt_ratio,
    headline,
    teacher_self_column,
)

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

CSS = """
*{box-sizing:border-box}body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
padding:1rem;max-width:1100px;margin:auto;color:#1d2330;background:#fafbfc;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.2rem;border-bottom:2px solid #dde3ea;padding-bottom:.2rem;margin-top:2rem}
.cards{display:flex;flex-wrap:wrap;gap:.6rem}.card{flex:1 1 140px;background:#fff;border:1px solid #dde3ea;
border-radius:8px;padding:.6rem .8rem}.card b{display:block;font-size:1.5rem;color:#0b5cad}
.card span{font-size:.85rem;color:#5b6472}.scroll{overflow-x:auto}table{border-collapse:collapse;
width:100%;background:#fff;font-size:.9rem}th,td{border:1px solid #dde3ea;padding:.35rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%;height:auto;display:block}
figure{margin:1rem 0;background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:.5rem}
figcaption{font-size:.85rem;color:#5b6472}.q{font-weight:600}.muted{color:#5b6472;font-size:.85rem}
"""


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def train_size(run: Path, ev: EvalResult, meta: Mapping[str, Any]) -> int | None:
    """Training-set size of a run: from meta.json when it says, else the dataset's manifest."""
    for key in ("train_size", "n_train", "train_rows"):
        if isinstance(meta.get(key), int):
            return int(meta[key])
    ds = meta.get("dataset") or ev.get("dataset")
    if isinstance(ds, dict):
        ds = ds.get("path")
    if ds:
        manifest = Path(str(ds)) / "manifest.json"
        if manifest.exists():
            n = read_json(manifest).get("splits", {}).get("train")
            return int(n) if isinstance(n, int) else None
    return None


def validate_scaling(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The scaling study's points; a clear error when the shape is wrong."""
    points = data.get("points")
    if not isinstance(points, list) or not points:
        raise ValueError('scaling JSON must be {"points": [{"n_inputs", "filtered", "answer_f1", ...}, ...]}')
    out = []
    for i, p in enumerate(points):
        if not isinstance(p, dict) or not isinstance(p.get("n_inputs"), int) or "filtered" not in p:
            raise ValueError(
                f"scaling JSON point {i} needs an integer n_inputs and a boolean filtered: {p!r}"
            )
        out.append(dict(p))
    return out


ROUND_FIGURES = (
    ("answer_f1", "answer F1"),
    ("box_map50", "box mAP@0.5"),
    ("mask_miou", "mask mIoU"),
    ("sources_recall", "sources recall"),
)


def validate_rounds(data: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rounds studies -> {arm: its rounds in order}: ``benchmarks/rounds.py``'s JSON (``{"arms": {arm: {"rounds":
    [...]}}}``) or ``graphdistill improve``'s ``rounds.json`` (one arm), one or several; a clear error when the
    shape is wrong."""
    studies = [data] if isinstance(data, Mapping) else list(data)
    out: dict[str, list[dict[str, Any]]] = {}
    for study in studies:
        if isinstance(study.get("arms"), Mapping):
            arms = {str(a): v.get("rounds") for a, v in study["arms"].items()}
        elif isinstance(study.get("rounds"), list):
            arm = (study.get("config") or {}).get("arm") or "arm"
            arms = {str(arm): study["rounds"]}
        else:
            raise ValueError('rounds JSON must be {"arms": {arm: {"rounds": [...]}}} or a rounds.json')
        for arm, rounds in arms.items():
            if not isinstance(rounds, list) or not rounds:
                raise ValueError(f"rounds JSON arm {arm!r}: no rounds")
            for i, r in enumerate(rounds):
                if not isinstance(r, Mapping) or not isinstance(r.get("round"), int) or "fidelity" not in r:
                    raise ValueError(f"rounds JSON arm {arm!r} round {i} needs an integer round and fidelity")
            out[arm] = sorted((dict(r) for r in rounds), key=lambda r: r["round"])
    return out


# --------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------


def _png_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pil_uri(img: Any) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_class(ev: EvalResult) -> str | None:
    per = {k: v for k, v in (ev["fidelity"].get("box_ap_per_class") or {}).items() if v is not None}
    if not per:
        return None
    plt = _plt()
    items = sorted(per.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items], color="#0b5cad")
    ax.set_xlim(0, 1)
    ax.set_xlabel("box AP@0.5:0.95 against the teacher")
    ax.set_title("Fidelity per class")
    return _png_uri(fig)


def plot_latency(evs: Sequence[tuple[str, EvalResult]]) -> str | None:
    labels, values, colours = [], [], []
    ev0 = evs[0][1]
    if ev0["cost"].get("teacher_ms") is not None:
        labels.append("teacher graph")
        values.append(float(ev0["cost"]["teacher_ms"]))
        colours.append("#a33b3b")
    for name, ev in evs:
        if ev["cost"].get("student_ms") is not None:
            labels.append(f"student {name}" if len(evs) > 1 else "student (PyTorch)")
            values.append(float(ev["cost"]["student_ms"]))
            colours.append("#0b5cad")
        for bundle, info in (ev.get("exported") or {}).items():
            labels.append(f"{Path(bundle).name}")
            values.append(float(info["ms"]))
            colours.append("#2e8b57")
    if not values:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(values) + 1.2))
    ax.barh(labels, values, color=colours)
    if max(values) / max(min(values), 1e-9) > 20:
        ax.set_xscale("log")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f} ms" if v >= 10 else f" {v:.2g} ms", va="center")
    ax.set_xlabel("ms per query (warm, median; same machine, same inputs)")
    ax.set_title("Latency")
    return _png_uri(fig)


def plot_runs_vs_train_size(points: Sequence[tuple[int | None, Mapping[str, Any]]]) -> str | None:
    pts = sorted(((n, ev) for n, ev in points if n is not None), key=lambda p: p[0])
    if len(pts) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = [n for n, _ in pts]
    for key, label in (("answer_f1", "answer F1"), ("answer_semantic", "answer meaning agreement")):
        ys = [ev["fidelity"].get(key) for _, ev in pts]
        if any(y is not None for y in ys):
            ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("training-set size (inputs)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Answer agreement vs training-set size")
    ax.legend()
    return _png_uri(fig)


def plot_scaling(points: Sequence[Mapping[str, Any]]) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), sharex=True)
    for ax, (key, label) in zip(
        axes,
        (("answer_f1", "answer F1"), ("box_map50", "box mAP@0.5"), ("mask_miou", "mask mIoU")),
        strict=True,
    ):
        for filtered, style in ((True, "-o"), (False, "--s")):
            pts = sorted((p["n_inputs"], p.get(key)) for p in points if bool(p["filtered"]) == filtered)
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label="filtered" if filtered else "unfiltered")
        ax.set_title(label)
        ax.set_xlabel("recorded inputs")
        ax.set_ylim(0, 1.02)
    axes[0].legend()
    return _png_uri(fig)


def plot_rounds(arms: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One line per arm over rounds: the four fidelity figures, then the diversity of the student's held-out
    answers (distinct bigrams) and the share of its most common answer (collapse raises it)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), sharex=True)

    def figure(key: str) -> Callable[[Mapping[str, Any]], Any]:
        return lambda r: r["fidelity"].get(key)

    def diversity(key: str) -> Callable[[Mapping[str, Any]], Any]:
        return lambda r: (r.get("diversity") or {}).get(key)

    panels = [
        *((figure(k), lab) for k, lab in ROUND_FIGURES),
        (diversity("distinct_2"), "answers: distinct bigrams"),
        (diversity("top_share"), "answers: most common's share"),
    ]
    for ax, (get, label) in zip(axes.flat, panels, strict=True):
        for arm, rounds in arms.items():
            pts = [(r["round"], get(r)) for r in rounds]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "-o", label=arm)
        ax.set_title(label)
        ax.set_ylim(0, 1.02)
    for ax in axes[1]:
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].legend(fontsize=8)
    return _png_uri(fig)


def _scaled(image: np.ndarray, output: Mapping[str, Any], factor: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Small pictures (e.g. 96 px synthetic ones) upscaled by an integer factor so the drawing is legible;
    boxes scale with them (viz resizes masks to the image itself)."""
    from graphdistill.eval.metrics import as_object

    if factor <= 1:
        return image, dict(output)
    big = np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)
    objs = []
    for o in output.get("objects") or []:
        d = as_object(o).model_dump(mode="json")
        d["box"] = [float(v) * factor for v in d["box"]]
        objs.append(d)
    return big, {**output, "objects": objs}


def draw_pair(image: np.ndarray, teacher: Mapping[str, Any], student: Mapping[str, Any]) -> Any:
    """Teacher and student outputs drawn side by side (``graphdistill.viz``)."""
    from graphdistill import viz

    factor = max(1, 320 // max(1, max(np.asarray(image).shape[:2])))
    t_img, t_out = _scaled(image, teacher, factor)
    s_img, s_out = _scaled(image, student, factor)
    return viz.side_by_side(
        [viz.draw_output(t_img, t_out), viz.draw_output(s_img, s_out)], ["teacher graph", "student"]
    )


def gallery_items(
    run: Path,
    ev: EvalResult,
    n: int,
    progress: Progress | None = None,
    predictor: Any | None = None,
) -> list[dict[str, Any]]:
    """The ``n`` rows of the evaluated split where student and teacher disagree most, drawn side by side.

    Teacher outputs come from the dataset; the student is rerun on those rows (it is fast)."""
    from graphdistill.dataset import open_dataset
    from graphdistill.eval.evaluate import jsonable_output, output_kinds_of, output_of_row

    worst = sorted(ev.get("rows") or [], key=lambda r: -float(r.get("disagreement") or 0.0))[:n]
    if not worst:
        return []
    ds = open_dataset(ev["dataset"])
    by_id = {r.id: r for r in ds.rows(ev.get("split", "test"))}
    kinds = output_kinds_of(ds)
    if predictor is None:
        from graphdistill.student.predict import load_student  # type: ignore[import-not-found,unused-ignore]

        predictor = load_student(run)
    items = []
    for i, r in enumerate(worst):
        row = by_id.get(r["id"])
        if row is None:
            log.warning("gallery: row %s is no longer in %s", r["id"], ev["dataset"])
            continue
        image = ds.image(row)
        student = jsonable_output(predictor.predict(image, row.question), kinds)
        teacher = output_of_row(row, kinds)
        items.append({"uri": _pil_uri(draw_pair(image, teacher, student)), "row": r, "student": student})
        if progress:
            progress("drawing the gallery", i + 1, len(worst))
    return items


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x))


def _figure(uri: str, caption: str, ident: str) -> str:
    return f'<figure id="{ident}"><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


TTA_FIGURES = (
    ("answer_f1", "answer F1"),
    ("box_map50", "box mAP@0.5"),
    ("mask_miou", "mask mIoU"),
    ("sources_recall", "sources recall"),
)


def validate_tta(data: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The test-time compute studies' settings (``benchmarks/tta.py``'s and ``benchmarks/depth.py``'s JSON, one
    or several, their settings in order), each with its ``name`` (its ``setting``, else its ``tta``); a clear
    error when a shape is wrong."""
    studies = [data] if isinstance(data, Mapping) else list(data)
    out: list[dict[str, Any]] = []
    for study in studies:
        settings = study.get("settings") if isinstance(study, Mapping) else None
        if not isinstance(settings, list) or not settings:
            raise ValueError(
                'test-time compute JSON must be {"settings": [{"tta" or "setting", "pytorch_ms", "pytorch", ...}]}'
            )
        for i, st in enumerate(settings):
            for side in ("pytorch", "bundle"):
                if not isinstance(st, dict) or not isinstance(st.get(f"{side}_ms"), (int, float)):
                    raise ValueError(f"test-time compute JSON setting {i} needs a number {side}_ms: {st!r}")
                if not isinstance(st.get(side), dict):
                    raise ValueError(f"test-time compute JSON setting {i} needs its {side} fidelity figures")
            name = st.get("setting", st.get("tta"))
            if not isinstance(name, str):
                raise ValueError(
                    f"test-time compute JSON setting {i} needs its name (setting or tta): {st!r}"
                )
            out.append({**st, "name": name})
    return out


def plot_tta(settings: Sequence[Mapping[str, Any]]) -> str:
    """Fidelity against ms per query, PyTorch and the bundle: a line through the depths r = 1..R of each
    test-time augmentation for the settings of a depth study (``depth``; ``benchmarks/depth.py``), one labelled
    point per other setting (``benchmarks/tta.py``'s, an adaptive one)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(TTA_FIGURES), figsize=(13, 3.6))
    max_ms = max(float(st[f"{side}_ms"]) for st in settings for side in ("pytorch", "bundle"))
    for ax, (key, label) in zip(axes, TTA_FIGURES, strict=True):
        for side, marker in (("pytorch", "o"), ("bundle", "s")):
            lines: dict[str, list[tuple[int, float, float]]] = {}
            pts: list[tuple[float, float, str]] = []
            for st in settings:
                y = st[side].get(key)
                if y is None:
                    continue
                if isinstance(st.get("depth"), int) and "@" not in str(st.get("tta", "")):
                    lines.setdefault(str(st.get("tta") or "none"), []).append(
                        (st["depth"], st[f"{side}_ms"], y)
                    )
                else:
                    pts.append((st[f"{side}_ms"], y, str(st["name"])))
            for tta, line in lines.items():
                line.sort()
                ax.plot([p[1] for p in line], [p[2] for p in line], marker=marker, ms=4,
                        label=f"{side}, tta {tta}, r={line[0][0]}..{line[-1][0]}")  # fmt: skip
                for r, x, y in (line[0], line[-1]):
                    ax.annotate(f"r={r}", (x, y), fontsize=6, xytext=(3, -9), textcoords="offset points")
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=side)
            # points that land on one spot (an adaptive setting that spent nothing) share one label
            spots: dict[tuple[int, int], list[str]] = {}
            for x, y, name in pts:
                spots.setdefault((round(x / (0.04 * max_ms)), round(y * 50)), []).append(name)
            for (_, _), names in spots.items():
                x, y, _ = next(p for p in pts if p[2] == names[0])
                ax.annotate(" / ".join(names), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(label)
        ax.set_xlabel("ms per query")
        ax.set_xlim(0, max_ms * 1.15)
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    return _png_uri(fig)


def render_html(
    evs: Sequence[tuple[str, EvalResult]],
    *,
    train_sizes: Sequence[int | None] = (),
    gallery: Sequence[Mapping[str, Any]] = (),
    scaling: Sequence[Mapping[str, Any]] | None = None,
    tta: Sequence[Mapping[str, Any]] | None = None,
    rounds: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    title: str = "graphdistill: student vs teacher",
) -> str:
    """The whole report as one HTML string (pure: no file or model access)."""
    name0, ev0 = evs[0]
    c0, f0, ci0 = ev0["cost"], ev0["fidelity"], ev0.get("fidelity_ci") or {}

    def interval(key: str) -> str:
        lo_hi = ci0.get(key)
        return f" (95 % interval {fmt_num(lo_hi[0], 2)}–{fmt_num(lo_hi[1], 2)})" if lo_hi else ""

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        '<section id="headline"><p>' + _e(headline(ev0)) + '</p><div class="cards">',
        _card(fmt_ratio(c0.get("speedup")), "faster than the teacher graph"),
        _card(fmt_ratio(c0.get("size_ratio")), "smaller (model bytes)"),
        _card(fmt_num(f0.get("answer_f1"), 2), "answer token F1" + interval("answer_f1")),
        _card(fmt_num(f0.get("box_map50"), 2), "box mAP@0.5" + interval("box_map50")),
        _card(fmt_num(f0.get("mask_miou"), 2), "mask mIoU" + interval("mask_miou")),
        "</div></section>",
    ]
    # fidelity table: one column per run, then the first run's exported bundles (scored against the teacher
    # on the same rows), its val split and its human-label columns when present
    bundles = fidelity_columns(ev0)[1:]
    head = "".join(f"<th>{_e(n)}</th>" for n, _ in evs)
    head += "".join(f"<th>{_e(name0)}: {_e(b)}</th>" for b, _, _ in bundles)
    itself = teacher_self_column(ev0)
    if itself is not None:
        bundles.append(itself)
        head += f"<th>{_e(itself[0])}</th>"
    val = ev0.get("fidelity_val")
    if val:
        head += f"<th>{_e(name0)} (val split)</th>"
    gt = ev0.get("ground_truth")
    if gt:
        head += "<th>student vs human labels</th><th>teacher vs human labels</th>"
    rows = []
    for key, label in FIDELITY_ROWS:
        cells = "".join(
            f"<td>{_e(fmt_ci(ev['fidelity'].get(key), (ev.get('fidelity_ci') or {}).get(key)))}</td>"
            for _, ev in evs
        )
        cells += "".join(f"<td>{_e(fmt_ci(f.get(key), ci.get(key)))}</td>" for _, f, ci in bundles)
        if val:
            cells += f"<td>{fmt_num(val.get(key))}</td>"
        if gt:
            cells += f"<td>{fmt_num(gt['student'].get(key))}</td><td>{fmt_num(gt['teacher'].get(key))}</td>"
        rows.append(f"<tr><td>{_e(label)}</td>{cells}</tr>")
    n_row = "".join(
        f"<td>{_e(ev.get('n'))} ({_e(ev.get('split'))}"
        + (f", {_e(ev['photos'])} photos" if ev.get("photos") else "")
        + ")</td>"
        for _, ev in evs
    )
    n_row += "".join(f"<td>{_e(ev0.get('n'))}</td>" for _ in bundles)
    if val:
        n_row += f"<td>{_e(val.get('n'))} (val)</td>"
    rows.append(f"<tr><td>held-out inputs</td>{n_row}{'<td></td><td></td>' if gt else ''}</tr>")
    parts += [
        '<section id="fidelity-section"><h2>Fidelity to the teacher</h2>',
        '<p class="muted">The teacher graph\'s outputs are the ground truth. Mask mIoU matches student to '
        "teacher objects by class and box IoU (Hungarian); a teacher object the student missed counts as 0. "
        + (_e(ci_note(ev0)) if ci0 else "")
        + "</p>",
        f'<div class="scroll"><table id="fidelity"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table></div>',
        "</section>",
    ]
    cost_rows = [
        (
            "ms per query",
            fmt_num(c0.get("teacher_ms"), 1),
            fmt_num(c0.get("student_ms"), 1),
            fmt_ratio(c0.get("speedup")),
        ),
        (
            "model bytes",
            fmt_bytes(c0.get("teacher_bytes")),
            fmt_bytes(c0.get("student_bytes")),
            fmt_ratio(c0.get("size_ratio")),
        ),
        (
            "parameters",
            fmt_num(c0.get("teacher_params")),
            fmt_num(c0.get("student_params")),
            fmt_ratio(c0.get("params_ratio")),
        ),
        (
            "peak RSS increase",
            fmt_bytes(c0.get("teacher_peak_rss_increase_bytes")),
            fmt_bytes(c0.get("student_peak_rss_increase_bytes")),
            fmt_ratio(c0.get("memory_ratio")),
        ),
    ]
    for bundle, info in (ev0.get("exported") or {}).items():
        cost_rows.append(
            (
                f"{Path(bundle).name} ms per query",
                "",
                fmt_num(info.get("ms"), 1),
                fmt_ratio(info.get("speedup_vs_teacher")),
            )
        )
    body = "".join(
        f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{_e(c)}</td><td>{_e(d)}</td></tr>"
        for a, b, c, d in cost_rows
    )
    parts += [
        '<section id="cost-section"><h2>Cost against the teacher</h2>',
        f'<p class="muted">Measured in one process on the same machine, warm, median over '
        f"{_e(c0.get('timed_inputs', '?'))} inputs. Run {_e(name0)}.</p>",
        f'<div class="scroll"><table id="cost"><tr><th></th><th>teacher graph</th><th>student</th><th>ratio</th></tr>{body}</table></div>',
        "</section>",
    ]
    parts.append('<section id="plots"><h2>Plots</h2>')
    uri = plot_per_class(ev0)
    if uri:
        parts.append(_figure(uri, "Box AP per class, student vs teacher", "plot-per-class"))
    uri = plot_latency(evs)
    if uri:
        parts.append(_figure(uri, "Latency per query: teacher graph vs student", "plot-latency"))
    if len(evs) > 1:
        uri = plot_runs_vs_train_size(list(zip(train_sizes, [ev for _, ev in evs], strict=False)))
        if uri:
            parts.append(_figure(uri, "Answer agreement vs training-set size", "plot-train-size"))
    parts.append("</section>")
    if scaling:
        table = "".join(
            f"<tr><td>{_e(p['n_inputs'])}</td><td>{'yes' if p['filtered'] else 'no'}</td>"
            f"<td>{fmt_num(p.get('answer_f1'))}</td><td>{fmt_num(p.get('box_map50'))}</td><td>{fmt_num(p.get('mask_miou'))}</td></tr>"
            for p in sorted(scaling, key=lambda p: (p["n_inputs"], bool(p["filtered"])))
        )
        parts += [
            '<section id="scaling"><h2>Scaling study</h2>',
            _figure(
                plot_scaling(scaling), "Fidelity vs recorded inputs, filtering on and off", "plot-scaling"
            ),
            '<div class="scroll"><table id="scaling-table"><tr><th>recorded inputs</th><th>filtered</th>'
            f"<th>answer F1</th><th>box mAP@0.5</th><th>mask mIoU</th></tr>{table}</table></div></section>",
        ]
    if tta:
        cells = "".join(
            f"<tr><td>{_e(st['name'])}</td>"
            + "".join(
                f"<td>{fmt_num(st[f'{side}_ms'], 1)}</td>"
                + "".join(f"<td>{fmt_num(st[side].get(k), 2)}</td>" for k, _ in TTA_FIGURES)
                for side in ("pytorch", "bundle")
            )
            + "</tr>"
            for st in tta
        )
        heads = "".join(f"<th>{side} ms</th>" + "".join(f"<th>{_e(lab)}</th>" for _, lab in TTA_FIGURES)
                        for side in ("PyTorch", "bundle"))  # fmt: skip
        parts += [
            '<section id="tta"><h2>Test-time compute</h2>',
            _figure(plot_tta(tta), "Fidelity vs ms per query, one point per test-time setting", "plot-tta"),
            f'<div class="scroll"><table id="tta-table"><tr><th>setting</th>{heads}</tr>{cells}</table></div>',
            "</section>",
        ]
    if rounds:
        cells = "".join(
            f"<tr><td>{_e(arm)}</td><td>{r['round']}</td><td>{_e(r.get('teacher_calls'))}</td>"
            f"<td>{_e(r.get('train_rows'))}</td>"
            + "".join(f"<td>{fmt_num(r['fidelity'].get(k), 2)}</td>" for k, _ in ROUND_FIGURES)
            + f"<td>{fmt_num((r.get('diversity') or {}).get('distinct_2'), 2)}</td>"
            f"<td>{fmt_num((r.get('diversity') or {}).get('top_share'), 2)}</td>"
            f"<td>{fmt_num((r.get('label_diversity') or {}).get('distinct_2'), 2)}</td>"
            f"<td>{_e((r.get('coverage') or {}).get('classes'))}</td></tr>"
            for arm, rs in rounds.items()
            for r in rs
        )
        heads = "".join(f"<th>{_e(lab)}</th>" for _, lab in ROUND_FIGURES)
        parts += [
            '<section id="rounds"><h2>Rounds: active learning and self-training</h2>',
            _figure(
                plot_rounds(rounds),
                "Fidelity and answer diversity over rounds, one line per arm",
                "plot-rounds",
            ),
            '<div class="scroll"><table id="rounds-table"><tr><th>arm</th><th>round</th><th>teacher calls</th>'
            f"<th>train rows</th>{heads}<th>answers distinct-2</th><th>most common answer</th>"
            f"<th>labels distinct-2</th><th>label classes</th></tr>{cells}</table></div></section>",
        ]
    parts.append('<section id="gallery"><h2>Held-out photos, worst disagreements first</h2>')
    if not gallery:
        parts.append('<p class="muted">No held-out rows to show.</p>')
    for g in gallery:
        r = g["row"]
        parts.append(
            f'<figure class="gallery-item"><img src="{g["uri"]}" alt="teacher and student outputs for {_e(r["id"])}">'
            f'<figcaption><span class="q">Q: {_e(r["question"])}</span><br>teacher: {_e(r.get("teacher_answer") or "")}<br>'
            f"student: {_e(r.get('student_answer') or '')}<br>disagreement {fmt_num(r.get('disagreement'), 2)} · answer F1 "
            f"{fmt_num(r.get('answer_f1'), 2)} · objects F1 {fmt_num(r.get('objects_f1'), 2)}</figcaption></figure>"
        )
    parts.append("</section></body></html>")
    return "\n".join(parts)


def build_report(
    runs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    scaling: Mapping[str, Any] | None = None,
    tta: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    rounds: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    gallery_n: int = 8,
    progress: Progress | None = None,
    predictor: Any | None = None,
) -> Path:
    """Read every RUN/eval.json (+ meta.json), draw the gallery of the first run and write ``out``. ``scaling``:
    the scaling study's JSON; ``tta``: the test-time compute studies' (``benchmarks/tta.py``, ``benchmarks/depth.py``;
    one or a list); ``rounds``: rounds studies (``benchmarks/rounds.py``, ``graphdistill improve``'s rounds.json;
    one or a list).

    ``predictor`` replaces ``load_student(runs[0])`` for the gallery."""
    if not runs:
        raise ValueError("build_report needs at least one run")
    evs: list[tuple[str, EvalResult]] = []
    sizes: list[int | None] = []
    for r in runs:
        run = Path(r)
        ev = read_eval(run)
        meta = read_json(run / "meta.json") if (run / "meta.json").exists() else {}
        evs.append((run.name, ev))
        sizes.append(train_size(run, ev, meta))
    points = validate_scaling(scaling) if scaling is not None else None
    tta_settings = validate_tta(tta) if tta is not None else None
    round_arms = validate_rounds(rounds) if rounds is not None else None
    gallery = gallery_items(Path(runs[0]), evs[0][1], gallery_n, progress, predictor) if gallery_n > 0 else []
    text = render_html(
        evs, train_sizes=sizes, gallery=gallery, scaling=points, tta=tta_settings, rounds=round_arms
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    log.info("wrote %s (%d bytes)", path, len(text))
    return path
