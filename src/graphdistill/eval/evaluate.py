"""Evaluate one student run on a dataset split: fidelity to the teacher's recorded outputs and cost against
the live teacher graph, in one process. The result is what ``graphdistill eval`` prints and writes to
``RUN/eval.json``::

    {"n": int, "photos": int, "split": str, "run": str, "dataset": str,
     "fidelity": {answer_exact, answer_f1, answer_semantic, box_map50, box_map, mask_miou, sources_recall, ...},
     "fidelity_ci": {answer_exact: [lo, hi], ...},  # 95 % bootstrap intervals, photos then rows resampled
     "ci": {level, resamples, seed, method},
     "cost": {teacher_ms, student_ms, speedup, teacher_bytes, student_bytes, size_ratio, ...},
     "rows": [{id, question, teacher_answer, student_answer, answer_f1, objects_f1, mask_miou,
               sources_recall, disagreement}],  # per test row, for the report's gallery
     "exported": {bundle: {ms, fidelity and fidelity_ci vs the teacher on every row, parity_vs_student}},
     "teacher_self": {samples, fidelity, fidelity_ci},  # the teacher's other recorded samples vs the reference
                                                        # (the trace store must be there; else absent)
     "ground_truth": {...} (when rows have it)}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill._fs import ref
from graphdistill.dataset import DatasetError, DatasetRow, open_dataset
from graphdistill.errors import GraphdistillError
from graphdistill.eval import cost, metrics
from graphdistill.eval.result import EvalResult, RowScores, TeacherSelf
from graphdistill.runner.tta import parse_policy

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
Status = Callable[[str], None]

FIDELITY_KEYS = metrics.FIDELITY_KEYS
COST_KEYS = ("teacher_ms", "student_ms", "speedup", "teacher_bytes", "student_bytes")


class EvalError(GraphdistillError, ValueError):
    """The run or the dataset cannot be evaluated; the message names which and why."""


def output_of_row(row: DatasetRow, kinds: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The teacher's recorded final output of one dataset row, in the canonical ``answer`` / ``objects`` /
    ``sources`` fields (the dataset's columns). With ``kinds`` (the graph's {output name: kind}) only the
    fields the graph has an output for (see :func:`metrics.canonical_output`)."""
    out = {
        "answer": row.answer,
        "objects": list(row.objects),
        "sources": list(row.sources),
    }
    if kinds is None:
        return out
    kind_values = {str(getattr(k, "value", k)) for k in kinds.values()}
    return {f: v for f, v in out.items() if kind_values & set(metrics.CANONICAL_KINDS[f])}


def output_kinds_of(ds: Any) -> dict[str, Any] | None:
    """The dataset's graph outputs ({name: kind}) from its manifest, or None (visual_rag's names assumed)."""
    graph = ds.graph
    return graph.output_kinds() if graph is not None else None


def ground_truth_of_row(row: DatasetRow) -> dict[str, Any] | None:
    """A row's optional human labels ({answer, objects, sources}), else None."""
    return dict(row.ground_truth) if row.ground_truth else None


def row_scores(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, float | None]:
    """Cheap per-row agreement (no mAP: one row is too few): answer F1, object-match F1 (class + box IoU
    >= 0.5), mask mIoU, sources recall; ``disagreement`` = 1 - their mean."""
    t_objs = [metrics.as_object(o) for o in teacher.get("objects") or []]
    s_objs = [metrics.as_object(o) for o in student.get("objects") or []]
    scores: dict[str, float | None] = {"answer_f1": None, "objects_f1": None, "mask_miou": None}
    if "answer" in teacher:
        scores["answer_f1"] = metrics.token_f1(str(student.get("answer") or ""), str(teacher["answer"] or ""))
    if "objects" in teacher:
        scores["objects_f1"] = metrics.objects_f1(t_objs, s_objs)
        scores["mask_miou"] = metrics.mask_miou([t_objs], [s_objs])
    scores["sources_recall"] = (
        metrics.source_metrics([teacher["sources"] or []], [student.get("sources") or []])["sources_recall"]
        if "sources" in teacher
        else None
    )
    vals = [v for v in scores.values() if v is not None]
    scores["disagreement"] = 1.0 - float(np.mean(vals)) if vals else 0.0
    return scores


def photo_key(row: DatasetRow) -> str:
    """The photo(s) a dataset row was made from, as one key: the unit the bootstrap resamples (rows about
    one photo are correlated). A row without provenance is its own unit."""
    photos = sorted(row.provenance_photos)
    return "+".join(photos) if photos else f"row:{row.id}"


def jsonable_output(out: Any, kinds: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A predictor's (or the teacher graph's) output in the canonical ``answer`` / ``objects`` / ``sources``
    fields, records dumped to plain JSON values. ``kinds`` (the graph's {output name: kind}): the output is
    keyed by the graph's own names and each field is picked by its kind (see
    :func:`metrics.canonical_output`); without it the names are visual_rag's."""
    d = metrics.canonical_output(dict(out), kinds)
    if kinds is None or "objects" in d:
        d["objects"] = [metrics.as_object(o).model_dump(mode="json") for o in d.get("objects") or []]
    if kinds is None or "sources" in d:
        d["sources"] = list(d.get("sources") or [])
    if kinds is None or "answer" in d:
        d["answer"] = str(d.get("answer") or "")
    return d


def load_bundle_runner(bundle: str | os.PathLike[str], threads: int | None = None) -> Any:
    """``graphdistill.runner.BundleRunner(bundle)`` (the export stage's torch-free runner), or a clear error."""
    try:
        from graphdistill.runner import BundleError, BundleRunner
    except ImportError as exc:
        raise EvalError(
            f"cannot time exported bundle {bundle}: graphdistill.runner is not available ({exc})"
        ) from exc
    try:
        return BundleRunner(Path(bundle), threads=threads)
    except BundleError as exc:
        raise EvalError(f"exported bundle {bundle}: {exc}") from exc


def _real_rows(rows: list[DatasetRow], split: str) -> list[DatasetRow]:
    """The rows whose targets describe their image: counterfactual replays (``replay`` column) are left out,
    their objects and answer were made from an edited state, not from the photo."""
    real = [r for r in rows if not r.is_replay]
    if len(real) < len(rows):
        log.info("%s: %d counterfactual replay rows left out of the evaluation", split, len(rows) - len(real))
    return real


def teacher_samples(
    ds: Any, rows: Sequence[DatasetRow], kinds: Mapping[str, Any] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]] | None:
    """The teacher against itself: for each row, each of its recorded samples other than the one its answer
    was voted from, as (reference, that sample's output, the row's photo) — the reference repeated once per
    sample. A sample's objects are mapped back from its test-time augmentation as the vote maps them
    (:func:`graphdistill.recording.tta.untta_object`). None when the dataset's trace store
    (``manifest.source_store``) is not there to read them from; rows whose store holds no other sample add
    nothing."""
    from graphdistill.filter.vote import OutputNames, trace_objects, trace_sources
    from graphdistill.recording.tta import tta_of, untta_object
    from graphdistill.store.trace_store import StoreError, TraceStore

    where = ds.manifest.get("source_store")
    if not where or not Path(where).is_dir():
        log.info("teacher against itself: the dataset's trace store %s is not here; skipped", where)
        return None
    names = OutputNames.from_kinds(kinds) if kinds else OutputNames()
    refs: list[dict[str, Any]] = []
    outs: list[dict[str, Any]] = []
    photos: list[str] = []
    try:
        store = TraceStore(where, readonly=True, check=False)  # only read here: filter checked it
    except (StoreError, OSError) as exc:
        log.info("teacher against itself: cannot open the trace store %s (%s); skipped", where, exc)
        return None
    with store:
        for row in rows:
            ref = output_of_row(row, kinds)
            voted_from_seen = False
            for tid in row.trace_ids:
                try:
                    trace = store.get(tid)
                except (StoreError, KeyError):
                    continue
                if trace.status != "ok":
                    continue
                answer = trace.output.get(names.answer) if names.answer else None
                if not voted_from_seen and answer == ref.get("answer"):
                    voted_from_seen = True  # the sample the reference answer is: not "another" sample
                    continue
                tta = tta_of(trace)
                objs = trace_objects(trace, names.objects) if names.objects else []
                out = {
                    "answer": answer if isinstance(answer, str) else "",
                    "objects": [(untta_object(o, tta) if tta else o).model_dump(mode="json") for o in objs],
                    "sources": trace_sources(trace, names.sources),
                }
                refs.append(ref)
                outs.append({f: v for f, v in out.items() if f in ref})
                photos.append(photo_key(row))
    return refs, outs, photos


def _with_knobs(
    predict: Callable[..., Any],
    augmentations: tuple[str, ...],
    below: float | None,
    depth: int | None = None,
    always: bool = False,
) -> Callable[[Any, str], Any]:
    """``predict(image, question)`` with the test-time compute knobs passed on: ``tta=augmentations`` (when
    there are any augmentations, or ``always``), ``tta_below=below`` and ``depth`` (when given)."""
    knobs: dict[str, Any] = {}
    if augmentations or always:
        knobs["tta"] = augmentations
        if below is not None:
            knobs["tta_below"] = below
    if depth is not None:
        knobs["depth"] = depth
    if not knobs:
        return predict
    return lambda image, question: predict(image, question, **knobs)


def evaluate_run(
    run: str | os.PathLike[str],
    dataset: str | os.PathLike[str],
    *,
    split: str = "test",
    teacher_timing: bool = True,
    teacher_n: int = 3,
    student_repeats: int = 5,
    teacher_repeats: int = 1,
    bundles: Sequence[str | os.PathLike[str]] = (),
    bundle_threads: Sequence[int] = (1, 2),
    val: bool = False,
    semantic_threshold: float = metrics.DEFAULT_SEMANTIC_THRESHOLD,
    embedder: Any | None = None,
    semantic: bool = True,
    graph_spec: str | None = None,
    predictor: Any | None = None,
    tta: str | Sequence[str] | None = None,
    tta_below: float | None = None,
    depth: int | None = None,
    ci_resamples: int = metrics.DEFAULT_RESAMPLES,
    ci_seed: int = 0,
    progress: Progress | None = None,
    status: Status | None = None,
) -> EvalResult:
    """Everything ``graphdistill eval`` reports; see the module docstring for the shape. ``val`` also scores
    the val split (``fidelity_val``).

    Each fidelity figure, of the PyTorch student and of every bundle, comes with a 95 % bootstrap interval
    (:func:`metrics.fidelity_intervals`: the split's photos resampled, then the rows of each, ``ci_resamples``
    times from ``ci_seed``; 0 resamples: no intervals). Each bundle answers every row of the split, so its
    fidelity to the teacher is measured on the same rows as the PyTorch student's.

    ``predictor`` (anything with ``.predict(image, question)``) replaces ``load_student(run)``, e.g. a
    student already in memory; sizes still come from ``RUN/model.safetensors``.

    ``tta`` (``"flip,scale"``, :mod:`graphdistill.runner.tta`): the PyTorch student answers with test-time
    augmentation (its ``predict`` takes ``tta=``), and so does every bundle (``()``: none, whatever its
    manifest says); None: the student without, each bundle as its manifest says. ``tta_below``: the adaptive
    policy (views only when the photo's own answer has no object or one scoring under it), for both.
    ``depth``: iterations of the student's recurrent block (``predict(depth=)``), for the student and every
    bundle (None: 1 for the student, each bundle its manifest's default).

    Each bundle is timed with each of ``bundle_threads`` runtime threads; its ``ms`` is the fastest setting
    (``ms_by_threads`` has them all): on a 2-core CPU a one-token decoder step is often faster on one thread,
    the thread hand-off costing more than the split work saves.
    """
    run = Path(run)
    say = status or (lambda msg: log.info("%s", msg))
    if not (run / "model.safetensors").exists():
        raise EvalError(f"{run} is not a student run: {run / 'model.safetensors'} is missing")
    try:
        ds = open_dataset(dataset)
        rows = _real_rows(ds.rows(split), split)
    except DatasetError as exc:
        raise EvalError(str(exc)) from exc
    if not rows:
        raise EvalError(f"dataset {dataset}: split {split!r} has no rows to evaluate on")
    if ci_resamples < 0:
        raise EvalError(f"ci_resamples must be >= 0, got {ci_resamples}")
    kinds = output_kinds_of(ds)  # outputs are keyed by the graph's own names; scored by kind
    augmentations, tta_below = parse_policy(tta, tta_below)

    say(f"loading the student from {run}")
    if predictor is None:
        # the libraries both models need are imported before the clock starts, so the student's memory is
        # its own (model + activations), not torch's import
        from graphdistill._lazy import require

        require("torch", purpose="running the student")
    with cost.PeakRSS() as student_mem:
        if predictor is None:
            from graphdistill.student.predict import load_student  # type: ignore[import-not-found,unused-ignore]

            predictor = load_student(run)
        if depth is not None and hasattr(predictor, "check_depth"):
            try:
                predictor.check_depth(depth)
            except ValueError as exc:
                raise EvalError(f"{run}: {exc}") from exc
        student_predict = _with_knobs(predictor.predict, augmentations, tta_below, depth)
        student_out: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            student_out.append(jsonable_output(student_predict(ds.image(row), row.question), kinds))
            if progress:
                progress(f"student on {split}", i + 1, len(rows))
        timed_rows = rows[: max(1, teacher_n)]
        inputs = [(ds.image(r), r.question) for r in timed_rows]
        s_lat = cost.median_latency(
            student_predict, inputs, repeats=student_repeats, label="timing the student", progress=progress
        )
    teacher_out = [output_of_row(r, kinds) for r in rows]
    s_fp = cost.student_footprint(run)
    cost_out: dict[str, Any] = {
        "student_ms": s_lat["median_ms"],
        "student_bytes": s_fp["bytes"],
        "student_params": s_fp["params"],
        "student_peak_rss_increase_bytes": student_mem.increase,
        "timed_inputs": len(inputs),
        "student_repeats": student_repeats,
        "teacher_ms": None,
        "teacher_bytes": None,
        "teacher_params": None,
    }

    exported: dict[str, Any] = {}
    bundle_out: dict[str, list[dict[str, Any]]] = {}
    for b in bundles:
        by_threads: dict[str, float] = {}
        lat: dict[str, Any] = {}
        runner: Any = None
        for threads in bundle_threads or (None,):
            say(f"loading exported bundle {b}" + (f" ({threads} threads)" if threads else ""))
            runner = load_bundle_runner(b, threads)
            bundle_predict = _with_knobs(
                runner.predict, augmentations, tta_below, depth, always=tta is not None
            )
            lat = cost.median_latency(
                bundle_predict,
                inputs,
                repeats=student_repeats,
                label=f"timing {Path(b).name}" + (f" ({threads} threads)" if threads else ""),
                progress=progress,
            )
            by_threads[str(threads or "default")] = lat["median_ms"]
        outs = bundle_out[str(b)] = []
        for i, row in enumerate(rows):  # every row: its fidelity is scored like the PyTorch student's
            outs.append(jsonable_output(bundle_predict(ds.image(row), row.question), kinds))
            if progress:
                progress(f"{Path(b).name} on {split}", i + 1, len(rows))
        parity = metrics.compare_outputs(
            [student_out[i] for i in range(len(inputs))],
            [jsonable_output(o, kinds) for o in lat["outputs"]],
            semantic=False,
            class_names=ds.class_names,
        )
        exported[str(b)] = {
            "ms": min(by_threads.values()),
            "ms_by_threads": by_threads,
            "bytes": cost.path_bytes(b),
            "parity_vs_student": parity,
        }

    teacher_mem: cost.PeakRSS | None = None
    graph = None
    if teacher_timing:
        from graphdistill.graphs.spec import load_graph

        say("loading the teacher graph (LLM, detector, segmenter, embedder, vector DB: this takes a while)")
        with cost.PeakRSS() as teacher_mem:
            graph = load_graph(graph_spec)
            t_lat = cost.median_latency(
                cost.teacher_predict(graph),
                inputs,
                repeats=teacher_repeats,
                label="timing the teacher graph",
                progress=progress,
            )
        cost_out["teacher_ms"] = t_lat["median_ms"]
        cost_out["teacher_repeats"] = teacher_repeats
        cost_out["teacher_peak_rss_increase_bytes"] = teacher_mem.increase
        rerun = metrics.compare_outputs(
            [teacher_out[i] for i in range(len(inputs))],
            [jsonable_output(o, kinds) for o in t_lat["outputs"]],
            semantic=False,
            class_names=ds.class_names,
        )
        cost_out["teacher_rerun_agreement"] = {
            k: rerun.get(k) for k in ("answer_exact", "answer_f1", "box_map50")
        }
    gts = [ground_truth_of_row(r) for r in rows]
    # scored after the teacher was timed, so its memory peak is not hidden by the embedder loaded here
    say(
        "scoring fidelity (loading the sentence embedder)"
        if semantic and embedder is None
        else "scoring fidelity"
    )
    if semantic and embedder is None:
        embedder = metrics.default_embedder()
    fid = metrics.fidelity(
        teacher_out,
        student_out,
        ground_truth=gts if any(gts) else None,
        embedder=embedder,
        semantic=semantic,
        semantic_threshold=semantic_threshold,
        class_names=ds.class_names,
    )
    fid["answer_semantic_threshold"] = semantic_threshold if semantic else None
    ground_truth = fid.pop("ground_truth", None)
    clusters = [photo_key(r) for r in rows]
    score_kw: dict[str, Any] = dict(
        embedder=embedder, semantic=semantic, semantic_threshold=semantic_threshold
    )

    def intervals(predicted: list[dict[str, Any]]) -> dict[str, list[float] | None] | None:
        if not ci_resamples:
            return None
        return metrics.fidelity_intervals(
            teacher_out, predicted, clusters, resamples=ci_resamples, seed=ci_seed, **score_kw
        )

    if ci_resamples:
        say(f"bootstrap intervals ({ci_resamples} resamples of {len(set(clusters))} photos, then their rows)")
    fid_ci = intervals(student_out)
    for b, outs in bundle_out.items():
        exported[b]["fidelity"] = metrics.compare_outputs(
            teacher_out, outs, class_names=ds.class_names, **score_kw
        )
        exported[b]["fidelity_ci"] = intervals(outs)
    # the teacher's other recorded samples against the reference: how far one run of the teacher follows it
    teacher_self: TeacherSelf | None = None
    self_pairs = teacher_samples(ds, rows, kinds)
    if self_pairs is not None and self_pairs[0]:
        refs, others, self_photos = self_pairs
        say(f"scoring the teacher against itself ({len(others)} other samples)")
        teacher_self = {
            "samples": len(others),
            "fidelity": metrics.compare_outputs(refs, others, class_names=ds.class_names, **score_kw),
            "fidelity_ci": metrics.fidelity_intervals(
                refs, others, self_photos, resamples=ci_resamples, seed=ci_seed, **score_kw
            )
            if ci_resamples
            else None,
        }
    fid_val = None
    if val and split != "val" and ds.splits.get("val"):
        val_rows = _real_rows(ds.rows("val"), "val")
        val_out = []
        for i, row in enumerate(val_rows):
            val_out.append(jsonable_output(student_predict(ds.image(row), row.question), kinds))
            if progress:
                progress("student on val", i + 1, len(val_rows))
        fid_val = metrics.compare_outputs(
            [output_of_row(r, kinds) for r in val_rows],
            val_out,
            embedder=embedder,
            semantic=semantic,
            semantic_threshold=semantic_threshold,
            class_names=ds.class_names,
        )
    say("counting teacher model sizes")
    t_fp = cost.teacher_footprint(graph)
    cost_out["teacher_bytes"] = t_fp["bytes"]
    cost_out["teacher_params"] = t_fp["params"]
    cost_out["teacher_models"] = [{k: v for k, v in m.items() if k != "files"} for m in t_fp["models"]]
    cost_out["teacher_sizes_assumed_defaults"] = t_fp["assumed_defaults"]
    cost_out["speedup"] = cost.ratio(cost_out["teacher_ms"], cost_out["student_ms"])
    cost_out["size_ratio"] = cost.ratio(cost_out["teacher_bytes"], cost_out["student_bytes"])
    cost_out["params_ratio"] = cost.ratio(cost_out["teacher_params"], cost_out["student_params"])
    cost_out["memory_ratio"] = (
        cost.ratio(teacher_mem.increase, student_mem.increase) if teacher_mem is not None else None
    )
    for info in exported.values():
        info["speedup_vs_teacher"] = cost.ratio(cost_out["teacher_ms"], info["ms"])

    per_row: list[RowScores] = []
    for row, t, s in zip(rows, teacher_out, student_out, strict=True):
        scores = row_scores(t, s)
        per_row.append(
            {
                "id": row.id,
                "image": row.image,
                "question": row.question,
                "teacher_answer": t.get("answer"),
                "student_answer": s.get("answer"),
                "answer_f1": scores["answer_f1"],
                "objects_f1": scores["objects_f1"],
                "mask_miou": scores["mask_miou"],
                "sources_recall": scores["sources_recall"],
                "disagreement": float(scores["disagreement"] or 0.0),
            }
        )
    result: EvalResult = {
        "n": len(rows),
        "photos": len(set(clusters)),
        "split": split,
        "run": str(run),
        "dataset": ref(dataset),  # a local folder made absolute (the report reopens it), a URL as given
        "fidelity": fid,
        "fidelity_ci": fid_ci,
        "ci": {
            "level": metrics.DEFAULT_LEVEL,
            "resamples": ci_resamples,
            "seed": ci_seed,
            "method": "percentile bootstrap: the split's photos drawn with replacement, then the rows of "
            "each drawn photo; every figure recomputed on each resample",
        },
        "cost": cost_out,
        "rows": per_row,
    }
    if depth is not None:
        result["depth"] = depth
    if augmentations:
        result["tta"] = list(augmentations)
        if tta_below is not None:
            result["tta_below"] = tta_below
    if teacher_self is not None:
        result["teacher_self"] = teacher_self
    if fid_val is not None:
        result["fidelity_val"] = fid_val
    if exported:
        result["exported"] = exported
    if ground_truth is not None:
        result["ground_truth"] = ground_truth
    return result
