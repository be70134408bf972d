"""`graphdistill record`: run a teacher graph over inputs and record every run into a trace store.

Inputs are a folder of images (each asked ``--question``) or a JSONL of rows ``{image, question[,
provenance]}``. ``--samples K`` records K samples per input (sample i gets ``configurable.gd_sample_index=i``,
``gd_sampling=i>0`` and a stable ``gd_seed``; all K share the input's content hash as group id). ``--tta``
gives deterministic graphs variety: sample i>0 sees the image flipped / scaled, and the trace says so in
``metadata["tta"]``. ``--resume`` skips what the store already holds; ``--workers N`` runs N processes that
each load the graph once and write into the one store. A bad input becomes a failed trace and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from graphdistill.commands._common import CommandError, console, print_json

log = logging.getLogger(__name__)

DEFAULT_QUESTION = "What is in this picture?"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
TTA_CHOICES = ("flip", "scale")
TTA_SCALE = 0.8


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("record", help="run a teacher graph over inputs and record traces into a store")
    p.add_argument(
        "--graph", default=None, help="graph spec module:attr or file.py:attr (default: visual_rag)"
    )
    p.add_argument("--inputs", required=True, help="a folder of images or a JSONL of {image, question} rows")
    p.add_argument("--store", required=True, help="trace store folder (created if missing)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="question for a folder of images")
    p.add_argument("--samples", type=int, default=1, help="teacher samples per input (default 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--resume", action="store_true", help="skip (input, sample) pairs already in the store")
    p.add_argument("--tta", default="", help="test-time augmentations for samples > 0: flip,scale")
    p.add_argument("--batch-size", type=int, default=1, help="inputs per graph.batch call (default 1)")
    p.add_argument("--json", action="store_true", help="print {recorded, failed, skipped, seconds}")
    p.set_defaults(func=_record)


# --------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------


def read_inputs(
    path: str | os.PathLike[str], question: str = DEFAULT_QUESTION
) -> tuple[list[dict[str, Any]], int]:
    """The input rows ``{image: abs path, question, provenance}`` and how many JSONL lines were unusable."""
    src = Path(path)
    if not src.exists():
        raise CommandError(f"--inputs {src}: no such file or folder")
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CommandError(
                f"--inputs {src}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return [{"image": str(p.resolve()), "question": question, "provenance": {}} for p in files], 0
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(src, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:  # one bad row, not a bad file: the others still count
                log.warning("--inputs %s line %d skipped: not UTF-8 text (%s)", src, lineno, exc.reason)
                bad += 1
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    raise ValueError("a row must be an object with an 'image' path")
                if "question" in row and not str(row["question"] or "").strip():
                    raise ValueError("its question is empty (leave the key out for the default question)")
            except ValueError as exc:
                log.warning("--inputs %s line %d skipped: %s", src, lineno, exc)
                bad += 1
                continue
            image = Path(row["image"])
            if not image.is_absolute():
                image = src.parent / image
            rows.append(
                {
                    "image": str(image),
                    "question": str(row.get("question") or question),
                    "provenance": row.get("provenance") or {},
                    # human labels ({answer, objects, sources}) ride along to the dataset for eval
                    **({"ground_truth": row["ground_truth"]} if row.get("ground_truth") else {}),
                }
            )
    if not rows and not bad:
        raise CommandError(f"--inputs {src}: no rows")
    return rows, bad


def parse_tta(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in TTA_CHOICES:
            raise CommandError(
                f"--tta {text!r}: unknown transform {t!r} (choose from {', '.join(TTA_CHOICES)})"
            )
    return items


def apply_tta(image: Any, sample_index: int, tta: list[str]) -> tuple[Any, dict[str, Any]]:
    """Sample 0 is the original; sample i > 0 uses transform ``tta[(i - 1) % len(tta)]``."""
    import numpy as np

    h, w = int(image.shape[0]), int(image.shape[1])
    info: dict[str, Any] = {"flip": False, "scale": 1.0, "orig_size": [h, w]}
    if not tta or sample_index == 0:
        return image, info
    kind = tta[(sample_index - 1) % len(tta)]
    if kind == "flip":
        info["flip"] = True
        return np.ascontiguousarray(image[:, ::-1]), info
    from PIL import Image

    size = (max(1, round(w * TTA_SCALE)), max(1, round(h * TTA_SCALE)))
    info["scale"] = TTA_SCALE
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)), info


# --------------------------------------------------------------------------------------------------------
# running (the same code in-process and in each worker process)
# --------------------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def load_graph(spec: str | None) -> Any:
    """The graph ``--graph`` names (``graphdistill.graphs.spec.load_graph``; None -> visual_rag)."""
    from graphdistill.graphs.spec import load_graph as spec_load_graph

    try:
        return spec_load_graph(spec)
    except Exception as exc:
        raise CommandError(f"--graph {spec}: cannot load the graph ({type(exc).__name__}: {exc})") from exc


def _init(spec: str | None, store_root: str) -> None:
    """Load the graph, open the store and start one background recorder, once per process."""
    from graphdistill._env import apply_offline_env
    from graphdistill.datasets.recording import TraceRecorder, graph_identity
    from graphdistill.datasets.store import TraceStore

    apply_offline_env()
    graph = load_graph(spec)
    store = TraceStore(store_root)
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
    tasks: list[dict[str, Any]], *, resume: bool, tta: list[str], flush: bool = True
) -> dict[str, int]:
    """Run one batch of (input row, sample index) tasks through the graph, recording each.

    Returns the counts of traces written since the last call; with ``flush=False`` traces still being
    written in the background are counted by a later call (or :func:`drain`)."""
    from graphdistill.datasets.recording import (
        META_GROUP,
        META_METADATA,
        META_PROVENANCE,
        META_SAMPLE,
        sampling_configurable,
    )
    from graphdistill.images import ImageError, load_image
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
        shown, tta_info = apply_tta(image, i, tta)
        inputs = {"image": shown, "question": row["question"]}
        if resume:
            ih = group if shown is image else recorder.input_hash(inputs)
            if store.has_input(ih, i, graph_hash=gid.hash):
                counts["skipped"] += 1
                continue
        meta: dict[str, Any] = {"source": row["image"]}
        if tta:
            meta["tta"] = tta_info
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
    from graphdistill.datasets.store import DuplicateTraceError

    try:
        store.append(trace, {})
        counts["failed"] += 1
    except DuplicateTraceError:
        counts["skipped"] += 1


def _worker_run(tasks: list[dict[str, Any]], resume: bool, tta: list[str]) -> dict[str, int]:
    return run_tasks(tasks, resume=resume, tta=tta)


# --------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------


def _record(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    for name in ("samples", "workers", "batch_size"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    tta = parse_tta(args.tta)
    rows, bad_rows = read_inputs(args.inputs, args.question)
    tasks = [{"row": r, "sample_index": i} for r in rows for i in range(args.samples)]
    batches = [tasks[i : i + args.batch_size] for i in range(0, len(tasks), args.batch_size)]
    totals = {"recorded": 0, "failed": 0, "skipped": bad_rows}
    start = time.perf_counter()
    con = console(stderr=True)
    progress = Progress(
        TextColumn("[bold]recording"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=con,
        disable=args.json and not con.is_terminal,
    )
    store_root = str(Path(args.store))
    from concurrent.futures.process import BrokenProcessPool

    from graphdistill.datasets.store import StoreError

    try:
        if args.workers == 1:
            _init(args.graph, store_root)  # load errors show before the progress bar
        with progress:
            bar = progress.add_task("record", total=len(tasks), failed=0)

            def done(counts: dict[str, int], n: int) -> None:
                for k, v in counts.items():
                    totals[k] += v
                progress.update(bar, advance=n, failed=totals["failed"])

            if args.workers == 1:
                for batch in batches:  # traces are written in the background while the next batch runs
                    done(run_tasks(batch, resume=args.resume, tta=tta, flush=False), len(batch))
                done(drain(), 0)
                _WORKER["recorder"].close()
            else:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor, as_completed

                # the parent makes the store first so workers never race to create its tables
                from graphdistill.datasets.store import TraceStore

                TraceStore(store_root).close()
                with ProcessPoolExecutor(
                    max_workers=args.workers,
                    mp_context=mp.get_context("spawn"),
                    initializer=_init,
                    initargs=(args.graph, store_root),
                ) as pool:
                    futures = {pool.submit(_worker_run, b, args.resume, tta): len(b) for b in batches}
                    for fut in as_completed(futures):
                        done(fut.result(), futures[fut])
    except BrokenProcessPool as exc:
        raise CommandError(f"a worker process died ({exc}); rerun with --resume to continue") from exc
    except StoreError as exc:
        raise CommandError(f"--store {args.store}: {exc}") from exc
    seconds = time.perf_counter() - start
    summary = {**totals, "seconds": round(seconds, 3)}
    if args.json:
        print_json(summary)
    else:
        con.print(
            f"recorded {totals['recorded']}, failed {totals['failed']}, skipped {totals['skipped']} "
            f"in {seconds:.1f}s -> {args.store}"
        )
    return 0
