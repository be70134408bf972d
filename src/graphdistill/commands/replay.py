"""`graphdistill replay STORE`: counterfactual replays of recorded traces (recording.replay_plan.replay_store)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from graphdistill.commands._common import CommandError, console, print_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "replay",
        help="re-run recorded traces from a node on edited detections (relabelled, dropped, duplicated)",
        description=(
            "Plan N counterfactual replays over the graph's traces in STORE (relabels spread over every class "
            "of the detector's label set, drops, duplicates), run only the nodes after --from-node on each "
            "edited state, K samples each, and record them into STORE as traces of the same graph. "
            "Held-out inputs are never replayed; replays already in STORE are skipped."
        ),
    )
    p.add_argument("store", help="the trace store folder the traces were recorded into")
    p.add_argument(
        "--graph", default=None, help="graph spec module:attr or file.py:attr (default: visual_rag)"
    )
    p.add_argument("--n", type=int, required=True, help="how many replays to plan")
    p.add_argument("--samples", type=int, default=1, help="teacher samples per replay (default 1)")
    p.add_argument("--seed", type=int, default=0, help="planner seed (default 0)")
    p.add_argument("--from-node", default="retrieve", help="node the replays start from (default retrieve)")
    p.add_argument(
        "--edits",
        default="relabel,drop,duplicate",
        help="edit kinds to plan, comma-separated (default relabel,drop,duplicate)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="replays per graph.batch call (default 16)")
    p.add_argument(
        "--json", action="store_true", help="print {recorded, skipped, failed, refused, groups, seconds}"
    )
    p.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from graphdistill.recording.batch import load_graph
    from graphdistill.recording.replay_plan import replay_store
    from graphdistill.store.trace_store import StoreError, TraceStore

    for name in ("n", "samples", "batch_size"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (Path(args.store) / "traces.sqlite").exists():
        raise CommandError(f"STORE {args.store}: not a trace store (no traces.sqlite there)")
    edits = [e.strip() for e in args.edits.split(",") if e.strip()]
    graph = load_graph(args.graph)
    con = console(stderr=True)
    progress = Progress(
        TextColumn("[bold]replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=con,
        disable=args.json and not con.is_terminal,
    )
    bar: list[Any] = []  # the bar appears with the first batch, after every check has passed

    def tick(done: int, total: int) -> None:
        if not bar:
            progress.start()
            bar.append(progress.add_task("replay", total=total))
        progress.update(bar[0], completed=done, total=total)

    try:
        with TraceStore(args.store) as store:
            result = replay_store(
                graph,
                store,
                n=args.n,
                samples=args.samples,
                seed=args.seed,
                from_node=args.from_node,
                edits=edits,
                batch_size=args.batch_size,
                progress=tick,
            )
    except StoreError as exc:
        raise CommandError(f"STORE {args.store}: {exc}") from exc
    finally:
        if bar:
            progress.stop()
    summary = result.summary()
    if args.json:
        print_json(summary)
    else:
        con.print(
            f"replayed {len(result.groups)} edits: recorded {result.recorded}, skipped {result.skipped} "
            f"(already stored), failed {result.failed}, parents refused {len(result.refused)} "
            f"in {result.seconds:.1f}s -> {args.store}"
        )
    return 0
