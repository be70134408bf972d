"""`graphdistill run`: one photo and one question through a teacher graph (the reference one by default)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from graphdistill.commands._common import CommandError, add_kb_flags, console, output_json
from graphdistill.images import IMAGE_SUFFIXES

# (flag, VisualRagConfig field, default, what it loads): the reference graph's weights, each replaceable
WEIGHT_FLAGS = [
    ("--detector", "detector", "yolo11n", "YOLO detector weights (.pt)"),
    ("--segmenter", "segmenter", "mobile_sam", "SAM checkpoint"),
    ("--llm", "llm", "smollm2-135m-instruct", "LLM: a Hugging Face model folder or .gguf"),
    ("--text-embedder", "embedder", "all-minilm-l6-v2", "sentence-transformers model folder"),
]
_REFERENCE_ONLY = [(f, field) for f, field, _, _ in WEIGHT_FLAGS] + [
    ("--segmenter-type", "segmenter_type"),
    ("--kb-path", "kb_path"),
    ("--kb-url", "kb_url"),
]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="answer a question about a photo with a teacher graph")
    p.add_argument(
        "--graph",
        default=None,
        metavar="SPEC",
        help="module:attr or path/file.py:attr naming a GraphBuilder, compiled graph or factory "
        "(default: the reference visual_rag graph)",
    )
    p.add_argument("--image", required=True, help="the photo (any format Pillow reads)")
    p.add_argument("--question", required=True, help="the question about the photo")
    p.add_argument("--json", action="store_true", help="print one JSON object: answer, sources, objects")
    p.add_argument("--out", default=None, help="write the annotated picture here (.png/.jpg)")
    p.add_argument("--device", default=None, help="cpu or cuda (reference graph; default: cpu)")
    models = p.add_argument_group(
        "reference graph weights", "a registry name (`graphdistill weights list`) or a local path to your own"
    )
    for flag, field, default, what in WEIGHT_FLAGS:
        models.add_argument(
            flag, dest=field, default=None, metavar="NAME|PATH", help=f"{what} (default: {default})"
        )
    models.add_argument(
        "--segmenter-type",
        dest="segmenter_type",
        default=None,
        metavar="TYPE",
        help="the SAM architecture of --segmenter: vit_t (MobileSAM), vit_b, vit_l or vit_h (default: vit_t)",
    )
    add_kb_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from graphdistill.images import load_image

    question = (args.question or "").strip()
    if not question:
        raise CommandError("--question is empty: ask something about the photo")
    out_path = _check_out(args.out)
    image = load_image(args.image, name=args.image)

    con = console(stderr=True)
    with con.status("loading the teacher graph (models load on first use)…") as status:
        graph = _load(args)
        status.update("running the graph…")
        output = _invoke(graph, {"image": image, "question": question}, status)

    if args.json:
        json.dump(output_json(output), sys.stdout)
        sys.stdout.write("\n")
    else:
        _show(output)
    if out_path is not None:
        from graphdistill.viz import draw_output

        draw_output(image, output).save(out_path)
        con.print(f"annotated picture: {out_path}")
    return 0


def _check_out(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise CommandError(f"--out {out}: give a picture file name ending in .png or .jpg")
    if not path.parent.is_dir():
        raise CommandError(f"--out {out}: the folder {path.parent} does not exist")
    return path


def _load(args: argparse.Namespace) -> Any:
    from graphdistill.graphs.spec import load_graph
    from graphdistill.teachers.retriever import RetrieverError
    from graphdistill.weights import WeightsError

    given = {field: getattr(args, field, None) for _, field in _REFERENCE_ONLY}
    if args.graph is not None:
        flags = [flag for flag, field in _REFERENCE_ONLY if given[field] is not None]
        if flags:
            raise CommandError(
                f"{', '.join(flags)} choose the reference graph's weights; --graph {args.graph} brings its own"
            )
        return load_graph(args.graph)
    overrides = {k: v for k, v in {"device": args.device, **given}.items() if v is not None}
    try:
        return load_graph(None, **overrides)
    except RetrieverError:  # the knowledge base (a bad --kb-url, a dead server): its message names it
        raise
    except (WeightsError, ValueError) as exc:  # a weights name/path that is not there or not loadable
        raise CommandError(f"the reference graph could not load its models: {exc}") from exc


def _invoke(graph: Any, inputs: dict[str, Any], status: Any) -> dict[str, Any]:
    from graphdistill.errors import GraphdistillError
    from graphdistill.graphs.builder import GraphBuildError, schema_of

    try:
        wanted = [f.name for f in schema_of(graph).outputs]
    except GraphBuildError:
        wanted = []
    state: dict[str, Any] = {}
    done: list[str] = []
    try:
        for mode, chunk in graph.stream(inputs, stream_mode=["updates", "values"]):
            if mode == "updates":
                done.extend(chunk)
                status.update(f"running the graph… done: {', '.join(done)}")
            else:
                state = dict(chunk)
    except GraphdistillError:  # a GraphBuilder node's NodeError names the node itself: one line as it is
        raise
    except Exception as exc:  # a hand-written LangGraph graph: its nodes raise their own errors
        node = _failed_node(exc)
        what = f"node '{node}'" if node else f"the graph (after {', '.join(done) or 'no node'})"
        raise CommandError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
    return {k: state.get(k) for k in wanted} if wanted else state


_TASK_NOTE = re.compile(r"During task with name '(?P<node>[^']+)'")


def _failed_node(exc: BaseException) -> str | None:
    """The node LangGraph names in the note it adds to an exception raised inside a task."""
    for note in getattr(exc, "__notes__", None) or []:
        found = _TASK_NOTE.search(str(note))
        if found:
            return found["node"]
    return None


def _show(output: dict[str, Any]) -> None:
    con = console()
    if "answer" in output:
        con.print(f"[bold]answer:[/] {output['answer']}")
    objects = output.get("objects")
    if objects is not None:
        from rich.table import Table

        t = Table("label", "score", "box (x1, y1, x2, y2)", "mask px", title=f"{len(objects)} objects")
        for o in objects:
            mask = o.get("mask") if isinstance(o, dict) else None
            area = sum(mask["counts"][1::2]) if mask else 0
            box = ", ".join(f"{v:.0f}" for v in o["box"])
            t.add_row(str(o["label"]), f"{o['score']:.2f}", box, str(area))
        con.print(t)
    if "sources" in output:
        con.print(f"[bold]sources:[/] {', '.join(map(str, output['sources'] or [])) or '(none)'}")
    for k, v in output.items():
        if k not in ("answer", "objects", "sources"):
            con.print(f"[bold]{k}:[/] {v!r}"[:500])
