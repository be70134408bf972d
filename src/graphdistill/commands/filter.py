"""`graphdistill filter STORE --out DATASET`: vote, check, dedup and split recorded traces into a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphdistill.commands._common import CommandError, console, print_json, stage_progress


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "filter",
        help="turn a trace store into a filtered, split dataset (consensus of the K samples per input)",
    )
    p.add_argument("store", help="trace store folder (from `graphdistill record`)")
    p.add_argument(
        "--out", required=True, help="dataset folder to create: a path or an fsspec URL (memory://, s3://...)"
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        metavar="A",
        help="drop inputs whose answer agreement (fraction of samples in the winning cluster) is below A",
    )
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="NAME",
        help="a user rule (repeatable): NAME (an installed package's 'graphdistill.rules' entry point, or "
        "a rule defined in a module / .py file listed comma-separated in $GRAPHDISTILL_RULES), "
        "package.module:function or path/to/file.py:function",
    )
    p.add_argument("--rule-threshold", type=float, default=None, help="keep when a rule's score >= this")
    p.add_argument(
        "--disable-check", action="append", default=[], metavar="NAME", help="skip a built-in check"
    )
    p.add_argument("--quorum", type=int, default=None, help="samples needed to keep an object/source")
    p.add_argument("--answer-threshold", type=float, default=0.85, help="embedding cosine for same answer")
    p.add_argument("--max-source-distance", type=float, default=1.5)
    p.add_argument(
        "--no-embedder", action="store_true", help="cluster answers by normalised text only (no MiniLM)"
    )
    p.add_argument("--no-dedup", action="store_true", help="keep near-duplicate inputs")
    p.add_argument(
        "--no-filtering",
        action="store_true",
        help="keep every input: every check off, no dedup, no agreement threshold (the samples are still "
        "voted into one row each); the 'filtering off' arm of a study",
    )
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions")
    p.add_argument(
        "--heldout",
        action="extend",
        nargs="+",
        default=None,
        metavar="PHOTO",
        help="photo ids whose inputs all go to test (default: none; inputs whose recipe marks them held out, "
        "as `inputs make --heldout-questions` writes them, go to test anyway)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", action="store_true", help="print {kept, dropped, by_rule, splits, heldout, teacher}"
    )
    p.set_defaults(func=_filter)


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise CommandError(f"--split {text!r}: expected three non-negative fractions like 0.8,0.1,0.1")
    return parts  # type: ignore[return-value,unused-ignore]


def _filter(args: argparse.Namespace) -> int:

    from graphdistill.filter.checks import CHECKS, CheckConfig
    from graphdistill.filter.filtering import FilterConfig, filter_store
    from graphdistill.filter.report import teacher_line
    from graphdistill.filter.rules import load_rule
    from graphdistill.store.trace_store import TraceStore

    root = Path(args.store)
    if not (root / "traces.sqlite").exists():
        raise CommandError(f"{args.store}: not a trace store (no traces.sqlite there)")
    from graphdistill._fs import resolve
    from graphdistill.dataset import DatasetError

    out = resolve(args.out, "--out", DatasetError)  # a local folder or an fsspec URL
    if out.exists("manifest.json"):
        raise CommandError(f"--out {args.out}: already holds a dataset; choose a new folder")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise CommandError(f"--min-agreement {args.min_agreement}: must be between 0 and 1")
    known = {c.name for c in CHECKS}
    unknown = sorted(set(args.disable_check) - known)
    if unknown:
        raise CommandError(
            f"--disable-check {', '.join(unknown)}: built-in checks are {', '.join(sorted(known))}"
        )
    rules = [load_rule(spec, args.rule_threshold) for spec in args.rule]
    if args.no_filtering and (args.min_agreement is not None or args.disable_check or args.no_dedup):
        raise CommandError("--no-filtering already turns off every check, dedup and the agreement threshold")
    config = FilterConfig(
        min_agreement={"answer": args.min_agreement} if args.min_agreement is not None else {},
        rules=rules,
        checks=CheckConfig(
            max_source_distance=args.max_source_distance,
            quorum=args.quorum,
            disabled=set(args.disable_check),
        ),
        answer_threshold=args.answer_threshold,
        quorum=args.quorum,
        dedup=not args.no_dedup,
        fractions=_fractions(args.split),
        seed=args.seed,
    )
    if args.no_filtering:
        config = FilterConfig.unfiltered(
            rules=rules,
            answer_threshold=config.answer_threshold,
            quorum=config.quorum,
            fractions=config.fractions,
            seed=config.seed,
        )
    if args.heldout is not None:
        config.heldout_photos = tuple(args.heldout)
    embedder = None
    if not args.no_embedder:
        from graphdistill.filter.vote import default_embedder

        embedder = default_embedder()

    con = console(stderr=True)
    store = TraceStore(root, readonly=True, check=False)
    with stage_progress(con, transient=args.json) as tick:
        try:
            result = filter_store(
                store,
                args.out,
                config,
                embedder=embedder,
                progress=tick,
                source_store=str(Path(root).resolve()),
            )
        finally:
            store.close()
    summary = result.summary()
    if args.json:
        print_json(
            {
                "kept": summary["kept"],
                "dropped": summary["dropped"],
                "by_rule": summary["by_rule"],
                "splits": summary["splits"],
                "empty_splits": summary["empty_splits"],
                "heldout": summary["heldout"],
                "teacher": summary["teacher"],
                "dataset": str(result.dataset),
            }
        )
    else:
        c = console()
        c.print(
            f"{summary['groups']} inputs: [green]{summary['kept']} kept[/], {summary['dropped']} dropped; "
            f"splits {summary['splits']}"
        )
        for rule, n in summary["by_rule"].items():
            c.print(f"  dropped by {rule}: {n}")
        for split, why in summary["empty_splits"].items():
            c.print(f"  [yellow]split {split!r} is empty[/]: {why}")
        held = summary["heldout"]
        if held["groups"]:
            c.print(
                f"  held out: {held['kept']} kept for evaluation (the test split; "
                f"{held['kept_for_evaluation']} flagged by a check, kept all the same)"
            )
        c.print(f"teacher: {teacher_line(summary['teacher'])}")
        c.print(f"dataset: {result.dataset}   report: {out.name('report', 'report.html')}")
    return 0
