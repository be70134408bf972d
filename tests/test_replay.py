"""Counterfactual replays: a recorded run re-run from one node on an edited state, recorded as a trace of the
same graph. Toy graphs of plain Python nodes (no models) count which nodes run; the last test replays the
real visual_rag."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import H, W, ellipse_mask
from graphdistill.graphs import GraphBuilder
from graphdistill.graphs.replay import ReplayGraphError, replay_nodes
from graphdistill.recording.recorder import graph_identity, record
from graphdistill.recording.replay import (
    ReplayError,
    ReplayRequest,
    parent_state,
    replay,
    replay_key,
    replay_of,
    replay_trace_id,
)
from graphdistill.recording.replay_plan import (
    detector_labels,
    drop,
    duplicate,
    edit_from_description,
    plan_replays,
    relabel,
    relabel_text,
    replay_store,
)
from graphdistill.store.trace_store import TraceStore
from graphdistill.trace import RLE, Detections, Document, Kind, Masks, ObjectOut, Trace

LABELS = ["person", "cat", "dog", "cup", "bird"]


class ToyDetector:
    model_id = "toy-detector"
    weights_sha256 = "ab" * 32
    names = LABELS


class Toy:
    """visual_rag's shape in plain Python: detect -> retrieve -> {segment, reason} -> compose."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.configs: list[dict[str, Any]] = []

    def detect(self, r: dict[str, Any]) -> dict[str, Any]:
        self.calls["detect"] += 1
        # the image's first pixel says which objects it shows: 0 -> one cat, else a cat and a dog
        boxes = [[5.0, 5.0, 25.0, 30.0]] + ([[35.0, 10.0, 55.0, 35.0]] if r["image"][0, 0, 0] else [])
        names = ["cat", "dog"][: len(boxes)]
        return {
            "detections": Detections(
                xyxy=boxes,
                class_ids=[LABELS.index(n) for n in names],
                names=names,
                scores=[0.9, 0.8][: len(boxes)],
                image_size=[H, W],
            )
        }

    def segment(self, r: dict[str, Any]) -> dict[str, Any]:
        self.calls["segment"] += 1
        dets = r["detections"]
        return {
            "masks": Masks(rles=[RLE.encode(ellipse_mask(b)) for b in dets.xyxy], scores=[0.9] * len(dets))
        }

    def retrieve(self, r: dict[str, Any]) -> dict[str, Any]:
        self.calls["retrieve"] += 1
        labels = dict.fromkeys(r["detections"].names)
        return {"documents": [Document(id=f"doc-{lab}", text=f"A fact about a {lab}.") for lab in labels]}

    def reason(self, r: dict[str, Any], config: Any) -> dict[str, Any]:
        self.calls["reason"] += 1
        self.configs.append(dict(config.get("configurable") or {}))
        names = " and ".join(f"a {n}" for n in r["detections"].names) or "nothing"
        facts = len(r["documents"])  # documents arrive as Document objects, recorded or fresh
        assert all(isinstance(d, Document) for d in r["documents"])
        return {"answer": f"I see {names}.", "finish_reason": "stop", "facts": facts}

    def compose(self, r: dict[str, Any]) -> dict[str, Any]:
        self.calls["compose"] += 1
        dets, masks = r["detections"], r["masks"]
        objects = [
            ObjectOut(
                label=dets.names[i],
                class_id=dets.class_ids[i],
                score=dets.scores[i],
                box=dets.xyxy[i],
                mask=masks.rles[i] if i < len(masks) else None,
            ).model_dump(mode="json")
            for i in range(len(dets))
        ]
        return {"objects": objects, "sources": [d.id for d in r["documents"]]}

    def builder(self, name: str = "toy_rag") -> GraphBuilder:
        return (
            GraphBuilder(name)
            .input("image", Kind.IMAGE)
            .input("question", Kind.TEXT)
            .output("answer", Kind.TEXT)
            .output("objects", Kind.OBJECTS)
            .output("sources", Kind.SOURCES)
            .node(
                "detect",
                self.detect,
                reads=["image"],
                writes={"detections": Kind.DETECTIONS},
                model=ToyDetector(),
            )
            .node("segment", self.segment, reads=["image", "detections"], writes={"masks": Kind.MASKS})
            .node(
                "retrieve",
                self.retrieve,
                reads=["question", "detections"],
                writes={"documents": Kind.DOCUMENTS},
            )
            .node(
                "reason",
                self.reason,
                reads=["question", "detections", "documents"],
                writes={"answer": Kind.TEXT, "finish_reason": Kind.TEXT, "facts": Kind.NUMBER},
            )
            .node(
                "compose",
                self.compose,
                reads=["detections", "masks", "documents"],
                writes={"objects": Kind.OBJECTS, "sources": Kind.SOURCES},
            )
            .edge("detect", "retrieve")
            .edge("retrieve", "segment")
            .edge("retrieve", "reason")
            .edge(["segment", "reason"], "compose")
        )

    def graph(self) -> Any:
        return self.builder().compile()


def photo(two: bool, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).integers(1, 255, (H, W, 3), dtype=np.uint8)
    img[0, 0, 0] = 1 if two else 0
    return img


def record_parents(
    graph: Any,
    store: TraceStore,
    photos: list[tuple[str, bool]],
    samples: int = 1,
    question: str = "What is in this picture?",
    **recipe: Any,
) -> list[Trace]:
    """Record each photo (id, two objects?) ``samples`` times, as `graphdistill record` does."""
    from graphdistill.recording.recorder import sampling_configurable

    live = record(graph, store)
    for j, (pid, two) in enumerate(photos):
        for i in range(samples):
            live.invoke(
                {"image": photo(two, j), "question": question},
                config={
                    "metadata": {
                        "graphdistill_sample_index": i,
                        "graphdistill_provenance": {"photos": [pid], "recipe": dict(recipe)},
                    },
                    "configurable": sampling_configurable("0" * 8, i),
                },
            )
    return [t for t in store.iter() if t.sample_index == 0]


@pytest.fixture
def store(tmp_path: Path) -> TraceStore:
    return TraceStore(tmp_path / "store")


# --------------------------------------------------------------------------------------------------------
# the mechanism
# --------------------------------------------------------------------------------------------------------


def test_only_the_nodes_after_the_start_run_and_the_replay_is_a_trace_of_the_same_graph(
    store: TraceStore,
) -> None:
    toy = Toy()
    graph = toy.graph()
    (parent,) = record_parents(graph, store, [("p/cat", False)])
    assert dict(toy.calls) == dict.fromkeys(["detect", "segment", "retrieve", "reason", "compose"], 1)
    edit = relabel({"cat": "cup"}, LABELS)
    result = replay(graph, store, [ReplayRequest(parent.id, edit)], samples=2)
    assert (result.recorded, result.skipped, result.failed, result.refused) == (2, 0, 0, [])
    # detect and segment never ran again; the nodes after retrieve ran once per sample
    assert toy.calls == Counter(detect=1, segment=1, retrieve=3, reason=3, compose=3)
    key = replay_key(parent.id, "retrieve", {"kind": "relabel", "map": {"cat": "cup"}})
    assert result.groups == [key]
    replays = [t for t in store.iter() if t.id != parent.id]
    assert sorted(t.id for t in replays) == sorted(replay_trace_id(key, i) for i in range(2))
    for t in replays:
        # the same graph identity and schema as the parent: the filter treats it as that graph's trace
        assert t.graph == parent.graph == graph_identity(graph)[1]
        assert t.metadata["graph_schema"] == parent.metadata["graph_schema"]
        assert t.group_id == t.input_hash == key
        # the parent's inputs (the very same image blob), not the rebuilt state
        assert t.inputs == parent.inputs
        assert [s.node for s in t.spans] == ["retrieve", "reason", "compose"]
        assert replay_of(t) == {
            "parent_trace": parent.id,
            "parent_group": parent.group_id,
            "from_node": "retrieve",
            "edit": {"kind": "relabel", "map": {"cat": "cup"}},
        }
        assert t.provenance.photos == ["p/cat"]
        assert t.metadata["replay_nodes"] == {
            "ran": ["retrieve", "reason", "compose"],
            "reused": ["detect", "segment"],
        }
        # the edit reached every node that ran: the retrieve span saw the relabelled detections
        seen = t.spans[0].reads["detections"]
        assert seen["names"] == ["cup"] and seen["class_ids"] == [LABELS.index("cup")]
        assert t.output["answer"] == "I see a cup."
        assert t.output["sources"] == ["doc-cup"]
        (obj,) = t.output["objects"]
        assert obj["label"] == "cup" and obj["class_id"] == 3
        assert obj["mask"] == parent.output["objects"][0]["mask"]  # the parent's mask, unchanged
    # K samples under the sampling contract; every execution is told where the replay started
    by_index = {c["gd_sample_index"]: c for c in toy.configs[1:]}
    assert by_index[0]["gd_sampling"] is False and by_index[1]["gd_sampling"] is True
    assert {c["gd_replay_from"] for c in toy.configs[1:]} == {"retrieve"}
    assert by_index[0]["gd_seed"] != by_index[1]["gd_seed"]


def test_resume_records_nothing_twice_and_more_samples_add_only_the_new_ones(store: TraceStore) -> None:
    toy = Toy()
    graph = toy.graph()
    (parent,) = record_parents(graph, store, [("p/cat", False)])
    req = ReplayRequest(parent.id, relabel({"cat": "dog"}, LABELS))
    assert replay(graph, store, [req], samples=2).recorded == 2
    calls = dict(toy.calls)
    again = replay(graph, store, [req], samples=2)
    assert (again.recorded, again.skipped) == (0, 2) and dict(toy.calls) == calls
    more = replay(graph, store, [req], samples=3)
    assert (more.recorded, more.skipped) == (1, 2) and toy.calls["reason"] == calls["reason"] + 1
    assert store.count() == 4


def test_state_is_rebuilt_from_the_spans_and_a_later_start_reuses_more(store: TraceStore) -> None:
    toy = Toy()
    graph = toy.graph()
    (parent,) = record_parents(graph, store, [("p/two", True)])
    state = parent_state(
        parent, store, ["detect", "segment", "retrieve"], kinds={"documents": Kind.DOCUMENTS}
    )
    np.testing.assert_array_equal(state["image"], photo(True, 0))
    assert state["question"] == "What is in this picture?"
    assert isinstance(state["detections"], Detections) and state["detections"].names == ["cat", "dog"]
    assert isinstance(state["masks"], Masks) and len(state["masks"]) == 2
    assert [d.id for d in state["documents"]] == ["doc-cat", "doc-dog"]
    assert "answer" not in state  # reason was not asked for
    # from reason: the recorded documents are reused (retrieve does not run); compose runs, since the
    # detections it reads were edited
    res = replay(graph, store, [ReplayRequest(parent.id, relabel({"dog": "bird"}, LABELS), "reason")])
    assert res.recorded == 1
    assert toy.calls == Counter(detect=1, segment=1, retrieve=1, reason=2, compose=2)
    (t,) = [t for t in store.iter() if t.id != parent.id]
    assert [s.node for s in t.spans] == ["reason", "compose"]
    assert t.output["answer"] == "I see a cat and a bird."
    assert t.output["sources"] == ["doc-cat", "doc-dog"]  # the parent's documents
    assert [o["label"] for o in t.output["objects"]] == ["cat", "bird"]


def test_which_nodes_run_again() -> None:
    graph = Toy().graph()
    edit_fields = ("detections", "masks")
    nodes = replay_nodes(graph, "retrieve", edit_fields)
    assert nodes.run == ("retrieve", "reason", "compose")
    assert nodes.reused == ("detect", "segment") == nodes.stood_in  # the edit supplies what both wrote
    # without an edit nothing changed that segment reads: it keeps its recorded masks
    assert replay_nodes(graph, "retrieve").run == ("retrieve", "reason", "compose")
    # an edit of the documents only: reason and compose read them, segment does not
    assert replay_nodes(graph, "reason", ("documents",)).run == ("reason", "compose")
    # from segment with no edit: compose reads the masks, reason reads nothing segment writes
    assert replay_nodes(graph, "segment").run == ("segment", "compose")
    with pytest.raises(ReplayGraphError, match="node 'detect' writes only fields the edit supplies"):
        replay_nodes(graph, "detect", edit_fields)
    with pytest.raises(ReplayGraphError, match="'nope' is not a node of this graph"):
        replay_nodes(graph, "nope")


def test_a_hand_written_stategraph_replays_everything_after_the_start(store: TraceStore) -> None:
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class S(TypedDict, total=False):
        x: int
        y: int
        z: int
        w: int

    calls: Counter[str] = Counter()

    def node(name: str, fn: Any) -> Any:
        def run(s: S) -> dict[str, int]:
            calls[name] += 1
            return fn(s)

        return run

    g = StateGraph(S)
    g.add_node("a", node("a", lambda s: {"y": s["x"] + 1}))
    g.add_node("b", node("b", lambda s: {"z": s["y"] * 10}))
    g.add_node("c", node("c", lambda s: {"w": s["z"] + s["y"]}))
    g.add_edge(START, "a")
    g.add_edge("a", "b")
    g.add_edge("b", "c")
    g.add_edge("c", END)
    graph = g.compile()
    record(graph, store).invoke({"x": 1})
    (parent,) = store.iter()
    assert parent.output == {"x": 1, "y": 2, "z": 20, "w": 22}
    from graphdistill.recording.replay import Edit

    def set_y(state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "y": 5}

    edit = Edit("set_y", {"y": 5}, ("y",), set_y)
    res = replay(graph, store, [ReplayRequest(parent.id, edit, "b")])
    assert res.recorded == 1 and calls == Counter(a=1, b=2, c=2)
    (t,) = [t for t in store.iter() if t.id != parent.id]
    assert t.output == {"x": 1, "y": 5, "z": 50, "w": 55} and t.inputs == {"x": 1}
    assert t.graph == parent.graph


def test_a_conditional_route_after_the_start_is_decided_again(store: TraceStore) -> None:
    calls: Counter[str] = Counter()

    def count(name: str, fn: Any) -> Any:
        def run(r: dict[str, Any]) -> dict[str, Any]:
            calls[name] += 1
            return fn(r)

        return run

    b = (
        GraphBuilder("routed")
        .input("x", Kind.NUMBER)
        .output("out", Kind.TEXT)
        .node("prep", count("prep", lambda r: {"y": r["x"] * 2}), reads=["x"], writes=["y"])
        .node("judge", count("judge", lambda r: {"big": r["y"] > 10}), reads=["y"], writes=["big"])
        .node("small", count("small", lambda r: {"out": "small"}), reads=["y"], writes=["out"])
        .node("large", count("large", lambda r: {"out": "large"}), reads=["y"], writes=["out"])
        .edge("prep", "judge")
        .conditional("judge", lambda s: s["big"], {True: "large", False: "small"})
    )
    graph = b.compile()
    record(graph, store).invoke({"x": 2})
    (parent,) = store.iter()
    assert parent.output == {"out": "small"}
    from graphdistill.recording.replay import Edit

    edit = Edit("bigger", {"y": 50}, ("y",), lambda s: {**s, "y": 50})
    assert replay(graph, store, [ReplayRequest(parent.id, edit, "judge")]).recorded == 1
    (t,) = [t for t in store.iter() if t.id != parent.id]
    assert t.output == {"out": "large"} and [s.node for s in t.spans] == ["judge", "large"]
    assert calls == Counter(prep=1, judge=2, small=1, large=1)


def test_bad_requests_fail_before_anything_runs_or_is_stored(store: TraceStore, tmp_path: Path) -> None:
    toy = Toy()
    graph = toy.graph()
    (parent,) = record_parents(graph, store, [("p/cat", False)])
    edit = relabel({"cat": "cup"}, LABELS)
    good = ReplayRequest(parent.id, edit)
    with pytest.raises(ReplayError, match="'nope': not a node of graph toy_rag"):
        replay(graph, store, [good, ReplayRequest(parent.id, edit, "nope")])
    with pytest.raises(ReplayError, match="trace 'missing': not in trace store"):
        replay(graph, store, [good, ReplayRequest("missing", edit)])
    other = Toy().builder("other_graph").compile()
    with pytest.raises(
        ReplayError, match="recorded by graph toy_rag .* not by the graph given \\(other_graph"
    ):
        replay(other, store, [good])
    with pytest.raises(ReplayError, match="holds no trace of graph other_graph"):
        replay_store(other, store, n=2)
    with pytest.raises(ReplayError, match="--edits relabel,shuffle: unknown kind"):
        replay_store(graph, store, n=2, edits=["relabel", "shuffle"])
    assert store.count() == 1 and toy.calls["retrieve"] == 1
    # an edit that does not fit its parent is refused with the reason; the others still run
    res = replay(graph, store, [ReplayRequest(parent.id, drop(3)), good])
    assert res.recorded == 1 and len(res.refused) == 1 and "does not apply" in res.refused[0][1]


def test_held_out_inputs_are_never_replayed(store: TraceStore) -> None:
    toy = Toy()
    graph = toy.graph()
    record_parents(graph, store, [("p/a", False)], heldout=True, kind="heldout")
    record_parents(graph, store, [("skimage/coffee", True)])  # a default held-out photo
    parents = list(store.iter())
    res = replay(graph, store, [ReplayRequest(p.id, relabel({"cat": "cup"}, LABELS)) for p in parents])
    assert res.recorded == 0 and len(res.refused) == 2
    assert all("held-out input" in why for _, why in res.refused)
    planned = replay_store(graph, store, n=4)
    assert planned.recorded == 0 and len(planned.refused) == 2 and store.count() == 2


# --------------------------------------------------------------------------------------------------------
# the edits and the planner
# --------------------------------------------------------------------------------------------------------


def _state() -> dict[str, Any]:
    boxes = [[5.0, 5.0, 25.0, 30.0], [35.0, 10.0, 55.0, 35.0], [0.0, 0.0, 10.0, 10.0]]
    names = ["cat", "dog", "cat"]
    return {
        "image": photo(True),
        "detections": Detections(
            xyxy=boxes,
            class_ids=[LABELS.index(n) for n in names],
            names=names,
            scores=[0.9, 0.8, 0.7],
            image_size=[H, W],
        ),
        "masks": Masks(rles=[RLE.encode(ellipse_mask(b)) for b in boxes], scores=[0.95, 0.85, 0.75]),
    }


def test_a_relabel_asks_the_question_about_the_new_label_and_records_it(store: TraceStore) -> None:
    assert relabel_text("How many cats? The cat, the dog.", {"cat": "dog", "dog": "cat"}) == (
        "How many dogs? The dog, the cat."
    )
    assert relabel_text("A category of cats", {"cat": "traffic light"}) == "A category of traffic lights"
    graph = Toy().graph()
    (parent,) = record_parents(graph, store, [("p/cat", False)], question="Where is the cat?")
    replay(graph, store, [ReplayRequest(parent.id, relabel({"cat": "cup"}, LABELS))], samples=1)
    (t,) = [t for t in store.iter() if t.id != parent.id]
    # the replay's recorded input is the question it was asked: about the cup its detections now show
    assert t.inputs["question"] == "Where is the cup?" and parent.inputs["question"] == "Where is the cat?"
    assert t.inputs["image"] == parent.inputs["image"]
    assert t.spans[0].reads["question"] == "Where is the cup?"


def test_relabel_changes_class_ids_and_names_together() -> None:
    before = _state()
    after = relabel({"cat": "bird"}, LABELS).apply(before)
    dets = after["detections"]
    assert dets.names == ["bird", "dog", "bird"] and dets.class_ids == [4, 2, 4]
    assert dets.xyxy == before["detections"].xyxy and dets.scores == before["detections"].scores
    assert after["masks"] is before["masks"]
    assert before["detections"].names == ["cat", "dog", "cat"]  # the input state is left as it was
    with pytest.raises(ValueError, match="not in the detector's label set"):
        relabel({"cat": "unicorn"}, LABELS)
    with pytest.raises(ValueError, match="no detection is a cup"):
        relabel({"cup": "bird"}, LABELS).apply(before)


def test_drop_and_duplicate_edit_the_masks_with_the_detections() -> None:
    before = _state()
    dropped = drop(1, "dog").apply(before)
    assert dropped["detections"].names == ["cat", "cat"]
    assert dropped["detections"].xyxy == [before["detections"].xyxy[i] for i in (0, 2)]
    assert dropped["masks"].rles == [before["masks"].rles[i] for i in (0, 2)]
    assert dropped["masks"].scores == [0.95, 0.75]
    dup = duplicate(0, "cat").apply(before)
    d = dup["detections"]
    assert d.names == ["cat", "dog", "cat", "cat"] and d.class_ids[-1] == 1 and d.scores[-1] == 0.9
    assert d.xyxy[-1] == [W - 25.0, 5.0, W - 5.0, 30.0]  # mirrored left to right
    mirrored = dup["masks"].rles[-1].decode()
    np.testing.assert_array_equal(mirrored, before["masks"].rles[0].decode()[:, ::-1])
    xs = np.nonzero(mirrored)[1]
    assert xs.min() >= W - 25 and xs.max() < W - 5  # the mirrored mask lies in the mirrored box
    with pytest.raises(ValueError, match="object 1 is a 'dog', not a 'cat'"):
        drop(1, "cat").apply(before)
    with pytest.raises(IndexError, match="object 7 does not exist"):
        duplicate(7).apply(before)
    # descriptions round-trip into the same edits
    for e in (relabel({"cat": "bird"}, LABELS), drop(1, "dog"), duplicate(0, "cat")):
        again = edit_from_description(json.loads(json.dumps(e.describe())), LABELS)
        assert again.describe() == e.describe()
        assert again.apply(before)["detections"] == e.apply(before)["detections"]


def _fake_parent(tid: str, names: list[str]) -> Trace:
    from graphdistill.trace import NodeSpan, encode_value

    dets = Detections(
        xyxy=[[0.0, 0.0, 1.0, 1.0]] * len(names),
        class_ids=[0] * len(names),
        names=names,
        scores=[0.5] * len(names),
        image_size=[2, 2],
    )
    span = NodeSpan(node="detect", start=0.0, end=1.0, writes={"detections": encode_value(dets, {})})
    return Trace(
        id=tid, graph={"name": "g", "hash": "h"}, inputs={}, spans=[span], group_id=tid, input_hash=tid
    )


def test_the_planner_covers_every_class_evenly_and_is_deterministic() -> None:
    from graphdistill.teachers.coco import COCO_CLASSES

    labels = list(COCO_CLASSES)
    kinds_of_photo = [["cat", "dog"], ["cat"], ["person"]]
    parents = [_fake_parent(f"t{i}", kinds_of_photo[i % 3]) for i in range(30)]
    plan = plan_replays(parents, labels, 160, seed=3, edits=["relabel"])
    assert len(plan) == 160 and len({r.key() for r in plan}) == 160
    targets: Counter[str] = Counter()
    by_id = {p.id: p for p in parents}
    for r in plan:
        desc = r.edit.describe()
        assert desc["kind"] == "relabel" and r.from_node == "retrieve"
        present = set(by_id[r.parent].spans[0].writes["detections"]["names"])
        assert set(desc["map"]) == present  # every class of the parent is relabelled
        assert not set(desc["map"].values()) & present  # to classes absent from it
        assert len(set(desc["map"].values())) == len(desc["map"])
        targets.update(desc["map"].values())
    assert set(targets) == set(labels)  # every class of the label set is covered
    assert max(targets.values()) - min(targets.values()) <= 1  # about evenly
    again = plan_replays(parents, labels, 160, seed=3, edits=["relabel"])
    assert [r.key() for r in again] == [r.key() for r in plan]
    assert [r.key() for r in plan_replays(parents, labels, 160, seed=4, edits=["relabel"])] != [
        r.key() for r in plan
    ]
    # all three kinds: relabels take most of the budget; drops only where two objects or more exist
    mixed = plan_replays(parents, labels, 40, seed=0)
    kinds = Counter(r.edit.kind for r in mixed)
    assert kinds == Counter(relabel=32, drop=4, duplicate=4)
    assert all(
        len(by_id[r.parent].spans[0].writes["detections"]["names"]) >= 2
        for r in mixed
        if r.edit.kind == "drop"
    )
    # only single-object parents: no drops possible, their share goes to the other kinds
    singles = [p for p in parents if len(p.spans[0].writes["detections"]["names"]) == 1]
    assert "drop" not in Counter(r.edit.kind for r in plan_replays(singles, labels, 20, seed=0))
    assert len(plan_replays(singles, labels, 20, seed=0)) == 20


def test_the_label_set_comes_from_the_graphs_detector() -> None:
    assert detector_labels(Toy().graph()) == LABELS
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    from graphdistill.teachers.coco import COCO_CLASSES

    class S(TypedDict, total=False):
        x: int

    g = StateGraph(S)
    g.add_node("a", lambda s: {"x": 1})
    g.add_edge(START, "a")
    g.add_edge("a", END)
    assert detector_labels(g.compile()) == list(COCO_CLASSES)


def test_replay_store_plans_and_runs_with_samples(store: TraceStore) -> None:
    toy = Toy()
    graph = toy.graph()
    record_parents(graph, store, [("p/a", False), ("p/b", True), ("p/c", True)], samples=2)
    assert store.count() == 6
    res = replay_store(graph, store, n=10, samples=2, seed=1, batch_size=8)
    assert res.failed == 0 and res.refused == [] and len(res.groups) == 10 and res.recorded == 20
    assert toy.calls["detect"] == 6 and toy.calls["segment"] == 6 and toy.calls["reason"] == 26
    replays = [t for t in store.iter() if replay_of(t)]
    kinds = Counter(replay_of(t)["edit"]["kind"] for t in replays if t.sample_index == 0)  # type: ignore[index]
    assert kinds == Counter(relabel=8, drop=1, duplicate=1)
    assert all(
        replay_of(t)["parent_trace"] in {p.id for p in store.iter() if not replay_of(p)} for t in replays
    )  # type: ignore[index]
    # parents are sample 0 of each input; replays are never parents of replays
    again = replay_store(graph, store, n=10, samples=2, seed=1)
    assert (again.recorded, again.skipped) == (0, 20)


# --------------------------------------------------------------------------------------------------------
# filtering: grouped, voted and checked like any trace; split with the parent's photo; the replay column
# --------------------------------------------------------------------------------------------------------


def test_replays_are_filtered_split_with_their_parent_and_carry_the_replay_column(
    store: TraceStore, tmp_path: Path
) -> None:
    from graphdistill.dataset import open_dataset
    from graphdistill.filter.filtering import FilterConfig, filter_store

    toy = Toy()
    graph = toy.graph()
    photos = [(f"p/{i}", bool(i % 2)) for i in range(12)]
    record_parents(graph, store, photos, samples=2)
    res = replay_store(graph, store, n=24, samples=2, seed=0)
    assert res.recorded == 48
    # one more replay whose answer names a class its (edited) detections do not hold: the checks drop it
    # like any trace (the same graph, whose reason node now answers wrongly)
    liar = Toy()
    liar.reason = lambda r, config: {"answer": "I see a giraffe.", "finish_reason": "stop", "facts": 0}  # type: ignore[method-assign]
    parent = next(t for t in store.iter() if not replay_of(t) and t.sample_index == 0)
    bad = ReplayRequest(parent.id, relabel({"cat": "bird", "dog": "person"}, LABELS))
    assert replay(liar.graph(), store, [bad], samples=2).recorded == 2
    result = filter_store(store, tmp_path / "ds", FilterConfig(dedup=True, fractions=(0.5, 0.25, 0.25)))
    summary = result.summary()
    assert summary["groups"] == 12 + 25
    assert summary["replays"] == {"groups": 25, "kept": 24, "dropped": 1}
    (dropped,) = [d for d in result.decisions if not d.kept]
    assert dropped.group_id == bad.key() and dropped.rule == "answer_class_not_detected"
    ds = open_dataset(tmp_path / "ds")
    rows = ds.all_rows()
    assert len(rows) == 36  # near-duplicate removal does not take a replay for a copy of its parent
    parents = {t.id: t for t in store.iter() if not replay_of(t)}
    split_of_photo: dict[str, str] = {}
    for r in rows:
        for p in r.provenance_photos:
            assert split_of_photo.setdefault(p, r.split) == r.split  # a photo lives in one split
    replay_rows = [r for r in rows if r.replay is not None]
    assert len(replay_rows) == 24
    for r in replay_rows:
        info = r.replay
        assert info is not None
        assert set(info) == {"parent_trace", "from_node", "edit"} and info["from_node"] == "retrieve"
        parent_t = parents[info["parent_trace"]]
        parent_row = next(x for x in rows if x.id == parent_t.group_id)
        assert r.split == parent_row.split  # kept with its parent's photo
        assert r.image == parent_row.image and r.question == parent_row.question
        if info["edit"]["kind"] == "relabel":
            assert {o.label for o in r.objects} == set(info["edit"]["map"].values())
    assert all(r.replay is None for r in rows if r not in replay_rows)
    report = (tmp_path / "ds" / "report" / "report.html").read_text()
    assert "Counterfactual replays among them: 25 (24 kept, 1 dropped)" in report


def test_replays_of_photo_less_inputs_stay_with_their_parent_in_the_split() -> None:
    from graphdistill.filter.splits import Item, assign_splits

    items = [Item(f"g{i}", ()) for i in range(20)]
    items += [Item(f"r{i}", (), tied_to=(f"g{i}",)) for i in range(20)]
    split = assign_splits(items, (0.6, 0.2, 0.2), seed=1)
    assert len(set(split.values())) == 3
    assert all(split[f"r{i}"] == split[f"g{i}"] for i in range(20))


def test_a_dataset_written_before_the_replay_column_still_loads(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from graphdistill.dataset import make_synthetic_dataset, open_dataset

    make_synthetic_dataset(tmp_path / "old", n=6, seed=0)
    for split in ("train", "val", "test"):
        path = tmp_path / "old" / f"{split}.parquet"
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["replay"]), path)
    rows = open_dataset(tmp_path / "old").all_rows()
    assert len(rows) == 6 and all(r.replay is None for r in rows)


# --------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------

TOY_SPEC = f"{Path(__file__).resolve()}:cli_graph"


def cli_graph() -> Any:
    return Toy().graph()


def test_replay_command(store: TraceStore, capsys: pytest.CaptureFixture[str]) -> None:
    from graphdistill.cli import main

    record_parents(cli_graph(), store, [("p/a", False), ("p/b", True)])
    root = str(store.root)
    assert main(["replay", root, "--graph", TOY_SPEC, "--n", "4", "--samples", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recorded"] == 8 and out["groups"] == 4 and out["failed"] == 0
    assert main(["replay", root, "--graph", TOY_SPEC, "--n", "4", "--samples", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 8
    n = store.count()
    for argv, message in [
        (["--from-node", "nope"], "--from-node 'nope': not a node of the graph"),
        (["--edits", "relabel,swap"], "unknown kind(s) ['swap']"),
        (["--samples", "0"], "--samples must be >= 1"),
    ]:
        assert main(["replay", root, "--graph", TOY_SPEC, "--n", "2", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(["replay", str(store.root.parent / "nowhere"), "--graph", TOY_SPEC, "--n", "2"]) == 2
    assert "not a trace store" in capsys.readouterr().err
    assert store.count() == n


# --------------------------------------------------------------------------------------------------------
# the real visual_rag
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_visual_rag_replay_relabels_the_cat_without_running_detect_or_segment(tmp_path: Path) -> None:
    import _models
    from graphdistill.graphs.visual_rag import visual_rag

    calls: Counter[str] = Counter()

    class Counting:
        def __init__(self, role: str, inner: Any) -> None:
            self.role, self.inner = role, inner

        def __getattr__(self, name: str) -> Any:
            value = getattr(self.inner, name)
            if name in ("detect", "segment"):
                calls[self.role] += 1
            return value

    teachers = {
        "detector": Counting("detector", _models.detector()),
        "segmenter": Counting("segmenter", _models.segmenter()),
        "llm": _models.llm(),
        "retriever": _models.retriever(),
    }
    graph = visual_rag(teachers=teachers)
    store = TraceStore(tmp_path / "store")
    image = _models.builtin_image("skimage/chelsea")
    record(graph, store).invoke(
        {"image": image, "question": "What is in this picture?"},
        config={"metadata": {"graphdistill_provenance": {"photos": ["skimage/chelsea"]}}},
    )
    (parent,) = store.iter()
    assert parent.status == "ok" and calls == Counter(detector=1, segmenter=1)
    labels = detector_labels(graph)
    assert labels == list(_models.detector().names) and "cup" in labels
    cats = [o for o in parent.output["objects"] if o["label"] == "cat"]
    assert cats and "cup" not in {o["label"] for o in parent.output["objects"]}
    t0 = time.perf_counter()
    res = replay(graph, store, [ReplayRequest(parent.id, relabel({"cat": "cup"}, labels))])
    seconds = time.perf_counter() - t0
    assert res.recorded == 1 and res.failed == 0, res
    assert calls == Counter(detector=1, segmenter=1)  # neither ran again
    (t,) = [t for t in store.iter() if t.id != parent.id]
    assert [s.node for s in t.spans] == ["retrieve", "reason", "compose"]
    assert [o["label"] for o in t.output["objects"] if o["label"] in ("cat", "cup")] == ["cup"] * len(cats)
    assert [o["mask"] for o in t.output["objects"]] == [o["mask"] for o in parent.output["objects"]]
    assert any(s.startswith("coco/cup/") for s in t.output["sources"]), t.output["sources"]
    assert not any(s.startswith("coco/cat/") for s in t.output["sources"]), t.output["sources"]
    assert t.output["answer"].strip() and t.output["answer"] != parent.output["answer"]
    print(f"replay of one trace: {seconds:.2f}s; answer: {t.output['answer']!r}")
