"""Rounds (`graphdistill.improve`): the disagreement ranking, a round's labelling, resume, and collapse.

A toy teacher graph (no models: it reads a coloured square off the image) is recorded through the real
recorder; the tiny seeded student is trained on it for real, then the rounds run end to end: the student scores
the pool, the teacher graph labels the picks, the store is filtered, the student retrains from the last round's
weights and is evaluated on the same held-out rows.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from _fixtures import bag_embedder, ellipse_mask, train_tiny
from graphdistill.eval.metrics import answer_diversity, class_coverage
from graphdistill.filter.filtering import FilterConfig, filter_store
from graphdistill.improve.labels import GraphLabeller, StoreLabeller, input_group
from graphdistill.improve.rounds import ImproveConfig, ImproveError, PoolScores, choose, improve
from graphdistill.improve.uncertainty import augmented_predictions, disagreement, paraphrase
from graphdistill.recording.batch import record_inputs
from graphdistill.store.trace_store import TraceStore
from graphdistill.trace import RLE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OUTPUTS = {"answer": "text", "objects": "objects", "sources": "sources"}

# the toy teacher: finds the one bright square of the image, says what colour it is and where
TOY_GRAPH = textwrap.dedent(
    """
    import numpy as np
    from graphdistill.graphs import GraphBuilder
    from graphdistill.trace import RLE, Document, Kind, ObjectOut

    COLOURS = ["red", "green", "blue"]
    DOCS = {c: Document(id=f"doc-{c}", text=f"A {c} square is a square painted {c}.", distance=0.2)
            for c in COLOURS}

    def look(r):
        img = r["image"].astype(int)
        bright = img.max(axis=2) > 200
        ys, xs = np.nonzero(bright)
        if not len(ys):
            return {"answer": "There is nothing there.", "objects": []}
        # the box a detector draws, a little wider than the square (so the mask does not fill it)
        y1, y2, x1, x2 = max(ys.min() - 2, 0), ys.max() + 3, max(xs.min() - 2, 0), xs.max() + 3
        colour = COLOURS[int(np.argmax(img[ys, xs].mean(axis=0)))]
        where = "left" if (x1 + x2) / 2 < img.shape[1] / 2 else "right"
        obj = ObjectOut(label=colour, class_id=COLOURS.index(colour), score=0.9,
                        box=[float(x1), float(y1), float(x2), float(y2)],
                        mask=RLE.encode(bright)).model_dump(mode="json")
        return {"answer": f"A {colour} square on the {where} answers {r['question'].split()[-1]}",
                "objects": [obj]}

    def retrieve(r):
        return {"documents": [DOCS[o["label"]] for o in r["objects"]]}

    def compose(r):
        return {"sources": [d.id for d in r["documents"]]}

    builder = (
        GraphBuilder("toy_squares").input("image", Kind.IMAGE).input("question", Kind.TEXT)
        .output("answer", Kind.TEXT).output("objects", Kind.OBJECTS).output("sources", Kind.SOURCES)
        .node("look", look, reads=["image", "question"], writes={"answer": Kind.TEXT, "objects": Kind.OBJECTS})
        .node("retrieve", retrieve, reads=["objects"], writes={"documents": Kind.DOCUMENTS})
        .node("compose", compose, reads=["documents"], writes={"sources": Kind.SOURCES})
    )
    """
)


def square_image(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    s = 10 + i % 5
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
    img[y : y + s, x : x + s] = 40
    img[y : y + s, x : x + s, i % 3] = 230
    return img


def write_inputs(root: Path, name: str, ids: range, heldout: bool = False) -> Path:
    images = root / f"{name}_images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in ids:
        Image.fromarray(square_image(i)).save(images / f"{i:03d}.png")
        recipe = {"heldout": True, "kind": "heldout"} if heldout else {}
        rows.append(
            {
                "image": f"{name}_images/{i:03d}.png",
                "question": f"What is in the picture number {i}?",
                "provenance": {"photos": [f"toy/{i}"], "recipe": recipe},
            }
        )
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The toy graph, a store of 3 held-out + 6 training inputs (2 samples each), its dataset, the tiny run
    trained on it, and a pool of 6 unlabelled inputs."""
    root = tmp_path_factory.mktemp("improve")
    graph = root / "toy_squares.py"
    graph.write_text(TOY_GRAPH)
    spec = f"{graph}:builder"
    store = root / "store"
    record_inputs(write_inputs(root, "heldout", range(100, 103), heldout=True), store, graph=spec, samples=2)
    record_inputs(write_inputs(root, "train", range(0, 6)), store, graph=spec, samples=2)
    with TraceStore(store, readonly=True) as traces:
        filter_store(traces, root / "ds", FilterConfig(), embedder=bag_embedder, source_store=str(store))
    run = train_tiny(root / "ds", root / "run")
    return {
        "root": root,
        "graph": spec,
        "store": store,
        "run": run,
        "pool": write_inputs(root, "pool", range(10, 16)),
    }


def groups_of(store: Path) -> dict[str, list[str]]:
    with TraceStore(store, readonly=True) as s:
        return s.groups()


# ---- the ranking ------------------------------------------------------------------------------------------


def test_paraphrase_rewords_a_template_question_about_the_same_object() -> None:
    q = paraphrase("How many cups are there?")
    assert q is not None and "cup" in q and q != "How many cups are there?"
    assert paraphrase("How many cups are there?") == q  # deterministic
    generic = paraphrase("What is in the picture?")
    assert generic is not None and generic != "What is in the picture?" and "{x}" not in generic
    assert paraphrase("Why is the sky blue today, do you reckon?") is None
    # a held-out-bank question is recognised, and reworded from the training bank only
    from graphdistill.recording.inputs import GENERIC_QUESTIONS, LABEL_QUESTIONS

    held = paraphrase("Could you count the spoons for me?")
    assert held in {t.format(x="spoon") for t in LABEL_QUESTIONS}
    assert paraphrase("Who or what is the main subject?") in GENERIC_QUESTIONS


def _obj(label: str, box: list[float], score: float = 0.9) -> dict[str, Any]:
    mask = RLE.encode(ellipse_mask(box)).model_dump(mode="json")
    return {"label": label, "class_id": 0, "score": score, "box": box, "mask": mask}


def test_disagreement_is_zero_for_agreeing_predictions_and_grows_with_each_part() -> None:
    same = {"answer": "A cat.", "objects": [_obj("cat", [4, 4, 30, 30])], "sources": ["d1", "d2"]}
    agree = disagreement([same, same, same], OUTPUTS)
    assert (agree.answer, agree.boxes, agree.masks, agree.sources) == (0.0, 0.0, 0.0, 0.0)
    assert agree.low_score == pytest.approx(0.1)
    differ = disagreement(
        [
            same,
            {"answer": "A dog.", "objects": [_obj("cat", [6, 6, 32, 32])], "sources": ["d1", "d3"]},
            {"answer": "Nothing.", "objects": [], "sources": ["d4"]},
        ],
        OUTPUTS,
    )
    assert differ.answer == pytest.approx(2 / 3)
    # one cluster, found by 2 of 3, its boxes at IoU ~0.86 to their fusion; its masks overlap but differ
    assert 0.3 < differ.boxes < 0.6 and 0 < differ.masks < 0.5 and differ.sources > 0.5
    assert differ.score > agree.score
    nothing = disagreement([{"answer": "x", "objects": [], "sources": []}] * 2, OUTPUTS)
    assert nothing.low_score == 1.0  # no object at all: as unsure as it gets about objects


def test_ranking_picks_the_inputs_whose_augmented_predictions_disagree() -> None:
    """A model that reads the left half of the photo answers a symmetric photo the same in every view and a
    lopsided one differently once mirrored: active learning picks the lopsided ones, self-training the others."""

    def predict(img: np.ndarray, question: str) -> dict[str, Any]:
        left = img[:, : img.shape[1] // 2].mean()
        return {"answer": "bright" if left > 150 else "dark", "objects": [], "sources": ["d1"]}

    symmetric = np.full((40, 40, 3), 200, dtype=np.uint8)
    lopsided = symmetric.copy()
    lopsided[:, 20:] = 20
    photos = [symmetric, lopsided, symmetric, lopsided]
    scores = []
    for img in photos:
        preds = augmented_predictions(
            img, "Is there a cat in the picture?", predict, OUTPUTS, pad_value=(200,) * 3
        )
        assert [p.view for p in preds] == ["photo", "flip", "scale", "paraphrase"]
        assert preds[-1].question != "Is there a cat in the picture?" and "cat" in preds[-1].question
        scores.append(disagreement([p.result for p in preds], OUTPUTS).to_dict())
    assert scores[0]["answer"] == 0.0 and scores[1]["answer"] > 0.0
    pool = PoolScores(index=[0, 1, 2, 3], scores=scores)
    assert choose("active", pool, 2, 0, 1) == [1, 3]
    assert choose("self-filtered", pool, 2, 0, 1) == [0, 2]
    drawn = choose("random", pool, 2, 0, 1)
    assert len(drawn) == 2 and drawn == choose("random", pool, 2, 0, 1)


def test_diversity_and_coverage_measures() -> None:
    varied = answer_diversity(["a red square", "a blue circle", "two green lines"])
    collapsed = answer_diversity(["a red square"] * 3)
    assert varied["distinct_2"] == 1.0 and collapsed["distinct_2"] == pytest.approx(1 / 3)
    assert varied["entropy"] > collapsed["entropy"] and collapsed["top_share"] == 1.0
    assert answer_diversity([])["distinct_1"] is None
    cov = class_coverage([["cat"], ["cat", "dog"], []], ["cat", "dog", "cow", "bus"])
    assert cov == {"classes": 2, "share": 0.5, "rows_with_objects": pytest.approx(2 / 3)}


# ---- rounds end to end --------------------------------------------------------------------------------------


def test_each_round_records_exactly_budget_inputs_and_is_a_loadable_run(
    base: dict[str, Any], tmp_path: Path
) -> None:
    from graphdistill.eval.result import read_eval
    from graphdistill.student.predict import load_student

    out = tmp_path / "active"
    cfg = ImproveConfig(arm="active", rounds=2, budget=2, samples=2, epochs=1)
    base_eval = base["run"] / "eval.json"
    before_eval = base_eval.read_bytes() if base_eval.exists() else None
    seen: list[int] = []
    state = improve(
        base["run"], base["pool"], out, cfg, graph=base["graph"], embedder=bag_embedder,
        on_round=lambda r: seen.append(r["round"]),
    )  # fmt: skip
    assert seen == [0, 1, 2] and [r["round"] for r in state["rounds"]] == [0, 1, 2]
    before = groups_of(base["store"])
    after = groups_of(out / "store")
    new = set(after) - set(before)
    assert len(new) == 4 and all(len(after[g]) == 2 for g in new)  # 2 inputs a round, 2 samples each
    pool_groups = [input_group(np.asarray(Image.open(p)), q) for p, q in _pool(base["pool"])]
    picked = [set(r["selected"]) for r in state["rounds"][1:]]
    assert all(len(p) == 2 for p in picked) and not picked[0] & picked[1]
    assert new == {pool_groups[i] for p in picked for i in p}
    assert [r["teacher_calls"] for r in state["rounds"]] == [0, 4, 8]
    heldout_ids = None
    for r in state["rounds"][1:]:
        assert (
            load_student(r["run"]).predict(square_image(3), "What is in the picture?")["answer"] is not None
        )
        ids = sorted(row["id"] for row in read_eval(r["run"])["rows"])
        assert ids == (heldout_ids or ids) and len(ids) == 3  # the same held-out rows every round
        heldout_ids = ids
        assert r["train_rows"] > 0 and set(r["diversity"]) == {
            "distinct_1",
            "distinct_2",
            "entropy",
            "top_share",
        }
    assert json.loads((out / "rounds.json").read_text())["rounds"] == state["rounds"]
    assert (out / "round-00" / "eval.json").exists()  # round 0's evaluation; the base run's own is untouched
    assert (base_eval.read_bytes() if base_eval.exists() else None) == before_eval
    # a rerun with the same arguments finds every round done; other arguments are refused, naming them
    assert improve(base["run"], base["pool"], out, cfg, graph=base["graph"], embedder=bag_embedder) == state
    with pytest.raises(ImproveError, match="budget"):
        improve(
            base["run"],
            base["pool"],
            out,
            ImproveConfig(arm="active", rounds=2, budget=3),
            graph=base["graph"],
        )


def _pool(path: Path) -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(path.parent / r["image"], r["question"]) for r in rows]


class Killed(Exception):
    pass


def test_resume_after_a_kill_in_the_middle_of_a_rounds_recording(
    base: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "random"
    cfg = ImproveConfig(arm="random", rounds=1, budget=3, samples=2, epochs=1)
    # the teacher's second sample sees the mirrored photo, as the demo records
    labeller = GraphLabeller(graph=base["graph"], samples=2, tta=("flip",), batch_size=1)

    def kill(stage: str, done: int, total: int) -> None:
        if stage == "teacher" and done == 3:  # one input and a half recorded, then the process dies
            raise Killed

    with pytest.raises(Killed):
        improve(base["run"], base["pool"], out, cfg, labeller=labeller, embedder=bag_embedder, progress=kill)
    assert not (out / "round-01" / "labelled.json").exists()
    half = groups_of(out / "store")
    state = improve(base["run"], base["pool"], out, cfg, labeller=labeller, embedder=bag_embedder)
    after = groups_of(out / "store")
    new = set(after) - set(groups_of(base["store"]))
    assert len(new) == 3 and all(len(after[g]) == 2 for g in new)  # nothing recorded twice, nothing lost
    assert set(half) <= set(after)
    with TraceStore(out / "store", readonly=True) as s:
        seen = {(t.sample_index, t.metadata["tta"]["flip"]) for g in new for t in map(s.get, after[g])}
    assert seen == {(0, False), (1, True)}
    assert [r["round"] for r in state["rounds"]] == [0, 1] and state["rounds"][1]["teacher_calls"] == 6


def test_the_store_labeller_copies_what_a_store_recorded_and_names_what_it_did_not(
    base: dict[str, Any], tmp_path: Path
) -> None:
    oracle = tmp_path / "oracle"
    record_inputs(base["pool"], oracle, graph=base["graph"], samples=2)
    dst = tmp_path / "dst"
    assert StoreLabeller(oracle, samples=1).label(base["pool"], dst) == 6
    assert all(len(v) == 1 for v in groups_of(dst).values())
    from graphdistill.improve.labels import LabelError

    with pytest.raises(LabelError, match="never recorded"):
        StoreLabeller(oracle).label(write_inputs(tmp_path, "other", range(40, 41)), dst)


def test_unfiltered_self_training_collapses_where_filtering_holds(
    base: dict[str, Any], tmp_path: Path
) -> None:
    """The toy is built to collapse: a one-epoch student answers every photo alike, so its own answers taken
    as labels unfiltered pile up one answer; the filtered arm's vote and checks keep them out."""
    measured: dict[str, list[Mapping[str, Any]]] = {}
    for arm in ("self-unfiltered", "self-filtered"):
        cfg = ImproveConfig(arm=arm, rounds=2, budget=3, epochs=1)
        measured[arm] = improve(base["run"], base["pool"], tmp_path / arm, cfg, embedder=bag_embedder)[
            "rounds"
        ]
        assert all(r["teacher_calls"] == 0 for r in measured[arm])  # the student labels itself
    shares = [r["label_diversity"]["top_share"] for r in measured["self-unfiltered"]]
    distinct = [r["label_diversity"]["distinct_2"] for r in measured["self-unfiltered"]]
    assert shares[0] < shares[1] < shares[2], shares
    assert distinct[2] < distinct[0], distinct
    # the student's labels say how much its own predictions agreed; the filtered arm's rule reads only those
    from graphdistill.improve.labels import VIEW_AGREEMENT, view_agreement

    with TraceStore(tmp_path / "self-filtered" / "store", readonly=True) as s:
        traces = list(s.iter())
    mine = [t for t in traces if t.graph.name == "student"]
    assert len({t.group_id for t in mine}) == 6 and all(0 < t.metadata[VIEW_AGREEMENT] <= 1 for t in mine)
    assert all(view_agreement(t) == 1.0 for t in traces if t.graph.name != "student")
    assert {t.metadata["view"] for t in mine} == {
        "photo",
        "flip",
        "scale",
    }  # the toy's questions have no rewording
    unfiltered_rows = [r["train_rows"] for r in measured["self-unfiltered"]]
    filtered_rows = [r["train_rows"] for r in measured["self-filtered"]]
    assert unfiltered_rows[2] > unfiltered_rows[0]  # every self-label kept
    assert filtered_rows[2] < unfiltered_rows[2]  # the filter dropped some


def test_the_improve_command_runs_a_round_and_refuses_bad_arguments(
    base: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.cli import main

    oracle = tmp_path / "oracle"
    record_inputs(base["pool"], oracle, graph=base["graph"], samples=2)
    out = tmp_path / "cli"
    args = ["improve", str(base["run"]), "--pool", str(base["pool"]), "--out", str(out), "--rounds", "1",
            "--budget", "2", "--samples", "2", "--epochs", "1", "--teacher-store", str(oracle), "--no-embedder"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "round 0:" in printed and "round 1: 2 inputs labelled, 4 teacher calls" in printed
    assert json.loads((out / "rounds.json").read_text())["rounds"][1]["labelled_inputs"] == 2
    for bad, message in (
        (["--budget", "0"], "--budget 0: must be at least 1"),
        (["--min-agreement", "2"], "--min-agreement 2.0: must be between 0 and 1"),
        (["--teacher-store", str(tmp_path / "none")], "--teacher-store"),
        (["--pool", str(tmp_path / "missing.jsonl")], "--pool"),
        (["--teacher-tta", "blur"], "blur"),
    ):
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err
