"""Terminal output of graph-shaped results follows whatever fields the graph declares."""

from __future__ import annotations

from graphdistill.commands._common import output_lines


def test_full_visual_rag_shape() -> None:
    out = {
        "answer": "A cat on a sofa.",
        "objects": [{"label": "cat", "score": 0.91, "box": [1.2, 2.0, 30.4, 40.0], "mask": None}],
        "sources": ["coco/cat/1", "coco/couch/2"],
    }
    assert output_lines(out) == [
        "answer: A cat on a sofa.",
        "objects:",
        "  cat              0.91  [1, 2, 30, 40]",
        "sources: coco/cat/1, coco/couch/2",
    ]


def test_partial_schema_and_other_kinds() -> None:
    lines = output_lines({"reply": "yes", "sources": [], "clip": [0.1, 0.2, 0.3]})
    assert lines == ["reply: yes", "sources: -", "clip: [3 numbers]"]
