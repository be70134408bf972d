"""`graphdistill record`: run a teacher graph over inputs and record every run into a trace store.

Parses the arguments, shows progress and calls :func:`graphdistill.recording.batch.record_inputs`, which
holds the whole job (K samples, test-time augmentation, resume, worker processes).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from graphdistill.commands._common import CommandError, add_kb_flags, console, print_json
from graphdistill.recording.batch import DEFAULT_QUESTION


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
    add_kb_flags(p)
    p.set_defaults(func=_record)


def _record(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from graphdistill.recording.batch import record_inputs
    from graphdistill.recording.tta import parse_tta

    for name in ("samples", "workers", "batch_size"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    kb = {k: v for k, v in {"kb_path": args.kb_path, "kb_url": args.kb_url}.items() if v is not None}
    if kb and args.graph is not None:
        flag = "--kb-url" if "kb_url" in kb else "--kb-path"
        raise CommandError(
            f"{flag} places the reference graph's knowledge base; --graph {args.graph} brings its own"
        )
    if not Path(args.inputs).exists():
        raise CommandError(f"--inputs {args.inputs}: no such file or folder")
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
    bar: list[Any] = []

    def start(total: int) -> None:  # after the graph loaded: its errors show before the bar
        progress.start()
        bar.append(progress.add_task("record", total=total, failed=0))

    def advance(n: int, totals: dict[str, int]) -> None:
        progress.update(bar[0], advance=n, failed=totals["failed"])

    try:
        summary = record_inputs(
            args.inputs,
            args.store,
            graph=args.graph,
            graph_options=kb,
            question=args.question,
            samples=args.samples,
            tta=parse_tta(args.tta),
            resume=args.resume,
            workers=args.workers,
            batch_size=args.batch_size,
            on_start=start,
            progress=advance,
        )
    finally:
        if bar:
            progress.stop()
    if args.json:
        print_json(summary)
    else:
        con.print(
            f"recorded {summary['recorded']}, failed {summary['failed']}, skipped {summary['skipped']} "
            f"in {summary['seconds']:.1f}s -> {args.store}"
        )
    return 0
