"""`graphdistill record`: run a teacher graph over inputs and record every run into a trace store.

Parses the arguments, shows progress and calls :func:`graphdistill.recording.batch.record_inputs`, which
holds the whole job (K samples, test-time augmentation, resume, worker processes, or with ``--engine ray``
a Ray actor pool).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from graphdistill.commands._common import CommandError, add_kb_flags, console, print_json, stage_progress
from graphdistill.recording.batch import DEFAULT_QUESTION


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("record", help="run a teacher graph over inputs and record traces into a store")
    p.add_argument(
        "--graph", default=None, help="graph spec module:attr or file.py:attr (default: visual_rag)"
    )
    p.add_argument(
        "--inputs",
        required=True,
        help="a folder of images, a JSONL of {image, question} rows or a Parquet table with those columns",
    )
    p.add_argument("--store", required=True, help="trace store folder (created if missing)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="question for a folder of images")
    p.add_argument("--samples", type=int, default=1, help="teacher samples per input (default 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--resume", action="store_true", help="skip (input, sample) pairs already in the store")
    p.add_argument("--tta", default="", help="test-time augmentations for samples > 0: flip,scale")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="runs per graph.batch call (ray: per actor call) (default 1)",
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this machine (--workers processes); ray: an actor pool on a Ray cluster (default local)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="ray: the cluster `ray start --head` printed (default: start one here)",
    )
    p.add_argument(
        "--actors", type=int, default=None, help="ray: actors, each loads the graph once (default 1)"
    )
    p.add_argument(
        "--gpus-per-actor", type=float, default=None, help="ray: GPUs each actor reserves (default 0)"
    )
    p.add_argument("--json", action="store_true", help="print {recorded, failed, skipped, seconds}")
    add_kb_flags(p)
    p.set_defaults(func=_record)


def _record(args: argparse.Namespace) -> int:
    from graphdistill.recording.batch import record_inputs
    from graphdistill.recording.tta import parse_tta

    for name in ("samples", "workers", "batch_size", "actors"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.gpus_per_actor is not None and args.gpus_per_actor < 0:
        raise CommandError(f"--gpus-per-actor must be >= 0, got {args.gpus_per_actor}")
    ray_only = [f for f in ("address", "actors", "gpus_per_actor") if getattr(args, f) is not None]
    if args.engine == "local" and ray_only:
        raise CommandError(f"--{ray_only[0].replace('_', '-')} needs --engine ray")
    if args.engine == "ray" and args.workers != 1:
        raise CommandError("--workers is for --engine local; on ray the pool size is --actors")
    kb = {k: v for k, v in {"kb_path": args.kb_path, "kb_url": args.kb_url}.items() if v is not None}
    if kb and args.graph is not None:
        flag = "--kb-url" if "kb_url" in kb else "--kb-path"
        raise CommandError(
            f"{flag} places the reference graph's knowledge base; --graph {args.graph} brings its own"
        )
    if not Path(args.inputs).exists():
        raise CommandError(f"--inputs {args.inputs}: no such file or folder")
    common: dict[str, Any] = {
        "graph": args.graph,
        "question": args.question,
        "samples": args.samples,
        "tta": parse_tta(args.tta),
        "resume": args.resume,
        "batch_size": args.batch_size,
    }
    con = console(stderr=True)
    with stage_progress(con, transient=args.json) as tick:
        total = [0, 0]  # runs to come, runs done

        def start(n: int) -> None:  # after the graph loaded (local) or the cluster is up (ray)
            total[0] = n
            tick("recording", 0, n)

        def advance(n: int, totals: dict[str, int]) -> None:
            total[1] += n
            tick("recording", total[1], total[0])

        summary = record_inputs(
            args.inputs,
            args.store,
            engine=args.engine,
            graph_options=kb,
            workers=args.workers,
            actors=args.actors or 1,
            gpus_per_actor=args.gpus_per_actor or 0.0,
            address=args.address,
            on_start=start,
            progress=advance,
            **common,
        )
    if args.json:
        print_json(summary)
    else:
        con.print(
            f"recorded {summary['recorded']}, failed {summary['failed']}, skipped {summary['skipped']} "
            f"in {summary['seconds']:.1f}s -> {args.store}"
        )
    return 0
