"""What each page of ``graphdistill ui`` shows, as plain JSON values, read from :class:`~.sources.Sources`.

No web framework here: :mod:`.app` serves these. Pictures are drawn by :mod:`graphdistill.viz` (the one
drawing of boxes and masks), teacher/student pairs by :func:`graphdistill.eval.report.draw_pair`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill.trace import BLOB_KEY, Detections, Masks, ObjectOut, Trace, decode_value
from graphdistill.ui.sources import Sources, UIError

log = logging.getLogger(__name__)

MAX_LIST = 40  # items of a long list shown; the rest counted
MAX_TEXT = 4000


# --------------------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------------------


def trace_list(src: Sources, *, offset: int, limit: int, search: str, status: str | None) -> dict[str, Any]:
    total, rows = src.store.listing(
        offset=offset, limit=min(max(limit, 1), 200), search=search, status=status
    )
    return {"total": total, "offset": offset, "rows": rows}


def shown(value: Any) -> Any:
    """A recorded value as the page shows it: blobs as links, masks as their size, long lists cut."""
    if isinstance(value, dict):
        if BLOB_KEY in value and len(value) == 1:
            ref = value[BLOB_KEY]
            return {"blob": ref["blob"], "shape": ref["shape"], "dtype": ref["dtype"], "url": blob_url(ref)}
        if set(value) == {"size", "counts"}:
            return {"mask": f"{value['size'][0]}×{value['size'][1]} RLE, {len(value['counts'])} runs"}
        return {k: shown(v) for k, v in value.items()}
    if isinstance(value, list):
        head = [shown(v) for v in value[:MAX_LIST]]
        return head + ([f"… {len(value) - MAX_LIST} more"] if len(value) > MAX_LIST else [])
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[:MAX_TEXT] + f"… ({len(value)} characters)"
    return value


def blob_url(ref: Mapping[str, Any]) -> str | None:
    return f"/api/blobs/{ref['blob']}" if ref.get("media_type") == "image/png" else None


def _documents(trace: Trace) -> dict[str, str]:
    """Every retrieved document's text by id, from what the nodes wrote."""
    docs: dict[str, str] = {}
    for span in trace.spans:
        for value in span.writes.values():
            if isinstance(value, list):
                for d in value:
                    if (
                        isinstance(d, dict)
                        and isinstance(d.get("id"), str)
                        and isinstance(d.get("text"), str)
                    ):
                        docs.setdefault(d["id"], d["text"])
    return docs


def get_trace(src: Sources, trace_id: str) -> Trace:
    try:
        return src.store.get(trace_id)
    except KeyError:
        raise UIError(f"trace store {src.store.root}: no trace with id {trace_id!r}") from None


def trace_view(src: Sources, trace_id: str) -> dict[str, Any]:
    """One trace: its nodes in the order they ran with their timings, reads and writes; its output with
    the sources' text; the other samples of the same input."""
    t = get_trace(src, trace_id)
    t0 = min((s.start for s in t.spans), default=0.0)
    docs = _documents(t)
    sources = t.output.get("sources") if isinstance(t.output.get("sources"), list) else []
    siblings = [
        {
            "id": s.id,
            "sample_index": s.sample_index,
            "status": s.status,
            "answer": s.output.get("answer") if isinstance(s.output.get("answer"), str) else None,
        }
        for s in src.store.iter(group_id=t.group_id, page=50)
    ]
    return {
        "id": t.id,
        "graph": t.graph.model_dump(),
        "status": t.status,
        "error": t.error,
        "group_id": t.group_id,
        "sample_index": t.sample_index,
        "duration_s": t.duration_s,
        "created_at": t.created_at,
        "question": t.inputs.get("question"),
        "has_image": _image_ref(t) is not None,
        "inputs": shown(t.inputs),
        "output": shown(t.output),
        "sources": [{"id": s, "text": docs.get(s)} for s in sources or [] if isinstance(s, str)],
        "provenance": t.provenance.model_dump(),
        "spans": [
            {
                "node": s.node,
                "start_ms": (s.start - t0) * 1000,
                "ms": s.seconds * 1000,
                "model_id": s.model_id,
                "error": s.error,
                "reads": shown(s.reads),
                "writes": shown(s.writes),
            }
            for s in t.spans
        ],
        "samples": sorted(siblings, key=lambda s: s["sample_index"]),
    }


def _image_ref(t: Trace) -> dict[str, Any] | None:
    img = t.inputs.get("image")
    return img[BLOB_KEY] if isinstance(img, dict) and BLOB_KEY in img else None


def node_output(t: Trace, node: str | None) -> dict[str, Any]:
    """What one node wrote (or, without ``node``, the trace's output) as a drawable output: objects (the
    node's detections, joined with its masks and the detections it read), its answer, its documents."""
    if node is None:
        return dict(decode_value(t.output))
    span = next((s for s in t.spans if s.node == node), None)
    if span is None:
        raise UIError(f"trace {t.id}: no node {node!r} (nodes: {[s.node for s in t.spans]})")
    writes, reads = decode_value(span.writes), decode_value(span.reads)
    out: dict[str, Any] = {}
    dets = next((v for v in writes.values() if isinstance(v, Detections)), None)
    masks = next((v for v in writes.values() if isinstance(v, Masks)), None)
    if masks is not None and dets is None:
        dets = next((v for v in reads.values() if isinstance(v, Detections)), None)
    if dets is not None:
        objects = dets.as_objects()
        if masks is not None:
            for i, o in enumerate(objects[: len(masks)]):
                o.mask = masks.rles[i]
        out["objects"] = objects
    for v in writes.values():
        if isinstance(v, list) and v and all(isinstance(o, dict) and "box" in o for o in v):
            out["objects"] = [ObjectOut.model_validate(o) for o in v]
    if isinstance(writes.get("answer"), str):
        out["answer"] = writes["answer"]
    docs = next((v for v in writes.values() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
    if docs and all(isinstance(d.get("id"), str) for d in docs):
        out["sources"] = [d["id"] for d in docs]
    return out


def trace_picture(src: Sources, trace_id: str, node: str | None) -> bytes:
    """The trace's input image with the node's (or the final) output drawn on it, as PNG."""
    from graphdistill import viz

    t = get_trace(src, trace_id)
    ref = _image_ref(t)
    if ref is None:
        raise UIError(f"trace {trace_id}: its inputs hold no image")
    image = src.store.load(ref)
    return png(viz.draw_output(image, node_output(t, node)))


def png(pic: Any) -> bytes:
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def draw(image: np.ndarray, output: Mapping[str, Any]) -> bytes:
    """Any output (e.g. the in-browser student's) drawn on its image, as PNG."""
    from graphdistill import viz

    return png(viz.draw_output(image, output))


# --------------------------------------------------------------------------------------------------------
# Filter
# --------------------------------------------------------------------------------------------------------

NOT_RECORDED = (
    "reason not recorded: this dataset was filtered before the filter wrote report/decisions.jsonl; "
    "run graphdistill filter again to see each group's reason"
)


@lru_cache(maxsize=4)
def _decisions(report_dir: Path, store_root: Path, n_traces: int) -> tuple[dict[str, Any], ...]:
    del store_root, n_traces  # part of the cache key only
    from graphdistill.filter.report import read_decisions

    return tuple(read_decisions(report_dir) or ())


def _first_trace(src: Sources, group_id: str) -> str | None:
    """The id of a group's first stored trace (a link from its decision), read from the index."""
    _, rows = src.store.listing(group_id=group_id, limit=1)
    return str(rows[0]["id"]) if rows else None


def filter_view(
    src: Sources, *, offset: int = 0, limit: int = 50, rule: str | None = None, kept: bool | None = None
) -> dict[str, Any]:
    """The filter's summary (kept and dropped by rule) and one page of its decisions, dropped first."""
    if src.dataset is None or src.dataset_path is None:
        raise UIError("no dataset given: start graphdistill ui with --dataset DATASET to see the filter")
    summary = (src.dataset.manifest.get("filter") or {}).get("summary") or {}
    decisions = list(_decisions(src.dataset_path / "report", src.store.root, src.store.count()))
    recorded = bool(decisions)
    if not recorded:  # kept: the dataset's rows; dropped: the store's other groups, reason unknown
        rows = {r.id: r for r in src.dataset.all_rows()}
        decisions = [
            {
                "group_id": g,
                "kept": g in rows,
                "split": rows[g].split if g in rows else None,
                "rule": None,
                "reason": None if g in rows else NOT_RECORDED,
                "failed": [],
                "question": rows[g].question if g in rows else None,
                "answer": rows[g].answer if g in rows else None,
            }
            for g in sorted(src.store.groups())
        ]
    picked = [
        d
        for d in decisions
        if (rule is None or d.get("rule") == rule or any(f["rule"] == rule for f in d.get("failed", [])))
        and (kept is None or bool(d["kept"]) == kept)
    ]
    picked.sort(key=lambda d: (bool(d["kept"]), str(d.get("rule") or ""), d["group_id"]))
    page = [{**d, "trace": _first_trace(src, d["group_id"])} for d in picked[offset : offset + limit]]
    return {
        "recorded": recorded,
        "summary": summary,
        "total": len(picked),
        "offset": offset,
        "kept": sum(bool(d["kept"]) for d in decisions),
        "dropped": sum(not d["kept"] for d in decisions),
        "rules": sorted(
            {f["rule"] for d in decisions for f in d.get("failed", [])} | set(summary.get("by_rule", {}))
        ),
        "rows": page,
    }


# --------------------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------------------


class Fidelity:
    """Held-out rows: the teacher's recorded output beside the student's (the ONNX bundle through the
    reference runner when one is given, else the run's PyTorch student), computed once per row. The figures
    and the rows' scores are always the shown student's: eval.json's for the PyTorch run; for a bundle, the
    rows scored here with eval's own :func:`row_scores` and the figures eval.json measured for that bundle
    (none when the run's evaluation did not measure it)."""

    def __init__(self, src: Sources) -> None:
        if src.eval is None or src.run is None:
            raise UIError(
                "no evaluated run given: start graphdistill ui with --run RUN (graphdistill eval RUN)"
            )
        if src.dataset is None:
            raise UIError(f"run {src.run}: its dataset {src.eval['dataset']} is not there; give --dataset")
        self.src = src
        self.rows = {r["id"]: r for r in src.eval["rows"]}
        split = src.eval.get("split", "test")
        self.dataset_rows = {r.id: r for r in src.dataset.rows(split)}
        from graphdistill.eval.evaluate import output_kinds_of

        self.kinds = output_kinds_of(src.dataset)
        self._predictor: Any = None
        self._student: dict[str, dict[str, Any]] = {}
        self._bundle_rows: list[dict[str, Any]] | None = None

    def scored_rows(self) -> list[dict[str, Any]]:
        """Every evaluated row with the shown student's answer and scores."""
        if self.src.bundle is None:
            return [dict(r) for r in self.rows.values()]
        if self._bundle_rows is None:
            from graphdistill.eval.evaluate import jsonable_output, output_of_row, row_scores

            scored = []
            for r in self.rows.values():
                teacher = jsonable_output(output_of_row(self._row(r["id"]), self.kinds), self.kinds)
                student = self.student(r["id"])
                scored.append({**r, **row_scores(teacher, student), "student_answer": student.get("answer")})
            self._bundle_rows = scored
        return self._bundle_rows

    def figures(self) -> tuple[dict[str, Any], str]:
        """The shown student's fidelity figures and what it is."""
        ev = self.src.eval
        assert ev is not None
        if self.src.bundle is None:
            return ev["fidelity"], "the PyTorch run"
        bundle = Path(self.src.bundle).resolve()
        for path, measured in (ev.get("exported") or {}).items():
            if Path(path).resolve() == bundle and isinstance(measured, dict) and "fidelity" in measured:
                return measured["fidelity"], f"bundle {self.src.bundle}"
        return (
            {},
            f"bundle {self.src.bundle} (its figures: not measured by this run's eval; rows scored here)",
        )

    def table(self, *, sort: str = "disagreement", descending: bool = True) -> dict[str, Any]:
        keys = {"disagreement", "answer_f1", "objects_f1", "mask_miou", "sources_recall"}
        if sort not in keys:
            raise UIError(f"cannot sort by {sort!r}: one of {sorted(keys)}")
        none_last = float("-inf") if descending else float("inf")
        rows = sorted(
            self.scored_rows(),
            key=lambda r: none_last if r.get(sort) is None else float(r[sort]),
            reverse=descending,
        )
        ev = self.src.eval
        assert ev is not None
        figures, student = self.figures()
        return {
            "run": str(self.src.run),
            "split": ev.get("split", "test"),
            "n": ev["n"],
            "fidelity": figures,
            "student": student,
            "rows": rows,
        }

    def _row(self, row_id: str) -> Any:
        row = self.dataset_rows.get(row_id)
        if row is None or row_id not in self.rows:
            raise UIError(f"run {self.src.run}: no evaluated row {row_id!r}")
        return row

    def student(self, row_id: str) -> dict[str, Any]:
        from graphdistill.eval.evaluate import jsonable_output

        if row_id not in self._student:
            row = self._row(row_id)
            assert self.src.dataset is not None
            image = self.src.dataset.image(row)
            self._student[row_id] = jsonable_output(self.predictor().predict(image, row.question), self.kinds)
        return self._student[row_id]

    def predictor(self) -> Any:
        if self._predictor is None:
            if self.src.bundle is not None:
                from graphdistill.runner import BundleRunner

                self._predictor = BundleRunner(self.src.bundle)
            else:
                from graphdistill.student.predict import load_student  # type: ignore[import-not-found,unused-ignore]

                assert self.src.run is not None  # __init__ checked
                self._predictor = load_student(self.src.run)
        return self._predictor

    def pair(self, row_id: str) -> dict[str, Any]:
        from graphdistill.eval.evaluate import jsonable_output, output_of_row

        row = self._row(row_id)
        docs = {d["id"]: d["text"] for d in self.src.dataset.documents} if self.src.dataset else {}
        teacher = jsonable_output(output_of_row(row, self.kinds), self.kinds)
        student = self.student(row_id)
        texts = {s: docs.get(s) for s in [*teacher.get("sources", []), *student.get("sources", [])]}
        return {
            "scores": self.rows[row_id],
            "question": row.question,
            "teacher": shown(teacher),
            "student": shown(student),
            "documents": texts,
        }

    def picture(self, row_id: str) -> bytes:
        from graphdistill.eval.evaluate import output_of_row
        from graphdistill.eval.report import draw_pair

        row = self._row(row_id)
        assert self.src.dataset is not None
        image = self.src.dataset.image(row)
        return png(draw_pair(image, output_of_row(row, self.kinds), self.student(row_id)))

    def image(self, row_id: str) -> bytes:
        assert self.src.dataset is not None
        return self.src.dataset.image_bytes(self._row(row_id))
