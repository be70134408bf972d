"""`graphdistill traces ls|show|stats|export STORE`: look inside a trace store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from graphdistill.commands._common import CommandError, console, print_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("traces", help="list, show, summarise and export the traces in a store")
    tsub = p.add_subparsers(dest="traces_command", metavar="ACTION")
    tsub.required = True
    ls = tsub.add_parser("ls", help="a table of traces: id, group, sample, status, seconds")
    ls.add_argument("store")
    ls.add_argument("--limit", type=int, default=None, help="at most this many rows")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_ls)
    show = tsub.add_parser("show", help="one trace as JSON (an id prefix is enough)")
    show.add_argument("store")
    show.add_argument("id")
    show.add_argument("--image", default=None, help="also draw its input image and outputs into this PNG")
    show.set_defaults(func=_show)
    st = tsub.add_parser("stats", help="counts, per-node time, failures")
    st.add_argument("store")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_stats)
    ex = tsub.add_parser("export", help="Parquet shards, one row per trace")
    ex.add_argument("store")
    ex.add_argument(
        "--out", required=True, help="output folder: a path or an fsspec URL (s3://bucket/dir, ...)"
    )
    ex.add_argument("--shard-rows", type=int, default=1000)
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=_export)


def _open(path: str) -> Any:
    from graphdistill.store.trace_store import TraceStore

    root = Path(path)
    if not (root / "traces.sqlite").exists():
        raise CommandError(f"{path}: not a trace store (no traces.sqlite there)")
    return TraceStore(root, readonly=True, check=False)


def _ls(args: argparse.Namespace) -> int:
    store = _open(args.store)
    rows = store.rows(limit=args.limit)
    if args.json:
        print_json(rows)
        return 0
    from rich.table import Table

    t = Table()
    t.add_column("id", no_wrap=True)
    t.add_column("group", no_wrap=True)
    t.add_column("sample", justify="right", no_wrap=True, min_width=6)
    t.add_column("status", no_wrap=True, min_width=6)
    t.add_column("seconds", justify="right", no_wrap=True, min_width=7)
    t.add_column("error", no_wrap=True, overflow="ellipsis", max_width=36)
    for r in rows:
        status = "[green]ok[/]" if r["status"] == "ok" else "[red]error[/]"
        err = (r["error"] or "")[:60]
        t.add_row(
            r["id"][:16], r["group_id"][:12], str(r["sample_index"]), status, f"{r['duration_s']:.3f}", err
        )
    console().print(t)
    return 0


def _find(store: Any, prefix: str) -> str:
    ids = store.find_ids(prefix)
    if not ids:
        raise CommandError(f"{store.root}: no trace with id {prefix!r}")
    if len(ids) > 1 and prefix not in ids:
        raise CommandError(f"{store.root}: id {prefix!r} is ambiguous ({', '.join(ids[:5])}, ...)")
    return prefix if prefix in ids else str(ids[0])


def _show(args: argparse.Namespace) -> int:
    store = _open(args.store)
    trace = store.get(_find(store, args.id))
    print(json.dumps(json.loads(trace.to_json()), indent=2))
    if args.image:
        try:
            draw_trace(store, trace, Path(args.image))
        except (ValueError, OSError) as exc:
            raise CommandError(f"--image {args.image}: cannot draw trace {trace.id}: {exc}") from exc
        console(stderr=True).print(f"drew trace {trace.id} into {args.image}")
    return 0


def draw_trace(store: Any, trace: Any, out: Path) -> None:
    """The trace's input image with its output drawn on top (``graphdistill.viz.draw_output``)."""
    from graphdistill.trace import decode_value

    image = None
    for value in trace.inputs.values():
        if isinstance(value, dict) and "__blob__" in value and len(value["__blob__"]["shape"]) == 3:
            image = store.load(value)
            break
    if image is None:
        raise ValueError("the trace has no image input")
    from PIL import Image

    from graphdistill.viz import draw_output

    drawn = draw_output(image, decode_value(trace.output, store.blob), title=f"trace {trace.id[:12]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    (drawn if hasattr(drawn, "save") else Image.fromarray(drawn)).save(out)


def _stats(args: argparse.Namespace) -> int:
    store = _open(args.store)
    stats = store.stats()
    if args.json:
        print_json(stats)
        return 0
    con = console()
    con.print(f"[bold]{stats['store']}[/]")
    con.print(
        f"traces {stats['traces']}  ok {stats['ok']}  error {stats['error']}  groups {stats['groups']}  "
        f"mean {stats['mean_duration_s']:.3f}s  blobs {stats['blobs']['count']} ({stats['blobs']['bytes'] / 1e6:.1f} MB)"
    )
    from rich.table import Table

    t = Table("node", "runs", "mean s", "total s", "errors")
    for name, n in sorted(stats["nodes"].items(), key=lambda kv: -kv[1]["total_s"]):
        t.add_row(name, str(n["count"]), f"{n['mean_s']:.4f}", f"{n['total_s']:.2f}", str(n["errors"]))
    con.print(t)
    for f in stats["failures"]:
        con.print(f"[red]failed[/] {f['id']}: {(f['error'] or '')[:200]}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from graphdistill.store.parquet import export_parquet

    if args.shard_rows < 1:
        raise CommandError(f"--shard-rows must be >= 1, got {args.shard_rows}")
    store = _open(args.store)
    with console(stderr=True).status(f"exporting {store.count()} traces"):
        paths = export_parquet(store, args.out, shard_rows=args.shard_rows)
    if args.json:
        print_json({"shards": [str(p) for p in paths], "traces": store.count()})
    else:
        console().print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0
