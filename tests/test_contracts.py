"""The typed contracts between stages: each is written by one side and read back, checked, by the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphdistill.errors import GraphdistillError
from graphdistill.eval.result import EvalFileError, EvalResult, read_eval, write_eval


def _minimal_eval() -> EvalResult:
    return {
        "n": 1,
        "split": "test",
        "run": "r",
        "dataset": "d",
        "fidelity": {"answer_f1": 0.5},
        "cost": {"student_ms": 3.0},
        "rows": [
            {
                "id": "a",
                "image": "0" * 64,
                "question": "What?",
                "teacher_answer": "a cat",
                "student_answer": "cat",
                "answer_f1": 0.667,
                "objects_f1": None,
                "mask_miou": None,
                "sources_recall": None,
                "disagreement": 0.333,
            }
        ],
    }


def test_eval_round_trips_through_its_file(tmp_path: Path) -> None:
    ev = _minimal_eval()
    path = write_eval(tmp_path, ev)
    assert path == tmp_path / "eval.json" and not list(tmp_path.glob("*.tmp"))
    assert read_eval(tmp_path) == ev == read_eval(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"eval\.json: no such file \(evaluate the run first"),
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"n": 1, "split": "test"}), "lacks cost, dataset, fidelity, rows, run"),
    ],
)
def test_a_bad_eval_file_is_refused_naming_the_file_and_the_fault(
    tmp_path: Path, content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "eval.json").write_text(content)
    with pytest.raises(EvalFileError, match=message) as info:
        read_eval(tmp_path)
    assert isinstance(info.value, GraphdistillError) and str(tmp_path) in str(info.value)


def test_the_fields_an_older_eval_lacks_are_optional_and_the_rest_required() -> None:
    """An eval.json from before the bootstrap intervals still reads (the report shows it without them)."""
    assert EvalResult.__optional_keys__ >= {"photos", "fidelity_ci", "ci", "exported", "teacher_self"}
    assert EvalResult.__required_keys__ == {"n", "split", "run", "dataset", "fidelity", "cost", "rows"}
