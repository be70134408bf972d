"""Recording many inputs: run a teacher graph over a folder of images or a JSONL of rows and record every run
into a trace store (:func:`record_inputs`; ``graphdistill record`` is its command line).

Inputs are a folder of images (each asked ``question``), a JSONL of rows ``{image, question[, provenance,
ground_truth]}`` or a Parquet table with those columns. ``samples=K`` records K samples per input (sample i gets ``configurable.gd_sample_index=i``,
``gd_sampling=i>0`` and a stable ``gd_seed``; all K share the input's content hash as group id). ``tta``
gives deterministic graphs variety (:mod:`graphdistill.recording.tta`). ``resume`` skips what the store
already holds; ``workers=N`` runs N processes that each load the graph once and write into the one store. A
bad input becomes a failed trace and the run goes on. On a Ray cluster the same tasks run in an actor pool
(:mod:`graphdistill.recording.ray_engine`, which calls :func:`run_tasks` in each actor).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from graphdistill.errors import GraphdistillError
from graphdistill.images import IMAGE_SUFFIXES
from graphdistill.recording.tta import META_TTA, apply_tta
from graphdistill.store.buffer import TraceBuffer

log = logging.getLogger(__name__)

DEFAULT_QUESTION = "What is in this picture?"


class RecordingError(GraphdistillError, ValueError):
    """Inputs, a graph or a store that cannot be recorded; the message names which and why."""


# --------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------


def read_inputs(
    path: str | os.PathLike[str], question: str = DEFAULT_QUESTION
) -> tuple[list[dict[str, Any]], int]:
    """The input rows ``{image: abs path, question, provenance}`` of a folder of images, a JSONL file or a
    Parquet table (``.parquet``: the JSONL's keys as columns, provenance a struct or JSON text), and how
    many JSONL lines / table rows were unusable."""
    src = Path(path)
    if not src.exists():
        raise RecordingError(f"inputs {src}: no such file or folder")
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RecordingError(
                f"inputs {src}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return [{"image": str(p.resolve()), "question": question, "provenance": {}} for p in files], 0
    rows: list[dict[str, Any]] = []
    bad = 0
    for where, row in _raw_rows(src):
        try:
            rows.append(_input_row(row, src.parent, question))
        except ValueError as exc:  # one bad row, not a bad file: the others still count
            log.warning("inputs %s %s skipped: %s", src, where, exc)
            bad += 1
    return _checked(src, rows, bad)


def _raw_rows(src: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of a JSONL file or a Parquet table (a line that is not JSON is a row
    that raises ``ValueError`` when checked)."""
    if src.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(src)
        except Exception as exc:
            raise RecordingError(f"inputs {src}: not a readable Parquet table ({exc})") from exc
        for i, row in enumerate(table.to_pylist()):  # a null cell is a column left out of this row
            yield f"row {i}", {k: v for k, v in row.items() if v is not None}
        return
    with open(src, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield f"line {lineno}", ValueError(f"not UTF-8 text ({exc.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except ValueError as exc:
                yield f"line {lineno}", exc


def _input_row(row: Any, base: Path, question: str) -> dict[str, Any]:
    """One checked input row ``{image: path, question, provenance[, ground_truth]}`` (``ValueError`` says
    why a row is unusable); a relative image path is taken from ``base``."""
    if isinstance(row, ValueError):
        raise row
    if not isinstance(row, dict) or not isinstance(row.get("image"), str):
        raise ValueError("a row must be an object with an 'image' path")
    if "question" in row and not str(row["question"] or "").strip():
        raise ValueError("its question is empty (leave the key out for the default question)")
    provenance = row.get("provenance") or {}
    if isinstance(provenance, str):  # a Parquet column of JSON text
        provenance = json.loads(provenance)
    image = Path(row["image"])
    if not image.is_absolute():
        image = base / image
    return {
        "image": str(image),
        "question": str(row.get("question") or question),
        "provenance": provenance,
        # human labels ({answer, objects, sources}) ride along to the dataset for eval
        **({"ground_truth": row["ground_truth"]} if row.get("ground_truth") else {}),
    }


def _checked(src: Path, rows: list[dict[str, Any]], bad: int) -> tuple[list[dict[str, Any]], int]:
    if not rows and not bad:
        raise RecordingError(f"inputs {src}: no rows")
    return rows, bad


# --------------------------------------------------------------------------------------------------------
# running (the same code in-process and in each worker process)
# --------------------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}  # per process: the graph, the store and the recorder, loaded once


def load_graph(spec: str | None, options: Mapping[str, Any] | None = None) -> Any:
    """The graph ``spec`` names (:func:`graphdistill.graphs.spec.load_graph`; None -> visual_rag, with
    ``options`` as :class:`~graphdistill.graphs.visual_rag.VisualRagConfig` fields)."""
    from graphdistill.graphs.spec import load_graph as spec_load_graph

    try:
        return spec_load_graph(spec, **dict(options or {}))
    except Exception as exc:
        name = spec or "visual_rag"
        raise RecordingError(f"graph {name}: cannot load it ({type(exc).__name__}: {exc})") from exc


def _init(spec: str | None, store_root: str | TraceBuffer, options: Mapping[str, Any] | None = None) -> None:
    """Load the graph (``options``: visual_rag's settings, e.g. its knowledge base), open the store and start
    one background recorder, once per process. A :class:`TraceBuffer` instead of a store folder keeps the
    traces for a writer elsewhere (a Ray actor)."""
    from graphdistill._env import apply_offline_env
    from graphdistill.recording.recorder import TraceRecorder, graph_identity
    from graphdistill.store.trace_store import TraceStore

    apply_offline_env()
    graph = load_graph(spec, options)
    store = store_root if isinstance(store_root, TraceBuffer) else TraceStore(store_root)
    schema, gid = graph_identity(graph)
    outcomes: list[tuple[Any, str | None]] = []
    recorder = TraceRecorder(  # not strict: the runs it could not store are counted as failed and shown
        store,
        schema=schema,
        graph_id=gid,
        background=True,
        strict=False,
        on_trace=lambda t, i: outcomes.append((t, i)),
    )
    _WORKER.update(
        graph=graph, store=store, graph_id=gid, recorder=recorder, outcomes=outcomes, errors_seen=0
    )


def run_tasks(
    tasks: list[dict[str, Any]], *, resume: bool, tta: Sequence[str], flush: bool = True
) -> dict[str, int]:
    """Run one batch of (input row, sample index) tasks through the graph, recording each.

    Returns the counts of traces written since the last call; with ``flush=False`` traces still being
    written in the background are counted by a later call (or :func:`drain`)."""
    from graphdistill.images import ImageError, load_image
    from graphdistill.recording.recorder import (
        META_GROUP,
        META_METADATA,
        META_PROVENANCE,
        META_SAMPLE,
        sampling_configurable,
    )
    from graphdistill.trace import Provenance, Trace, content_hash

    graph, store, gid, recorder = _WORKER["graph"], _WORKER["store"], _WORKER["graph_id"], _WORKER["recorder"]
    counts = {"recorded": 0, "failed": 0, "skipped": 0}
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for task in tasks:
        row, i = task["row"], task["sample_index"]
        raw_inputs = {"image": row["image"], "question": row["question"]}
        try:
            image = load_image(row["image"])
        except ImageError as exc:
            if i == 0:  # one line per input, not per sample; its failed traces keep the error
                log.warning("input %s not run: %s", row["image"], exc)
            ih = content_hash(raw_inputs)
            if resume and store.has_input(ih, i, graph_hash=gid.hash):
                counts["skipped"] += 1
                continue
            failed = Trace(
                graph=gid,
                inputs=raw_inputs,
                status="error",
                error=f"ImageError: {exc}",
                group_id=ih,
                sample_index=i,
                input_hash=ih,
                provenance=Provenance.model_validate(row["provenance"]),
            )
            _append_failed(store, failed, counts)
            continue
        # the recorder's image cache: the PNG hashed here is the one the run is recorded with, and the K
        # samples of this input reuse it (one encode per input instead of two per sample)
        group = recorder.input_hash({"image": image, "question": row["question"]})
        shown, seen = apply_tta(image, i, tta)
        inputs = {"image": shown, "question": row["question"]}
        if resume:
            ih = group if shown is image else recorder.input_hash(inputs)
            if store.has_input(ih, i, graph_hash=gid.hash):
                counts["skipped"] += 1
                continue
        meta: dict[str, Any] = {"source": row["image"]}
        if tta:
            meta[META_TTA] = seen.to_metadata()
        if row.get("ground_truth"):
            meta["ground_truth"] = row["ground_truth"]
        config = {
            "callbacks": [recorder],
            "metadata": {
                META_GROUP: group,
                META_SAMPLE: i,
                META_PROVENANCE: row["provenance"],
                META_METADATA: meta,
            },
            "configurable": sampling_configurable(group, i),
        }
        runs.append((inputs, config))
    if len(runs) == 1:
        try:
            graph.invoke(runs[0][0], config=runs[0][1])
        except Exception as exc:  # recorded as a failed trace by the recorder
            log.warning("graph failed on %s: %s", runs[0][1]["metadata"][META_METADATA]["source"], exc)
    elif runs:
        graph.batch([r[0] for r in runs], config=[r[1] for r in runs], return_exceptions=True)
    if flush:
        recorder.flush()
    for k, v in drain(flush=False).items():
        counts[k] += v
    return counts


def drain(flush: bool = True) -> dict[str, int]:
    """Counts of the traces the background recorder wrote since the last drain (after waiting for all)."""
    recorder, outcomes = _WORKER["recorder"], _WORKER["outcomes"]
    if flush:
        recorder.flush()
    counts = {"recorded": 0, "failed": 0, "skipped": 0}
    while outcomes:
        trace, trace_id = outcomes.pop(0)
        if trace_id is None:
            counts["skipped"] += 1
        elif trace.status == "ok":
            counts["recorded"] += 1
        else:
            counts["failed"] += 1
    errors = recorder.failed_to_record
    counts["failed"] += errors - _WORKER["errors_seen"]  # runs the recorder could not store (logged)
    _WORKER["errors_seen"] = errors
    return counts


def _append_failed(store: Any, trace: Any, counts: dict[str, int]) -> None:
    from graphdistill.store.trace_store import DuplicateTraceError

    try:
        store.append(trace, {})
        counts["failed"] += 1
    except DuplicateTraceError:
        counts["skipped"] += 1


def _worker_run(tasks: list[dict[str, Any]], resume: bool, tta: Sequence[str]) -> dict[str, int]:
    return run_tasks(tasks, resume=resume, tta=tta)


class RayActor:
    """One actor of ``engine="ray"``'s pool: loads the graph once, records each batch with
    :func:`run_tasks` (as a worker process does) into a :class:`TraceBuffer` and returns the traces it made
    for the driver to write (:func:`graphdistill.recording.ray_engine.traces_table`). ``stored``: the
    store's keys when the job started, for resume."""

    def __init__(
        self,
        graph: str | None,
        tta: Sequence[str],
        resume: bool,
        stored: set[tuple[str, str, int]],
        graph_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.buffer = TraceBuffer(stored)
        self.tta, self.resume = list(tta), resume
        _init(graph, self.buffer, graph_options)

    def __call__(self, table: Any) -> Any:
        from graphdistill.recording.ray_engine import traces_table

        tasks = [json.loads(t) for t in table.column("task").to_pylist()]
        counts = run_tasks(tasks, resume=self.resume, tta=self.tta, flush=True)
        taken = self.buffer.take()
        lost = counts["recorded"] + counts["failed"] - len(taken)  # counted by the recorder, never built
        return traces_table(taken, counts["skipped"], max(lost, 0))


# --------------------------------------------------------------------------------------------------------
# the whole job
# --------------------------------------------------------------------------------------------------------


def record_inputs(
    inputs: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    graph: str | None = None,
    graph_options: Mapping[str, Any] | None = None,
    question: str = DEFAULT_QUESTION,
    samples: int = 1,
    tta: Sequence[str] = (),
    resume: bool = False,
    workers: int = 1,
    batch_size: int = 1,
    engine: str = "local",
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    address: str | None = None,
    on_start: Callable[[int], None] | None = None,
    progress: Callable[[int, dict[str, int]], None] | None = None,
) -> dict[str, Any]:
    """Record every input of ``inputs`` ``samples`` times with the graph ``graph`` names (a spec
    ``module:attr`` / ``file.py:attr``; None: visual_rag, configured by ``graph_options``, e.g. ``{"kb_url":
    ...}``) into the store at ``store``.

    ``engine="local"``: this process, or ``workers`` processes that each write into the store.
    ``engine="ray"``: a pool of ``actors`` Ray actors that each load the graph once and reserve
    ``gpus_per_actor`` GPUs, fed ``batch_size`` runs at a time, this process the one writer of the store
    (:func:`graphdistill.recording.ray_engine.record_on_ray`); ``address``: a running cluster (``ray start
    --head`` prints it; None starts a local one for this call and stops it afterwards).

    ``on_start(total)`` is called once the graph is loaded, with the number of runs to come; ``progress(n,
    totals)`` after each batch of ``n`` runs, with the running counts. Returns ``{recorded, failed, skipped,
    seconds}`` (skipped: already stored with ``resume``, or an unusable JSONL line)."""
    if engine not in ("local", "ray"):
        raise RecordingError(f"engine {engine!r}: choose local or ray")
    for name, value in (
        ("samples", samples),
        ("workers", workers),
        ("batch_size", batch_size),
        ("actors", actors),
    ):
        if value < 1:
            raise RecordingError(f"{name} must be >= 1, got {value}")
    if gpus_per_actor < 0:
        raise RecordingError(f"gpus_per_actor must be >= 0, got {gpus_per_actor}")
    if engine == "ray" and workers != 1:
        raise RecordingError("workers is for the local engine; on ray the pool size is actors")
    rows, bad_rows = read_inputs(inputs, question)
    tasks = [{"row": r, "sample_index": i} for r in rows for i in range(samples)]
    batches = [tasks[i : i + batch_size] for i in range(0, len(tasks), batch_size)]
    totals = {"recorded": 0, "failed": 0, "skipped": bad_rows}
    start = time.perf_counter()
    store_root = str(Path(store))
    tta = list(tta)

    def done(counts: dict[str, int], n: int) -> None:
        for k, v in counts.items():
            totals[k] += v
        if progress is not None:
            progress(n, dict(totals))

    from concurrent.futures.process import BrokenProcessPool

    from graphdistill.store.trace_store import StoreError, TraceStore

    try:
        if engine == "ray":
            from graphdistill.recording.ray_engine import record_on_ray

            options = dict(graph_options or {})
            record_on_ray(
                tasks,
                store_root,
                actor=RayActor,
                actor_kwargs=lambda keys: {
                    "graph": graph,
                    "tta": tta,
                    "resume": resume,
                    "stored": keys,
                    "graph_options": options,
                },
                resume=resume,
                actors=actors,
                gpus_per_actor=gpus_per_actor,
                batch_size=batch_size,
                address=address,
                on_start=on_start,
                done=done,
            )
        elif workers == 1:
            _init(graph, store_root, graph_options)  # load errors show before any progress
            if on_start is not None:
                on_start(len(tasks))
            try:
                for batch in batches:  # traces are written in the background while the next batch runs
                    done(run_tasks(batch, resume=resume, tta=tta, flush=False), len(batch))
                done(drain(), 0)
            finally:
                _WORKER["recorder"].close()
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            TraceStore(store_root).close()  # made first, so workers never race to create its tables
            if on_start is not None:
                on_start(len(tasks))
            with ProcessPoolExecutor(
                max_workers=workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init,
                initargs=(graph, store_root, dict(graph_options or {})),
            ) as pool:
                futures = {pool.submit(_worker_run, b, resume, tta): len(b) for b in batches}
                for fut in as_completed(futures):
                    done(fut.result(), futures[fut])
    except BrokenProcessPool as exc:
        raise RecordingError(f"a worker process died ({exc}); record again with resume to continue") from exc
    except StoreError as exc:
        raise RecordingError(f"store {store}: {exc}") from exc
    return {**totals, "seconds": round(time.perf_counter() - start, 3)}
