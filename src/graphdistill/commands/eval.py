"""`graphdistill eval RUN --dataset DATASET`: fidelity to the teacher and cost against it; writes RUN/eval.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphdistill._fs import is_url
from graphdistill.commands._common import (
    CommandError,
    add_depth_flag,
    add_tta_flags,
    console,
    depth_arg,
    parse_tta_arg,
    print_json,
    stage_progress,
    tta_below_arg,
)

if TYPE_CHECKING:
    from graphdistill.eval.result import EvalResult


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "eval",
        help="score a student run against the teacher (fidelity) and time both (cost); writes RUN/eval.json",
    )
    p.add_argument("run", help="student run folder (RUN/model.safetensors, RUN/meta.json)")
    p.add_argument("--dataset", required=True, help="filtered dataset folder (DATASET/manifest.json)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score (test)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--no-teacher-timing",
        dest="teacher_timing",
        action="store_false",
        help="do not load and time the teacher graph (teacher_ms is then null, sizes assume default weights)",
    )
    p.add_argument(
        "--teacher-n", type=int, default=3, help="images of the split both models are timed on (3)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed passes of the student over those images (5)")
    p.add_argument(
        "--teacher-repeats",
        type=int,
        default=1,
        help="timed passes of the teacher graph over those images (1)",
    )
    p.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="PATH",
        help="also time an exported bundle (repeatable; `graphdistill export` writes them)",
    )
    p.add_argument(
        "--bundle-threads",
        default="1,2",
        metavar="N[,N...]",
        help="runtime threads each bundle is timed with; its ms is the fastest (default 1,2)",
    )
    p.add_argument(
        "--graph", default=None, help="teacher graph spec (module:attr or file.py:attr); default visual_rag"
    )
    p.add_argument("--val", action="store_true", help="also score the val split (fidelity_val in eval.json)")
    p.add_argument(
        "--semantic-threshold",
        type=float,
        default=0.8,
        help="MiniLM cosine at or above which two answers mean the same (0.8)",
    )
    p.add_argument(
        "--no-semantic", dest="semantic", action="store_false", help="skip the MiniLM answer agreement"
    )
    add_tta_flags(
        p,
        "test-time augmentation (flip, scale, flip,scale or none) for the PyTorch student and every "
        "bundle (default: the student without, each bundle as its manifest says)",
    )
    add_depth_flag(
        p,
        "iterations of the student's recurrent block for the PyTorch student and every bundle (default: 1 for "
        "the student, each bundle its manifest's default)",
    )
    add_ci_arguments(p)
    p.set_defaults(func=_eval)


def add_ci_arguments(p: argparse.ArgumentParser) -> None:
    from graphdistill.eval.metrics import DEFAULT_RESAMPLES

    p.add_argument(
        "--ci-resamples",
        type=int,
        default=DEFAULT_RESAMPLES,
        metavar="N",
        help=f"bootstrap resamples (photos, then their rows) for each 95 %% interval; 0: none ({DEFAULT_RESAMPLES})",
    )
    p.add_argument("--ci-seed", type=int, default=0, help="seed of the bootstrap resamples (0)")


def run_eval(args: argparse.Namespace) -> EvalResult:
    """Shared with `graphdistill report` (which evaluates a run that has no eval.json yet)."""
    from graphdistill.eval.evaluate import evaluate_run
    from graphdistill.eval.result import write_eval

    run = Path(args.run)
    if not run.is_dir():
        raise CommandError(f"run folder {run} does not exist")
    if not is_url(args.dataset) and not Path(args.dataset).is_dir():  # a URL is checked when it is opened
        raise CommandError(f"dataset folder {args.dataset} does not exist")
    if min(args.teacher_n, args.repeats, args.teacher_repeats) < 1:
        raise CommandError("--teacher-n, --repeats and --teacher-repeats must be at least 1")
    if args.ci_resamples < 0:
        raise CommandError(f"--ci-resamples {args.ci_resamples}: must be >= 0")
    bundle_threads = _threads(args.bundle_threads)
    con = console(stderr=True)
    with stage_progress(con) as progress:

        def status(msg: str) -> None:
            con.print(f"[dim]{msg}[/]")

        try:
            result = evaluate_run(
                run,
                args.dataset,
                split=args.split,
                teacher_timing=args.teacher_timing,
                teacher_n=args.teacher_n,
                student_repeats=args.repeats,
                teacher_repeats=args.teacher_repeats,
                bundles=args.bundle,
                bundle_threads=bundle_threads,
                val=args.val,
                semantic_threshold=args.semantic_threshold,
                semantic=args.semantic,
                graph_spec=args.graph,
                ci_resamples=args.ci_resamples,
                ci_seed=args.ci_seed,
                tta=None if args.tta is None else parse_tta_arg(args.tta),
                tta_below=tta_below_arg(args.tta_below),
                depth=depth_arg(args.depth),
                progress=progress,
                status=status,
            )
        except FileNotFoundError as exc:  # EvalError, a GraphdistillError, reaches cli.main as it is
            raise CommandError(str(exc)) from exc
    path = write_eval(run, result)
    con.print(f"wrote {path}")
    return result


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if not pct else f"{100 * v:.1f} %"
    return str(v)


def _eval(args: argparse.Namespace) -> int:
    result = run_eval(args)
    if args.json:
        print_json({k: v for k, v in result.items() if k != "rows"})
        return 0
    from rich.table import Table

    from graphdistill.eval.metrics import FIDELITY_KEYS
    from graphdistill.eval.summary import fmt_ci

    t = Table(
        "fidelity (student vs teacher)",
        "value [95 % interval]",
        title=f"{result['run']} on {result['split']} (n={result['n']}, {result.get('photos', '?')} photos)",
    )
    ci = result.get("fidelity_ci") or {}
    for k in FIDELITY_KEYS:
        t.add_row(k, fmt_ci(result["fidelity"].get(k), ci.get(k)))
    c = result["cost"]
    t.add_row("teacher ms / query", _fmt(c.get("teacher_ms")))
    t.add_row("student ms / query", _fmt(c.get("student_ms")))
    t.add_row("speedup", _fmt(c.get("speedup")))
    t.add_row("teacher bytes", _fmt(c.get("teacher_bytes")))
    t.add_row("student bytes", _fmt(c.get("student_bytes")))
    t.add_row("size ratio", _fmt(c.get("size_ratio")))
    console().print(t)
    return 0


def _threads(text: str) -> list[int]:
    try:
        threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or any(t < 1 for t in threads):
        raise CommandError(
            f"--bundle-threads {text!r}: expected positive integers separated by commas, e.g. 1,2"
        )
    return threads
