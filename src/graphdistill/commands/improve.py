"""`graphdistill improve RUN --pool INPUTS --rounds R --budget N --out DIR`: rounds of active learning or
self-training from a trained run (improve.rounds.improve)."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphdistill.commands._common import CommandError, console, print_json, stage_progress


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from graphdistill.improve.rounds import ARMS

    p = sub.add_parser(
        "improve",
        help="rounds: label the pool inputs the student is least sure of, retrain, evaluate (or self-train)",
        description=(
            "From the trained RUN, run R rounds: the student answers every unlabelled input of --pool several "
            "ways (the photo, its flip and scale views, the question reworded) and scores its own disagreement; "
            "the arm picks N inputs (active: the most unsure; random: a seeded draw; self-filtered / "
            "self-unfiltered: the surest, labelled by the student itself, with or without the filter); the "
            "teacher graph records them (K samples each) into OUT's own copy of RUN's trace store; the store is "
            "filtered, the student retrained from the last round's weights and evaluated on the held-out rows. "
            "Every round is a loadable run under OUT/round-NN/run; OUT/rounds.json holds each round's fidelity, "
            "answer diversity and class coverage. Rerun the same command to go on after a stop."
        ),
    )
    p.add_argument("run", help="the trained run folder to start from (its dataset's trace store is copied)")
    p.add_argument("--pool", required=True, help="unlabelled inputs: a JSONL/Parquet inputs file or a folder")
    p.add_argument("--out", required=True, help="the folder for this arm's store, rounds and rounds.json")
    p.add_argument("--arm", choices=ARMS, default="active", help="how inputs are picked and labelled")
    p.add_argument("--rounds", type=int, default=3, help="rounds to run (default 3)")
    p.add_argument("--budget", type=int, default=8, help="inputs labelled per round (default 8)")
    p.add_argument("--samples", type=int, default=3, help="teacher samples per input (default 3)")
    p.add_argument(
        "--teacher-tta",
        default="",
        help="what the teacher's samples > 0 see, as `record --tta` (flip,scale: as the demo records)",
    )
    p.add_argument("--epochs", type=int, default=10, help="warm-start training epochs per round (default 10)")
    p.add_argument("--max-minutes", type=float, default=None, help="cap on each round's training time")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.5,
        help="self-filtered: the answer vote share across the views an input needs (default 0.5)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--graph", default=None, help="teacher graph spec module:attr or file.py:attr (default: visual_rag)"
    )
    p.add_argument(
        "--teacher-store",
        default=None,
        metavar="STORE",
        help="read the teacher's labels from a store that already recorded the pool (a study's oracle)",
    )
    p.add_argument(
        "--no-embedder",
        action="store_true",
        help="vote and score answers by their normalised text only (no MiniLM)",
    )
    p.add_argument("--device", default="cpu", help="training device (default cpu)")
    p.add_argument("--json", action="store_true", help="print the rounds file as JSON")
    p.set_defaults(func=_improve)


def _improve(args: argparse.Namespace) -> int:
    from graphdistill.improve.labels import Labeller, StoreLabeller
    from graphdistill.improve.rounds import ImproveConfig, ImproveError, improve
    from graphdistill.recording.tta import parse_tta

    cfg = ImproveConfig(
        arm=args.arm,
        teacher_tta=tuple(parse_tta(args.teacher_tta)),  # an unknown name: one line naming the choices
        rounds=args.rounds,
        budget=args.budget,
        samples=args.samples,
        epochs=args.epochs,
        max_minutes=args.max_minutes,
        min_agreement=args.min_agreement,
        seed=args.seed,
    )
    try:
        cfg.check()
    except ImproveError as exc:
        if exc.field is None:
            raise CommandError(str(exc)) from exc
        raise CommandError(f"--{exc.field.replace('_', '-')} {exc.value}: {exc.reason}") from exc
    labeller: Labeller | None = None
    if args.teacher_store:
        if not (Path(args.teacher_store) / "traces.sqlite").exists():
            raise CommandError(f"--teacher-store {args.teacher_store}: not a trace store (no traces.sqlite)")
        labeller = StoreLabeller(Path(args.teacher_store), samples=args.samples)
    if not (Path(args.run) / "model.safetensors").is_file():
        raise CommandError(f"RUN {args.run}: not a trained run folder (no model.safetensors)")
    if not Path(args.pool).exists():
        raise CommandError(f"--pool {args.pool}: no such file or folder")
    embedder = None
    if not args.no_embedder:
        from graphdistill.filter.vote import default_embedder

        embedder = default_embedder()
    con = console(stderr=True)
    with stage_progress(con) as tick:
        state = improve(
            args.run,
            args.pool,
            args.out,
            cfg,
            labeller=labeller,
            graph=args.graph,
            embedder=embedder,
            device=args.device,
            progress=tick,
        )
    if args.json:
        print_json(state)
        return 0
    out = console()
    for r in state["rounds"]:
        f = r["fidelity"]
        out.print(
            f"round {r['round']}: {r['labelled_inputs']} inputs labelled, {r['teacher_calls']} teacher calls, "
            f"{r['train_rows']} train rows — answer F1 {_fmt(f.get('answer_f1'))}, box mAP@0.5 "
            f"{_fmt(f.get('box_map50'))}, mask mIoU {_fmt(f.get('mask_miou'))}, sources recall "
            f"{_fmt(f.get('sources_recall'))}; answers distinct-2 {_fmt(r['diversity'].get('distinct_2'))}"
        )
    out.print(f"rounds written to {Path(args.out) / 'rounds.json'}")
    return 0


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"
