"""`graphdistill ui [STORE] [--dataset DS] [--run RUN] [--bundle BUNDLE] [--port P] [--host H --allow-remote]`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "ui",
        help="a local web app: browse traces, the filter's decisions, teacher vs student, try the student",
        description="Open a local web app over a trace store (read-only). STORE may be a demo's output "
        "folder: its store, dataset, run and ONNX bundle are found there.",
    )
    p.add_argument(
        "store",
        nargs="?",
        default="demo-out",
        help="trace store folder, or a demo's output folder (default: ./demo-out, what make demo writes)",
    )
    p.add_argument("--dataset", default=None, help="the filtered dataset (the Filter page)")
    p.add_argument("--run", default=None, help="an evaluated run folder (the Fidelity page)")
    p.add_argument(
        "--bundle", default=None, help="an ONNX bundle (the Try-it page; the student in the browser)"
    )
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)"
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other machines can reach (no authentication)",
    )
    p.set_defaults(func=_ui)


def _ui(args: argparse.Namespace) -> int:
    from graphdistill.commands._common import CommandError, console
    from graphdistill.ui import open_sources, serve
    from graphdistill.ui.serve import check_host

    if not 0 < args.port < 65536:
        raise CommandError(f"--port must be 1..65535, got {args.port}")
    warning = check_host(args.host, args.allow_remote)
    src = open_sources(args.store, dataset=args.dataset, run=args.run, bundle=args.bundle)
    con = console()
    if warning:
        con.print(f"[bold red]warning:[/] {warning}")
    for part, where in src.describe().items():
        if where is not None and part != "bundle_quantize":
            con.print(f"{part:>8}: {where}")
    con.print(f"graphdistill ui on [bold]http://{args.host}:{args.port}/[/] (Ctrl+C to stop)")
    try:
        serve(src, host=args.host, port=args.port, allow_remote=args.allow_remote)
    finally:
        src.close()
    return 0
