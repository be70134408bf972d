"""``RUN/eval.json``: the one contract between evaluation and everything that shows its figures.

:func:`graphdistill.eval.evaluate.evaluate_run` returns an :class:`EvalResult` and :func:`write_eval` stores
it; the report, the markdown summary, the demo's headline, a bundle's manifest (its ``fidelity``) and the
benchmarks read it back with :func:`read_eval`, which checks it. Typed dictionaries rather than a model
class: the result is plain JSON on disk, read by tools that know nothing of graphdistill. Fidelity figures
stay ``{name: value}`` maps, keyed by ``metrics.FIDELITY_KEYS`` (an output the graph lacks has no figure).
"""

# no ``from __future__ import annotations``: TypedDict reads ``NotRequired`` from evaluated annotations
import json
import os
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

from graphdistill.errors import GraphdistillError

EVAL_FILE = "eval.json"

Fidelity = dict[str, Any]  # metrics.FIDELITY_KEYS (answer_f1, box_map50, ...) -> value, None when not scored
Intervals = dict[str, list[float] | None]  # the same keys -> [low, high] of the 95 % bootstrap interval


class EvalFileError(GraphdistillError, ValueError):
    """An ``eval.json`` that cannot be read as an evaluation; the message names the file and the fault."""


class BootstrapInfo(TypedDict):
    level: float
    resamples: int
    seed: int
    method: str


class RowScores(TypedDict):
    """One evaluated row: what the teacher and the student answered and how far they agree (the report's
    gallery sorts by ``disagreement``)."""

    id: str
    image: str  # the row's image blob (sha256) in the dataset
    question: str
    teacher_answer: str | None
    student_answer: str | None
    answer_f1: float | None
    objects_f1: float | None
    mask_miou: float | None
    sources_recall: float | None
    disagreement: float


class ExportedEval(TypedDict):
    """One bundle scored on the same rows as the PyTorch student, and timed in the same run."""

    ms: float  # the fastest of ms_by_threads
    ms_by_threads: dict[str, float]
    bytes: int
    parity_vs_student: dict[str, Any]
    fidelity: NotRequired[Fidelity]
    fidelity_ci: NotRequired[Intervals | None]
    speedup_vs_teacher: NotRequired[float | None]


class TeacherSelf(TypedDict):
    """The teacher's other recorded samples of the same rows against its reference."""

    samples: int
    fidelity: Fidelity
    fidelity_ci: Intervals | None


class EvalResult(TypedDict):
    n: int  # rows evaluated
    split: str
    run: str
    dataset: str
    fidelity: Fidelity  # the PyTorch student against the teacher
    cost: dict[str, Any]  # teacher_ms, student_ms, speedup, teacher_bytes, student_bytes, ... (eval.cost)
    rows: list[RowScores]
    # written by every evaluation since the bootstrap intervals; an older eval.json lacks them
    photos: NotRequired[int]  # distinct source photos among the rows (the bootstrap's unit)
    fidelity_ci: NotRequired[Intervals | None]  # None with 0 resamples
    ci: NotRequired[BootstrapInfo]
    teacher_self: NotRequired[TeacherSelf]  # needs the dataset's trace store
    fidelity_val: NotRequired[Fidelity]  # evaluate_run(val=True)
    exported: NotRequired[dict[str, ExportedEval]]  # bundle path -> its figures
    ground_truth: NotRequired[dict[str, Any]]  # scores against human labels, when rows carry them
    tta: NotRequired[list[str]]  # the test-time augmentation the student and bundles answered with
    tta_below: NotRequired[float]  # ... only for answers with an object under this score (adaptive)
    depth: NotRequired[int]  # the iterations of the student's recurrent block the student and bundles ran


def write_eval(run: str | os.PathLike[str], result: EvalResult) -> Path:
    """``RUN/eval.json``, written whole or not at all (a temporary file renamed over it)."""
    path = Path(run) / EVAL_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
    return path


def read_eval(path: str | os.PathLike[str]) -> EvalResult:
    """An evaluation back from ``path`` (a run folder or its ``eval.json``), checked for every field of
    :class:`EvalResult`; :class:`EvalFileError` names the file and what is wrong."""
    p = Path(path)
    if p.is_dir():
        p = p / EVAL_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EvalFileError(f"{p}: no such file (evaluate the run first: graphdistill eval RUN)") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EvalFileError(f"{p}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise EvalFileError(f"{p}: expected a JSON object, got {type(data).__name__}")
    missing = sorted(k for k in EvalResult.__required_keys__ if k not in data)
    if missing:
        raise EvalFileError(f"{p}: not an evaluation of graphdistill eval: it lacks {', '.join(missing)}")
    return cast(EvalResult, data)
