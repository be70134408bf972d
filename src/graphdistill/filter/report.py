"""The filter report: DATASET/report/{report.html, summary.json, decisions.jsonl, agreement.png, examples/*.png}.

report.html is self-contained (pictures embedded as base64): counts kept and dropped per rule, the
agreement histograms, and a few dropped groups per rule drawn with their consensus and the reason.
decisions.jsonl holds every group's decision, one JSON object a line (:func:`decision_record`): what
``graphdistill ui`` shows on its Filter page.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphdistill.filter.filtering import FilterResult, GroupDecision, StoreLike
    from graphdistill.filter.vote import Consensus

log = logging.getLogger(__name__)

EXAMPLES_PER_RULE = 3
DECISIONS_FILE = "decisions.jsonl"


def agreement_histogram(decisions: list[GroupDecision], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2), dpi=100)
    bins = [i / 10 for i in range(11)]
    for i, output in enumerate(("answer", "objects", "sources")):
        ax = fig.add_subplot(1, 3, i + 1)
        kept = [d.consensus.agreement[output] for d in decisions if d.kept]
        dropped = [d.consensus.agreement[output] for d in decisions if not d.kept]
        ax.hist(
            [kept, dropped], bins=bins, stacked=True, label=["kept", "dropped"], color=["#2ca02c", "#d62728"]
        )
        ax.set_title(f"{output} agreement")
        ax.set_xlabel("fraction of samples agreeing")
        if i == 0:
            ax.set_ylabel("inputs")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _example_picture(c: Consensus, store: StoreLike) -> Any:
    from graphdistill.filter.vote import load_image_of
    from graphdistill.viz import draw_output

    image = load_image_of(c, store.blob)
    output = {"answer": c.answer, "objects": c.objects, "sources": c.sources}
    pic = draw_output(image, output, title=f"Q: {c.question}")
    if max(pic.size) > 480:
        pic.thumbnail((480, 480))
    return pic


def teacher_line(measures: dict[str, Any]) -> str:
    """The teacher measures of a filter summary (:func:`~graphdistill.filter.filtering.teacher_measures`)
    in one line of words."""

    def pct(key: str) -> str:
        v = measures.get(key)
        return "n/a" if v is None else f"{v:.0%}"

    agreement = measures.get("answer_agreement")
    words = measures.get("greedy_words")
    return (
        f"greedy answers naming only detected classes {pct('greedy_grounded')} "
        f"(of {measures.get('greedy_n', 0)}), cut by the token limit {pct('greedy_cut_by_length')}, "
        f"{'n/a' if words is None else f'{words:.1f}'} words on average; mean answer agreement across the K "
        f"samples {'n/a' if agreement is None else f'{agreement:.2f}'} (of {measures.get('agreement_n', 0)} "
        f"inputs with two or more); keep rate {pct('keep_rate')}"
    )


def decision_record(d: GroupDecision) -> dict[str, Any]:
    """One line of decisions.jsonl: the group, kept or not, its split, every rule it failed with the reason,
    the first of them (the one the summary counts), and the voted question and answer."""
    return {
        "group_id": d.group_id,
        "kept": d.kept,
        "kept_for_evaluation": d.kept_for_evaluation,
        "split": d.split,
        "heldout": d.heldout,
        "rule": d.rule,
        "reason": d.reason,
        "failed": [{"rule": name, "reason": why} for name, why in d.failed],
        "question": d.consensus.question,
        "answer": d.consensus.answer,
        "agreement": dict(d.consensus.agreement),
    }


def read_decisions(report_dir: Path) -> list[dict[str, Any]] | None:
    """The decisions a filter recorded in ``report_dir`` (a dataset's ``report`` folder), or None when it
    has none (a dataset filtered before decisions.jsonl was written)."""
    path = report_dir / DECISIONS_FILE
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_report(
    result: FilterResult,
    store: StoreLike,
    out: Path,
    consensus_of: Callable[[GroupDecision], Consensus] | None = None,
) -> Path:
    """Write the report folder; returns the path of report.html. ``consensus_of`` gives a decision's full
    consensus (masks included) for the pictures of dropped examples; by default the decision's own."""
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / DECISIONS_FILE).write_text(
        "".join(json.dumps(decision_record(d), default=str) + "\n" for d in result.decisions),
        encoding="utf-8",
    )
    hist = agreement_histogram(result.decisions, out / "agreement.png")

    examples: dict[str, list[tuple[GroupDecision, Path | None]]] = {}
    ex_dir = out / "examples"
    for d in result.decisions:
        if d.kept or d.rule is None or len(examples.get(d.rule, [])) >= EXAMPLES_PER_RULE:
            continue
        path: Path | None = ex_dir / f"{d.rule}-{len(examples.get(d.rule, []))}.png"
        try:
            pic = _example_picture(consensus_of(d) if consensus_of else d.consensus, store)
            ex_dir.mkdir(exist_ok=True)
            assert path is not None
            pic.save(path)
        except Exception as exc:  # a picture must never sink the report
            log.warning("no picture for dropped group %s: %s", d.group_id, exc)
            path = None
        examples.setdefault(d.rule, []).append((d, path))

    esc = html.escape
    rows = "".join(f"<tr><td>{esc(rule)}</td><td>{n}</td></tr>" for rule, n in summary["by_rule"].items())
    flagged = "".join(
        f"<tr><td>{esc(rule)}</td><td>{n}</td></tr>" for rule, n in summary["flagged_by_rule"].items()
    )
    sections = []
    for rule, items in examples.items():
        cards = []
        for d, p in items:
            img = f'<img src="data:image/png;base64,{_b64(p)}" alt="{esc(d.group_id)}">' if p else ""
            cards.append(
                f'<div class="card">{img}<p><b>{esc(d.group_id[:16])}</b>: {esc(d.reason or "")}</p>'
                f"<p>Q: {esc(d.consensus.question)}<br>A: {esc(d.consensus.answer or '')}</p></div>"
            )
        sections.append(f"<h3>{esc(rule)}</h3><div class='cards'>{''.join(cards)}</div>")
    splits = ", ".join(f"{k}: {v}" for k, v in summary["splits"].items())
    rep = summary.get("replays") or {}
    replays = (
        f" Counterfactual replays among them: {rep['groups']} ({rep['kept']} kept, {rep['dropped']} dropped)."
        if rep.get("groups")
        else ""
    )
    held = summary["heldout"]
    held_line = (
        f"<p>Held out: <b>{held['kept']} of {held['groups']} kept for evaluation</b> (the test split), "
        f"{held['kept_for_evaluation']} of them flagged by a check and kept all the same, so every run is "
        f"scored on the same rows whatever the filter's settings; {held['no_teacher_output']} dropped with "
        "no finished teacher sample.</p>"
        if held["groups"]
        else ""
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>graphdistill filter report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} td,th{{padding:2px 10px}}
.cards{{display:flex;flex-wrap:wrap;gap:12px}} .card{{width:340px;border:1px solid #ccc;padding:6px}}
.card img{{max-width:100%}}</style></head><body>
<h1>Filter report</h1>
<p>{summary["groups"]} recorded inputs: <b>{summary["kept"]} kept</b>, {summary["dropped"]} dropped.
Splits: {esc(splits)}.{replays}</p>
{held_line}
<h2>The teacher's answers</h2><p>{esc(teacher_line(summary["teacher"]))}.</p>
<h2>Dropped, by the first rule each failed</h2><table><tr><th>rule</th><th>dropped</th></tr>{rows}</table>
<h2>Flagged, by every rule (an input can fail several)</h2>
<table><tr><th>rule</th><th>inputs</th></tr>{flagged}</table>
<h2>Agreement across the K samples</h2><img src="data:image/png;base64,{_b64(hist)}" alt="agreement">
<h2>Examples of dropped inputs</h2>{"".join(sections) or "<p>none dropped</p>"}
</body></html>
"""
    page_path = out / "report.html"
    page_path.write_text(page)
    return page_path
