"""`graphdistill predict RUN --image PATH --question TEXT`: answer with a trained student."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from graphdistill.commands._common import (
    CommandError,
    add_depth_flag,
    add_tta_flags,
    console,
    depth_arg,
    parse_tta_arg,
    print_json,
    tta_below_arg,
)
from graphdistill.images import IMAGE_SUFFIXES


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("predict", help="answer a question about a photo with a trained student")
    p.add_argument("run", help="the student run folder (from `graphdistill train`)")
    p.add_argument("--image", required=True, help="the photo (any format Pillow reads)")
    p.add_argument("--question", required=True, help="the question about the photo")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="report only objects scoring at least this (default: the student's own threshold, the teacher "
        "detector's; a lower value cannot bring back objects the student dropped)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_tta_flags(
        p,
        "test-time augmentation: also answer these views of the photo and let them vote (flip, scale, "
        "or flip,scale; each view costs a whole query)",
    )
    add_depth_flag(
        p,
        "iterations of the student's recurrent block, 1..its max_depth (a student trained with --max-depth R); "
        "each is one more encoder layer (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object: answer, objects, sources")
    p.add_argument("--out", default=None, help="write the annotated picture here (.png/.jpg)")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from graphdistill.images import load_image

    question = (args.question or "").strip()
    if not question:
        raise CommandError("--question is empty: ask something about the photo")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise CommandError(f"--threshold {args.threshold}: must be between 0 and 1")
    out_path = None
    if args.out is not None:
        out_path = Path(args.out).expanduser()
        if out_path.suffix.lower() not in IMAGE_SUFFIXES:
            raise CommandError(f"--out {args.out}: give a picture file name ending in .png or .jpg")
        if not out_path.parent.is_dir():
            raise CommandError(f"--out {args.out}: the folder {out_path.parent} does not exist")
    tta, tta_below = parse_tta_arg(args.tta), tta_below_arg(args.tta_below)
    depth = depth_arg(args.depth) or 1
    image = load_image(args.image, name=args.image)

    from graphdistill.student.predict import load_student

    con = console(stderr=True)
    with con.status("loading the student…"):
        predictor = load_student(args.run, device=args.device)
        try:
            predictor.check_depth(depth)
        except ValueError as exc:
            raise CommandError(f"--depth: {exc}") from exc
        output = predictor.predict(
            image, question, score_threshold=args.threshold, tta=tta, tta_below=tta_below, depth=depth
        )
    if args.json:
        print_json(graph_json(output))
    else:
        out_con = console()
        from graphdistill.commands._common import output_lines

        for line in output_lines(output):
            out_con.print(line, markup=False)
    if out_path is not None:
        from graphdistill.viz import draw_output

        draw_output(image, output, title="student").save(out_path)
        con.print(f"annotated picture: {out_path}")
    return 0


def graph_json(output: dict[str, Any]) -> dict[str, Any]:
    """The student's output as ``graphdistill run --json`` prints the teacher's: the same serialisation
    (:func:`~graphdistill.commands._common.output_json`, i.e. ``trace.encode_value``). The predictor returns a DETECTIONS output as a plain
    ``Detections`` dict (``"kind": "detections"``); it is typed again first so that it is written as the
    teacher's live ``Detections`` is (``"__record__": "detections"``)."""
    from graphdistill.commands._common import output_json
    from graphdistill.trace import Detections

    typed = {
        k: Detections.model_validate(v) if isinstance(v, dict) and v.get("kind") == "detections" else v
        for k, v in output.items()
    }
    return output_json(typed)
