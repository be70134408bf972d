"""A user's teacher graph whose outputs are not named like visual_rag's (``reply`` TEXT, ``things`` OBJECTS,
``vec`` EMBEDDING): recorded for real, filtered, evaluated and reported. Filtering and evaluation must find
each output by its kind, the embedding must reach the dataset's ``embeddings`` column, and human
``ground_truth`` carried by an input must reach the dataset and the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import LookupStudent, bag_embedder, noise, run_folder
from graphdistill.dataset import DatasetRow, DatasetWriter, open_dataset
from graphdistill.eval import metrics
from graphdistill.filter.filtering import FilterConfig, FilterResult, filter_store
from graphdistill.filter.vote import OutputNames, vote_group
from graphdistill.trace import Detections, Kind, ObjectOut

N_INPUTS, K = 4, 3
BOX = [4.0, 4.0, 20.0, 16.0]
# human labels on two inputs: one agrees with the teacher's answer, one does not
GROUND_TRUTH = {
    0: {"answer": "There is a cat.", "objects": [{"label": "cat", "box": BOX}]},
    1: {"answer": "There is a dog.", "objects": [{"label": "cat", "box": BOX}]},
}


def toy_graph(notes_first: bool = False) -> Any:
    """A cheap teacher: one node writes a sentence, a cat box and a 3-d embedding that varies by sample.
    ``notes_first``: a JSON output holding a string is declared before the TEXT one (only its declared
    kind tells them apart)."""
    from graphdistill.graphs.builder import GraphBuilder

    def look(state: dict[str, Any], config: Any) -> dict[str, Any]:
        i = int(config["configurable"].get("gd_sample_index", 0))
        cat = ObjectOut(label="cat", class_id=15, score=0.9, box=BOX)
        return {
            "notes": "internal note",
            "reply": "There is a cat.",
            "things": [cat],
            "vec": np.array([1.0 + i, 2.0, 3.0], dtype=np.float32),
        }

    b = GraphBuilder("toy_kinds").input("image", "image").input("question", "text")
    if notes_first:
        b.output("notes", "json")
    b.output("reply", "text").output("things", "objects").output("vec", "embedding")
    writes = ["notes", "reply", "things", "vec"]
    b.node("look", look, reads=["image", "question"], writes=writes)
    return b.edge("__start__", "look").edge("look", "__end__").compile()


def _invoke(graph: Any, n: int, question: str = "What is it?") -> None:
    for g in range(n):
        for i in range(K):
            meta: dict[str, Any] = {}
            if g in GROUND_TRUTH:
                meta["ground_truth"] = GROUND_TRUTH[g]
            graph.invoke(
                {"image": noise(g, 24, 32), "question": question},
                config={
                    "metadata": {
                        "graphdistill_group_id": f"g{g}",
                        "graphdistill_sample_index": i,
                        "graphdistill_provenance": {"photos": [f"photo/{g}"]},
                        "graphdistill_metadata": meta,
                    },
                    "configurable": {"gd_sample_index": i},
                },
            )


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> tuple[FilterResult, Path]:
    from graphdistill.recording.recorder import record
    from graphdistill.store.trace_store import TraceStore

    root = tmp_path_factory.mktemp("kinds")
    store = TraceStore(root / "store")
    _invoke(record(toy_graph(), store), N_INPUTS)
    assert store.count() == N_INPUTS * K
    result = filter_store(store, root / "ds", FilterConfig(fractions=(1, 0, 0)), report=False)
    return result, root / "ds"


def test_filter_finds_the_answer_and_objects_by_kind(filtered: tuple[FilterResult, Path]) -> None:
    result, path = filtered
    assert result.summary()["kept"] == N_INPUTS, [d.failed for d in result.decisions]
    c = result.decisions[0].consensus
    assert c.outputs == OutputNames(answer="reply", objects="things", sources=None, embeddings=("vec",))
    assert c.agreement["answer"] == 1.0
    ds = open_dataset(path)
    assert {f.name: f.kind for f in ds.graph.outputs} == {  # type: ignore[union-attr]
        "reply": Kind.TEXT,
        "things": Kind.OBJECTS,
        "vec": Kind.EMBEDDING,
    }
    for row in ds.all_rows():
        assert row.answer == "There is a cat."
        assert [(o.label, o.box) for o in row.objects] == [("cat", BOX)]


def test_embedding_outputs_reach_the_dataset_and_the_student(filtered: tuple[FilterResult, Path]) -> None:
    from graphdistill.student.config import outputs_from_schema
    from graphdistill.student.loader import embedding_dims_of, row_embeddings

    _, path = filtered
    ds = open_dataset(path)
    rows = ds.all_rows()
    for row in rows:  # the mean of the samples' [1 + i, 2, 3], i = 0..2
        assert row_embeddings(row) == {"vec": pytest.approx([2.0, 2.0, 3.0])}
    dims = embedding_dims_of(rows)
    assert dims == {"vec": 3}
    assert outputs_from_schema(ds.graph, dims) == {"reply": "text", "things": "objects", "vec": "embedding"}


def test_declared_kind_beats_the_value_it_looks_like(tmp_path: Path) -> None:
    """``notes`` holds a string but is declared JSON; the TEXT output ``reply`` is the answer."""
    from graphdistill.graphs.builder import schema_of
    from graphdistill.recording.recorder import record
    from graphdistill.store.trace_store import TraceStore

    graph = toy_graph(notes_first=True)
    store = TraceStore(tmp_path / "store")
    schema = schema_of(graph).model_dump(mode="json")
    _invoke(record(graph, store, metadata={"graph_schema": schema}), 1)
    c = vote_group(list(store.iter()))
    assert c.outputs.answer == "reply" and c.answer == "There is a cat."
    # without the declaration the first string-valued output would have been taken for the answer
    bare = [t.model_copy(update={"metadata": {}}) for t in store.iter()]
    assert vote_group(bare).answer == "internal note"


def test_detections_output_counts_as_objects() -> None:
    kinds = {"caption": Kind.TEXT, "boxes": Kind.DETECTIONS}
    assert OutputNames.from_kinds(kinds) == OutputNames(answer="caption", objects="boxes", sources=None)
    dets = Detections(xyxy=[BOX], class_ids=[15], names=["cat"], scores=[0.8], image_size=[24, 32])
    out = metrics.canonical_output({"caption": "A cat.", "boxes": dets.model_dump(mode="json")}, kinds)
    assert out["answer"] == "A cat." and "sources" not in out
    assert [(o.label, o.box, o.score) for o in out["objects"]] == [("cat", BOX, 0.8)]


def _named(wrong: bool = False) -> Callable[[int, DatasetRow], dict[str, Any]]:
    """A student's outputs under this graph's own names, the teacher's row (as a student trained on the graph's
    schema answers); ``wrong`` answers every other input wrongly."""

    def output(i: int, row: DatasetRow) -> dict[str, Any]:
        return {
            "reply": "A bus." if wrong and i % 2 == 0 else row.answer,
            "things": [o.model_dump(mode="json") for o in row.objects],
            "vec": [2.0, 2.0, 3.0],
        }

    return output


def _evaluate(run: Path, dataset: Path, student: LookupStudent) -> dict[str, Any]:
    from graphdistill.eval.evaluate import evaluate_run

    return evaluate_run(
        run,
        dataset,
        split="train",
        predictor=student,
        embedder=bag_embedder,
        teacher_timing=False,
        student_repeats=1,
    )


def test_eval_scores_user_named_outputs_by_kind(filtered: tuple[FilterResult, Path], tmp_path: Path) -> None:
    _, path = filtered
    res = _evaluate(run_folder(tmp_path / "run", path), path, LookupStudent(path, _named()))
    f = res["fidelity"]
    assert f["answer_exact"] == f["answer_f1"] == f["answer_semantic"] == 1.0
    assert f["box_map50"] == pytest.approx(1.0)
    assert "sources_recall" not in f  # the graph has no SOURCES output: nothing to score
    wrong = _evaluate(run_folder(tmp_path / "run_w", path), path, LookupStudent(path, _named(wrong=True)))
    assert wrong["fidelity"]["answer_exact"] == 0.5
    assert sorted(r["answer_f1"] for r in wrong["rows"]) == [0.0, 0.0, 1.0, 1.0]


def test_ground_truth_reaches_the_dataset_report_and_summary(
    filtered: tuple[FilterResult, Path], tmp_path: Path
) -> None:
    from graphdistill.eval.report import build_report
    from graphdistill.eval.result import write_eval
    from graphdistill.eval.summary import markdown_summary

    _, path = filtered
    rows = {r.id: r for r in open_dataset(path).all_rows()}
    gt1, gt0 = rows["g1"].ground_truth, rows["g0"].ground_truth
    assert gt1 is not None and gt1["answer"] == "There is a dog."
    assert gt0 is not None and gt0["objects"][0]["score"] == 1.0  # labels get score 1
    assert rows["g2"].ground_truth is None

    run = run_folder(tmp_path / "run", path)
    res = _evaluate(run, path, LookupStudent(path, _named()))
    gt = res["ground_truth"]
    assert gt["n"] == 2
    assert gt["teacher"]["answer_exact"] == gt["student"]["answer_exact"] == 0.5  # "dog" vs "cat"
    assert gt["teacher"]["box_map50"] == pytest.approx(1.0)
    write_eval(run, res)

    html = build_report(
        [run], tmp_path / "report.html", gallery_n=1, predictor=LookupStudent(path, _named())
    ).read_text()
    table = html[html.index('<table id="fidelity">') :]
    table = table[: table.index("</table>")]
    assert "student vs human labels" in table and "teacher vs human labels" in table
    exact_row = next(r for r in table.split("<tr>") if r.startswith("<td>Answer exact match"))
    # against the teacher with its (degenerate: a perfect student) interval; against human labels without
    assert [c.split("</td>")[0] for c in exact_row.split("<td>")[2:]] == [
        "1.00 [1.00, 1.00]",
        "0.500",
        "0.500",
    ]

    md = markdown_summary(res)
    assert (
        "| Fidelity [95 % interval] | PyTorch student vs teacher | Student vs human labels | "
        "Teacher vs human labels |" in md
    )
    assert "| Answer exact match | 1.00 [1.00, 1.00] | 0.500 | 0.500 |" in md


def test_datasets_written_before_the_new_columns_still_load(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    w = DatasetWriter(tmp_path / "old")
    w.add({"id": "a", "question": "q?", "answer": "A cat."}, noise(0, 24, 32), "train")
    w.close()
    for split in ("train", "val", "test"):
        f = tmp_path / "old" / f"{split}.parquet"
        pq.write_table(pq.read_table(f).drop_columns(["embeddings", "ground_truth"]), f)
    (row,) = open_dataset(tmp_path / "old").rows("train")
    assert row.embeddings is None and row.ground_truth is None and row.answer == "A cat."
