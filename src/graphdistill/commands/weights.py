"""`graphdistill weights fetch|verify|path|list`."""

from __future__ import annotations

import argparse

from graphdistill.commands._common import console, print_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("weights", help="fetch, verify and locate the pinned default weights")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION")
    wsub.required = True
    f = wsub.add_parser("fetch", help="download, verify and cache weights (all by default)")
    f.add_argument("names", nargs="*", help="registry names (default: all)")
    f.add_argument("--force", action="store_true", help="refetch even when a verified copy is cached")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_fetch)
    v = wsub.add_parser("verify", help="check the sha256 of every cached weight")
    v.add_argument("names", nargs="*")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_verify)
    pa = wsub.add_parser("path", help="print the verified local path of one weight")
    pa.add_argument("name")
    pa.set_defaults(func=_path)
    ls = wsub.add_parser("list", help="the registry table")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)


def _fetch(args: argparse.Namespace) -> int:
    from graphdistill import weights

    con = console(stderr=True)
    with con.status("fetching weights") as status:

        def progress(msg: str) -> None:
            status.update(msg)
            con.print(f"  {msg}")

        results = weights.fetch(args.names or None, progress=progress, force=args.force)
    if args.json:
        print_json(results)
    bad = [r["name"] for r in results if not r["sha256_ok"]]
    return 1 if bad else 0


def _verify(args: argparse.Namespace) -> int:
    from graphdistill import weights

    results = [weights.verify(n) for n in (args.names or list(weights.REGISTRY))]
    if args.json:
        print_json(results)
    else:
        con = console()
        for r in results:
            mark = (
                "[green]ok[/]"
                if r["sha256_ok"]
                else ("[red]MISMATCH[/]" if r["present"] else "[yellow]missing[/]")
            )
            con.print(f"{r['name']:<24} {mark:<20} {r['path']}")
    return 0 if all(r["sha256_ok"] for r in results) else 1


def _path(args: argparse.Namespace) -> int:
    from graphdistill import weights

    print(weights.path(args.name, fetch_missing=False))
    return 0


def _list(args: argparse.Namespace) -> int:
    from graphdistill import weights

    table = weights.registry_table()
    if args.json:
        print_json(table)
        return 0
    from rich.table import Table

    t = Table("name", "role", "source", "file", "licence")
    for r in table:
        t.add_row(
            str(r["name"]),
            str(r["role"]),
            f"{r['package']}=={r['version']}",
            str(r["member"]),
            str(r["licence"]),
        )
    console().print(t)
    return 0
