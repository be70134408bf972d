"""The one `graphdistill` entry point. Each command group lives in `graphdistill.commands.<group>` and
registers its subcommands here; command modules import heavy libraries only inside their handlers."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# (module under graphdistill.commands) in the order `--help` lists them
COMMAND_MODULES = [
    "weights",
    "doctor",
    "demo",
    "kb",
    "run",
    "record",
    "replay",
    "traces",
    "inputs",
    "filter",
    "train",
    "predict",
    "eval",
    "improve",
    "report",
    "export",
    "run_bundle",
    "ui",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphdistill",
        description="Distil a multimodal RAG teacher graph into one small student model that runs on a phone.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"graphdistill.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from graphdistill._env import apply_offline_env

    apply_offline_env()
    from graphdistill.errors import GraphdistillError

    try:
        rc = args.func(args)
    except GraphdistillError as exc:  # CommandError and every stage's own error: one line, exit code 2
        print(f"graphdistill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
