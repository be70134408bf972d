"""The main job: what `make demo` runs. Each stage is skipped when its outputs are up to date."""

from __future__ import annotations

import argparse

from graphdistill.commands._common import console, print_json


def run_demo(args: argparse.Namespace) -> int:
    from graphdistill import weights

    con = console(stderr=True)
    con.rule("graphdistill demo")
    with con.status("weights"):
        results = weights.fetch(progress=lambda m: con.print(f"  {m}"))
    headline = {"weights_ok": all(r["sha256_ok"] for r in results)}
    if args.json:
        print_json(headline)
    return 0 if headline["weights_ok"] else 1
