"""`graphdistill demo [--quick]`: the main job, end to end, on built-in real photos."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the main job on the default models and the built-in photos")
    p.add_argument("--quick", action="store_true", help="a small run (minutes) that touches every stage")
    p.add_argument("--out", default="demo-out", help="working folder (resumable; default: ./demo-out)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--inputs", type=int, help="number of inputs to make from the built-in photos")
    p.add_argument("--samples", type=int, help="teacher samples per input (for the vote)")
    p.add_argument("--minutes", type=float, help="student training budget in minutes")
    p.add_argument("--replays", type=int, help="counterfactual replays of the recorded inputs (0: none)")
    p.add_argument("--formats", help="export formats, comma-separated (executorch,onnx)")
    p.add_argument("--json", action="store_true", help="print the headline as JSON")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from graphdistill.demo import run_demo

    return run_demo(args)
