"""`graphdistill export RUN --format executorch|onnx [--quantize none|int8] --out BUNDLE [--json]`."""

from __future__ import annotations

import argparse
import sys

from graphdistill.commands._common import add_depth_flag, add_tta_flags


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="export a trained student to a phone bundle (ExecuTorch or ONNX), checked against PyTorch",
        description="Export the student in RUN to BUNDLE. The export is gated: the float model must match "
        "PyTorch (same answer tokens, boxes within 1e-3 of the canvas, mask IoU >= 0.99) and int8 must keep "
        "its fidelity to the teacher within 0.05 of the float student's; otherwise it exits non-zero and "
        "writes nothing.",
    )
    p.add_argument(
        "run", help="the student run folder (model.safetensors, config.json, tokenizer.json, meta.json)"
    )
    p.add_argument("--format", required=True, choices=["executorch", "onnx"], dest="fmt")
    p.add_argument("--quantize", default="none", choices=["none", "int8"])
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--dataset", help="dataset for calibration and parity inputs (default: the run's own)")
    p.add_argument(
        "--calibration",
        type=int,
        default=None,
        help="train inputs, spread over distinct images, that int8 calibrates on (default: "
        "export.bundle.N_CALIBRATION; the gate checks the first 8 of them)",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=8,
        help="val inputs (then train inputs of images calibration did not see) for parity and fidelity",
    )
    add_tta_flags(
        p,
        "test-time augmentation the bundle's runner applies: flip, scale or flip,scale (default: none; "
        "each view costs a whole query on the phone)",
    )
    add_depth_flag(
        p,
        "the depth the bundle's runner uses by default (manifest depth.default): iterations of the student's "
        "recurrent block, 1..its max_depth; the bundle takes any of them (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from graphdistill.commands._common import (
        CommandError,
        console,
        depth_arg,
        parse_tta_arg,
        print_json,
        tta_below_arg,
    )
    from graphdistill.export.bundle import N_CALIBRATION, export_run

    if not Path(args.run).is_dir():
        raise CommandError(f"run folder {args.run} does not exist")
    con = console(stderr=True)
    with con.status(f"exporting {args.run} to {args.fmt} ({args.quantize})") as status:

        def progress(msg: str) -> None:
            status.update(msg)
            con.print(f"  {msg}")

        manifest = export_run(
            args.run,
            args.fmt,
            args.out,
            quantize=args.quantize,
            dataset=args.dataset,
            n_calibration=N_CALIBRATION if args.calibration is None else args.calibration,
            n_heldout=args.heldout,
            tta=parse_tta_arg(args.tta),
            tta_below=tta_below_arg(args.tta_below),
            depth=depth_arg(args.depth),
            progress=progress,
        )
    if args.json:
        print_json(manifest)
    else:
        gate = manifest["parity"]
        assert gate is not None, "export_run returns a manifest with its gate's result"
        vs = gate["vs_pytorch"]
        print(
            f"{args.out}: {args.fmt}/{args.quantize}, {sum(manifest['file_bytes'].values()) / 1e6:.2f} MB; "
            f"vs PyTorch: answer tokens equal {vs['answer_tokens_equal']:.0%}, box diff "
            f"{vs['box_max_abs_diff']:.1e}, mask IoU >= {vs['mask_iou_min']:.3f}",
            file=sys.stdout,
        )
        if "fidelity_vs_teacher" in gate:
            d = gate["fidelity_vs_teacher"]["drop"]
            print(
                f"int8 fidelity drop vs float: answer F1 {d['answer_token_f1']:+.3f}, box F1 {d['box_f1']:+.3f}"
            )
    return 0
