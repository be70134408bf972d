"""`graphdistill report RUN [RUN ...] [--out report.html] [--markdown]`: one self-contained HTML report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from graphdistill.commands._common import CommandError, console


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report",
        help="one self-contained HTML report (headline, tables, plots, gallery) of evaluated student runs",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="student run folders (the first one is the headline)"
    )
    p.add_argument("--out", default="report.html", help="HTML file to write (report.html)")
    p.add_argument(
        "--scaling", default=None, metavar="JSON", help="scaling study (benchmarks/results/scaling.json)"
    )
    p.add_argument(
        "--tta",
        action="append",
        default=[],
        metavar="JSON",
        help="test-time compute study: fidelity against ms per setting (benchmarks/results/tta.json, "
        "benchmarks/results/depth.json); repeat it to draw several in one picture",
    )
    p.add_argument(
        "--rounds",
        action="append",
        default=[],
        metavar="JSON",
        help="rounds study: fidelity and answer diversity per round and arm (benchmarks/results/rounds.json, "
        "or an `improve` OUT/rounds.json); repeat it for several arms",
    )
    p.add_argument("--gallery", type=int, default=8, help="held-out photos in the gallery (8)")
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset to evaluate on when a run has no eval.json yet (default: the dataset in RUN/meta.json)",
    )
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="split for a missing eval"
    )
    p.add_argument(
        "--no-teacher-timing",
        dest="teacher_timing",
        action="store_false",
        help="when a run must be evaluated first: do not time the teacher graph",
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print a Markdown summary of the first run and write RUN/summary.md (no HTML)",
    )
    p.set_defaults(func=_report)


def _dataset_of(run: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    meta = run / "meta.json"
    if meta.exists():
        try:
            data = json.loads(meta.read_text())
        except ValueError as exc:
            raise CommandError(f"{meta}: not valid JSON ({exc})") from exc
        ds = data.get("dataset")
        if isinstance(ds, dict):
            ds = ds.get("path")
        if ds:
            return str(ds)
    raise CommandError(f"{run} has no eval.json and no dataset in meta.json: pass --dataset")


def _ensure_eval(run: Path, args: argparse.Namespace) -> None:
    if (run / "eval.json").exists():
        return
    from graphdistill.commands._common import stage_progress
    from graphdistill.eval.evaluate import evaluate_run
    from graphdistill.eval.result import write_eval

    con = console(stderr=True)
    con.print(f"{run} has no eval.json yet: evaluating it first")
    dataset = _dataset_of(run, args.dataset)
    with stage_progress(con) as tick:
        result = evaluate_run(
            run,
            dataset,
            split=args.split,
            teacher_timing=args.teacher_timing,
            progress=tick,
            status=lambda msg: con.print(f"[dim]{msg}[/]"),
        )
    con.print(f"wrote {write_eval(run, result)}")


def _report(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not run.is_dir():
            raise CommandError(f"run folder {run} does not exist")
        if not (run / "model.safetensors").exists():
            raise CommandError(f"{run} is not a student run: {run / 'model.safetensors'} is missing")
    for run in runs:
        _ensure_eval(run, args)
    if args.markdown:
        from graphdistill.eval.result import read_eval
        from graphdistill.eval.summary import markdown_summary

        text = markdown_summary(read_eval(runs[0]))
        (runs[0] / "summary.md").write_text(text)
        print(text, end="")
        console(stderr=True).print(f"wrote {runs[0] / 'summary.md'}")
        return 0
    scaling = _read_json("scaling", args.scaling)
    tta = [_read_json("tta", path) for path in args.tta] or None
    rounds = [_read_json("rounds", path) for path in args.rounds] or None
    from rich.progress import Progress

    from graphdistill.eval.report import build_report

    with Progress(console=console(stderr=True)) as bar:
        task = bar.add_task("drawing the gallery", total=max(args.gallery, 1))

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        try:
            path = build_report(
                runs,
                args.out,
                scaling=scaling,
                tta=tta,
                rounds=rounds,
                gallery_n=args.gallery,
                progress=progress,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
    console(stderr=True).print(f"wrote {path}")
    return 0


def _read_json(flag: str, path: str | None) -> Any:
    """``--scaling`` / ``--tta``'s file, or None; a clear error naming the flag when it cannot be read."""
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CommandError(f"--{flag} file {path}: not a readable JSON file ({exc})") from exc
