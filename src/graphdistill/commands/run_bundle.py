"""`graphdistill run-bundle BUNDLE --image PATH --question TEXT [--json] [--threads N]`.

Runs an exported bundle with the runtime-only runner: this module imports nothing but
:mod:`graphdistill.runner` (numpy, Pillow, the bundle's runtime), never the student's torch code.
"""

from __future__ import annotations

import argparse

from graphdistill.commands._common import add_depth_flag, add_tta_flags


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run-bundle", help="answer one question about one image with an exported bundle")
    p.add_argument("bundle", help="the bundle folder written by `graphdistill export`")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", required=True, help="the question to answer")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the runtime (default: its own)")
    add_tta_flags(
        p,
        "test-time augmentation: flip, scale, flip,scale, or none (default: the bundle's own, manifest "
        "`tta`; each view costs a whole query)",
    )
    add_depth_flag(
        p,
        "iterations of the student's recurrent block, 1..the bundle's depth.max (default: the bundle's "
        "depth.default, 1 when it has none)",
    )
    p.add_argument("--json", action="store_true", help="print {answer, objects, sources} as JSON")
    p.set_defaults(func=_run_bundle)


def _run_bundle(args: argparse.Namespace) -> int:
    import json
    import time

    from graphdistill.commands._common import CommandError, depth_arg, parse_tta_arg, tta_below_arg
    from graphdistill.images import load_image
    from graphdistill.runner import BundleRunner

    question = (args.question or "").strip()
    if not question:
        raise CommandError("--question is empty: ask something about the photo")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads must be >= 1, got {args.threads}")
    tta = None if args.tta is None else parse_tta_arg(args.tta)
    tta_below = tta_below_arg(args.tta_below)
    depth = depth_arg(args.depth)
    image = load_image(args.image, name=args.image)
    try:
        runner = BundleRunner(args.bundle, threads=args.threads)
        t0 = time.perf_counter()
        out = runner.predict(image, question, tta=tta, tta_below=tta_below, depth=depth)
        ms = (time.perf_counter() - t0) * 1000
    except OSError as exc:
        raise CommandError(f"bundle {args.bundle}: cannot read it ({exc})") from exc
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from graphdistill.commands._common import output_lines

    for line in output_lines(out):
        print(line)
    print(f"({ms:.1f} ms, {runner.manifest['runtime']}/{runner.manifest['quantize']})")
    return 0
