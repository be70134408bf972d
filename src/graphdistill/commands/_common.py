"""Shared helpers for CLI commands: errors shown without a traceback, JSON output, a console."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from graphdistill.errors import GraphdistillError


class CommandError(GraphdistillError, RuntimeError):
    """An error the CLI prints as one clear line (exit code 2), naming the input at fault."""


def add_kb_flags(p: argparse.ArgumentParser) -> None:
    """Where the reference graph's retriever finds the knowledge base (`graphdistill kb build` fills it)."""
    kb = p.add_argument_group("reference graph knowledge base", "default: $GRAPHDISTILL_HOME/kb/chroma")
    where = kb.add_mutually_exclusive_group()
    where.add_argument("--kb-path", dest="kb_path", default=None, metavar="DIR", help="a local Chroma folder")
    where.add_argument(
        "--kb-url",
        dest="kb_url",
        default=None,
        metavar="URL",
        help="a Chroma server, e.g. http://localhost:8000",
    )


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def output_json(output: dict[str, Any]) -> dict[str, Any]:
    """A graph's (or the student's) final output as ``--json`` prints it: every value through
    ``trace.encode_value`` (typed records keep their ``__record__`` tag), the input image left out."""
    from graphdistill.trace import encode_value

    blobs: dict[str, bytes] = {}
    return {k: encode_value(v, blobs) for k, v in output.items() if k not in ("image",)}


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def output_lines(output: dict[str, Any]) -> list[str]:
    """A graph-shaped output (whatever fields its schema declares) as plain text lines for the terminal."""
    lines: list[str] = []
    for field, value in output.items():
        if isinstance(value, str):
            lines.append(f"{field}: {value}")
        elif isinstance(value, list) and value and isinstance(value[0], dict) and "box" in value[0]:
            lines.append(f"{field}:")
            for o in value:
                box = ", ".join(f"{v:.0f}" for v in o["box"])
                lines.append(f"  {o.get('label', '?'):<16} {o.get('score', 0.0):.2f}  [{box}]")
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            lines.append(f"{field}: {', '.join(value) or '-'}")
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            lines.append(f"{field}: [{len(value)} numbers]")
        else:
            lines.append(f"{field}: {json.dumps(value, default=str)[:200]}")
    return lines


@contextmanager
def stage_progress(con: Any, *, transient: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress display with one bar per stage; yields ``tick(stage, done, total)`` for library code
    that reports progress as named stages."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tasks: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=con,
        transient=transient,
    ) as progress:

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield tick


def parse_tta_arg(text: str | None) -> tuple[str, ...]:
    """``--tta flip,scale`` -> the augmentations (:func:`graphdistill.runner.tta.parse_tta`); an unknown name
    is a :class:`CommandError` naming it and the choices."""
    from graphdistill.runner.tta import TTAError, parse_tta

    try:
        return parse_tta(text)
    except TTAError as exc:
        raise CommandError(f"--tta: {exc}") from exc


def tta_below_arg(value: float | None) -> float | None:
    """``--tta-below SCORE``: a score between 0 and 1 (or absent), else a :class:`CommandError`."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise CommandError(f"--tta-below {value}: must be a score between 0 and 1")
    return value


def add_tta_flags(p: argparse.ArgumentParser, tta_help: str) -> None:
    """``--tta`` (test-time augmentation; ``tta_help`` says what it applies to) and ``--tta-below SCORE``
    (adaptive compute)."""
    p.add_argument("--tta", default=None, help=tta_help)
    p.add_argument(
        "--tta-below",
        type=float,
        default=None,
        metavar="SCORE",
        help="adaptive compute: answer the --tta views only when the photo's own answer has no object or one "
        "scoring under SCORE",
    )


def add_depth_flag(p: argparse.ArgumentParser, depth_help: str) -> None:
    """``--depth r``: iterations of the student's recurrent block (``depth_help`` says the default)."""
    p.add_argument("--depth", type=int, default=None, metavar="R", help=depth_help)


def depth_arg(value: int | None) -> int | None:
    """``--depth r``: at least 1 (or absent), else a :class:`CommandError`; the student or bundle checks the
    top of its own range."""
    if value is not None and value < 1:
        raise CommandError(f"--depth {value}: must be at least 1")
    return value
