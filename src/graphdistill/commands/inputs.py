"""`graphdistill inputs make`: multiply a few real photos into many inputs (augmentations, copy-paste
composites cut out with the teacher's own masks), each with a question, as an inputs JSONL."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphdistill.commands._common import CommandError, console, print_json, stage_progress


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("inputs", help="make inputs (image + question) from a few real photos")
    isub = p.add_subparsers(dest="inputs_command", metavar="ACTION")
    isub.required = True
    m = isub.add_parser("make", help="augment and composite photos into N inputs (JSONL + PNGs)")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_dir", default=None, help="a folder of your photos")
    src.add_argument("--builtin", action="store_true", help="the built-in real photos")
    m.add_argument("--n", type=int, required=True, help="how many training inputs to make")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="the inputs JSONL to write (images go to <out>_images/)")
    m.add_argument(
        "--holdout",
        action="extend",
        nargs="+",
        default=None,
        metavar="ID",
        help="photo ids held out of training (default for --builtin: the built-in held-out photos)",
    )
    m.add_argument(
        "--heldout-questions",
        type=int,
        default=3,
        help="different questions asked about each held-out photo (evaluation rows; default 3)",
    )
    m.add_argument("--no-composites", action="store_true", help="augment only (no teacher models run)")
    m.add_argument("--json", action="store_true", help="print a summary as JSON")
    m.set_defaults(func=_make)


def _make(args: argparse.Namespace) -> int:

    from graphdistill.recording import inputs as inp

    if args.n < 0:
        raise CommandError(f"--n {args.n}: must be >= 0")
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise CommandError(f"--out {args.out}: expected a .jsonl path")
    photos = inp.builtin_sources() if args.builtin else inp.folder_sources(args.from_dir)
    heldout = (
        tuple(args.holdout) if args.holdout is not None else (inp.DEFAULT_HELDOUT if args.builtin else ())
    )
    unknown = sorted(set(heldout) - {p.id for p in photos})
    if args.holdout is not None and unknown:
        raise CommandError(
            f"--holdout {', '.join(unknown)}: no such photo; known: {', '.join(p.id for p in photos)}"
        )
    con = console(stderr=True)
    with stage_progress(con, transient=args.json) as tick:
        summary = inp.make_inputs(
            photos,
            n=args.n,
            seed=args.seed,
            out=out,
            heldout=heldout,
            composites=not args.no_composites,
            heldout_questions=args.heldout_questions,
            progress=tick,
        )
    if args.json:
        print_json(summary)
    else:
        console().print(
            f"wrote {summary['rows']} inputs ({summary['heldout']} held-out photos, "
            f"{summary['composites']} composites) to {out}"
        )
    return 0
