"""The declarative graph builder, with plain Python nodes (no models)."""

from __future__ import annotations

import asyncio
import operator
import threading
from typing import Annotated, Any, TypedDict

import pytest

from graphdistill.graphs import END, START, GraphBuilder, GraphBuildError, NodeError, as_teacher, schema_of
from graphdistill.trace import GraphSchema, Kind


def _diamond(name: str = "diamond", barrier: threading.Barrier | None = None) -> GraphBuilder:
    """x -> a (x+1), b (x*2) in parallel -> c (a+b)."""

    def a(r: dict[str, Any]) -> dict[str, Any]:
        if barrier is not None:
            barrier.wait()  # only passes when b runs at the same time
        return {"p": r["x"] + 1}

    def b(r: dict[str, Any]) -> dict[str, Any]:
        if barrier is not None:
            barrier.wait()
        return {"q": r["x"] * 2}

    return (
        GraphBuilder(name)
        .input("x", Kind.NUMBER)
        .output("y", Kind.NUMBER)
        .node("a", a, reads=["x"], writes={"p": Kind.NUMBER})
        .node("b", b, reads=["x"], writes={"q": Kind.NUMBER})
        .node("c", lambda r: {"y": r["p"] + r["q"]}, reads=["p", "q"], writes=["y"])
        .edge("a", "c")
        .edge("b", "c")
    )


def test_sequential_default_chain_in_declaration_order() -> None:
    g = (
        GraphBuilder("chain")
        .input("text", Kind.TEXT)
        .output("out", Kind.TEXT)
        .node("upper", lambda r: {"u": r["text"].upper()}, reads=["text"], writes=["u"])
        .node("exclaim", lambda r: {"out": r["u"] + "!"}, reads=["u"], writes=["out"])
        .compile()
    )
    assert g.invoke({"text": "hi"}) == {"out": "HI!"}
    assert [next(iter(u)) for u in g.stream({"text": "hi"})] == ["upper", "exclaim"]


def test_fan_out_runs_in_one_superstep_and_fan_in_waits() -> None:
    barrier = threading.Barrier(2, timeout=10)
    g = _diamond(barrier=barrier).compile()
    assert g.invoke({"x": 3}) == {"y": 4 + 6}
    steps = [
        ev["step"] for ev in g.stream({"x": 3}, stream_mode="debug") if ev["type"] == "task"
    ]  # one "task" event per node
    assert len(steps) == 3 and steps[0] == steps[1] and steps[2] == steps[0] + 1


def test_explicit_fan_in_edge_list() -> None:
    b = _diamond()
    b._decl.edges.clear()
    b.edge(START, "a").edge(START, "b").edge(["a", "b"], "c").edge("c", END)
    assert b.compile().invoke({"x": 1}) == {"y": 4}


def test_conditional_routes() -> None:
    g = (
        GraphBuilder("cond")
        .input("x", Kind.NUMBER)
        .output("y", Kind.TEXT)
        .node("check", lambda r: {"big": r["x"] > 10}, reads=["x"], writes=["big"])
        .node("large", lambda r: {"y": "large"}, reads=["x"], writes=["y"])
        .node("small", lambda r: {"y": "small"}, reads=["x"], writes=["y"])
        .conditional("check", lambda s: "L" if s["big"] else "S", {"L": "large", "S": "small"})
        .compile()
    )
    assert g.invoke({"x": 50}) == {"y": "large"}
    assert g.invoke({"x": 1}) == {"y": "small"}


def test_all_langgraph_entry_points_agree() -> None:
    g = _diamond().compile()
    inputs = [{"x": 1}, {"x": 2}, {"x": 7}]
    expected = [{"y": x["x"] + 1 + x["x"] * 2} for x in inputs]
    assert [g.invoke(x) for x in inputs] == expected
    assert g.batch(inputs) == expected
    # stream_mode="values" shows the whole state (intermediates too); its outputs match
    assert [{"y": list(g.stream(x, stream_mode="values"))[-1]["y"]} for x in inputs] == expected

    async def run_async() -> tuple[list[Any], list[Any], list[Any]]:
        one = [await g.ainvoke(x) for x in inputs]
        many = await g.abatch(inputs)
        streamed = []
        for x in inputs:
            last = None
            async for ev in g.astream(x, stream_mode="values"):
                last = ev
            streamed.append({"y": last["y"]} if last else None)
        return one, many, streamed

    one, many, streamed = asyncio.run(run_async())
    assert one == many == streamed == expected


def test_config_reaches_nodes_and_survives_with_config() -> None:
    def scale(r: dict[str, Any], config: Any) -> dict[str, Any]:
        return {"y": r["x"] * config["configurable"].get("factor", 1)}

    g = GraphBuilder("cfg").input("x", Kind.NUMBER).output("y", Kind.NUMBER)
    g = g.node("scale", scale, reads=["x"], writes=["y"]).compile()
    assert g.invoke({"x": 3}) == {"y": 3}
    bound = g.with_config(configurable={"factor": 5})
    assert bound.invoke({"x": 3}) == {"y": 15}
    assert schema_of(bound) == schema_of(g)


def test_undeclared_write_names_the_node() -> None:
    g = (
        GraphBuilder("bad")
        .input("x", Kind.NUMBER)
        .output("y", Kind.NUMBER)
        .node("sneaky", lambda r: {"y": 1, "z": 2}, reads=["x"], writes=["y"])
        .compile()
    )
    with pytest.raises(NodeError, match=r"node 'sneaky' failed: .*undeclared field\(s\) 'z'"):
        g.invoke({"x": 1})


def test_node_exception_names_the_node() -> None:
    def boom(r: dict[str, Any]) -> dict[str, Any]:
        raise ZeroDivisionError("division by zero")

    g = GraphBuilder("boom").input("x", Kind.NUMBER).output("y", Kind.NUMBER)
    g = g.node("detect", boom, reads=["x"], writes=["y"]).compile()
    with pytest.raises(NodeError, match=r"node 'detect' failed: ZeroDivisionError: division by zero") as ei:
        g.invoke({"x": 1})
    assert ei.value.node == "detect" and isinstance(ei.value.__cause__, ZeroDivisionError)
    with pytest.raises(NodeError, match="node 'detect' failed"):
        asyncio.run(g.ainvoke({"x": 1}))


def test_missing_input_names_node_and_field() -> None:
    g = _diamond().compile()
    with pytest.raises(NodeError, match=r"node '(a|b)' failed: it reads 'x', which has no value"):
        g.invoke({})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.node("d", lambda r: {}, reads=["nope"], writes=[]), r"node 'd' reads 'nope'"),
        (lambda b: b.edge("c", "ghost"), r"unknown node 'ghost'"),
        (lambda b: b.edge("ghost", "c"), r"unknown node 'ghost'"),
        (lambda b: b.output("z", Kind.TEXT), r"output 'z' is written by no node"),
        (lambda b: b.conditional("a", lambda s: "k", {"k": "ghost"}), r"route 'k' goes to unknown node"),
        (lambda b: b.node("p", lambda r: {}, reads=["x"], writes=[]), r"same name as a state field"),
        (  # d reads c's output but nothing orders d after c: it would start with the graph
            lambda b: b.node("d", lambda r: {}, reads=["y"], writes=[]).edge("a", "d"),
            r"node 'd' reads \['y'\], but no node that runs before it writes them \(written by \['c'\]\)",
        ),
    ],
)
def test_bad_declarations_fail_at_compile(mutate: Any, message: str) -> None:
    b = _diamond()
    mutate(b)
    with pytest.raises(GraphBuildError, match=message):
        b.compile()


def test_async_node_function_is_refused_clearly() -> None:
    async def fetch(r: dict[str, Any]) -> dict[str, Any]:
        return {}

    with pytest.raises(GraphBuildError, match="node 'fetch': async node functions are not supported"):
        _diamond().node("fetch", fetch, reads=["x"], writes=[])


def test_duplicate_node_is_refused() -> None:
    with pytest.raises(GraphBuildError, match="node 'a' is declared twice"):
        _diamond().node("a", lambda r: {}, reads=[], writes=[])


def test_schema_is_machine_readable_and_hash_stable() -> None:
    s1 = schema_of(_diamond().compile())
    s2 = schema_of(_diamond().compile())
    assert isinstance(s1, GraphSchema)
    assert s1.definition_hash == s2.definition_hash and len(s1.definition_hash) == 64
    assert s1.input_kinds() == {"x": Kind.NUMBER} and s1.output_kinds() == {"y": Kind.NUMBER}
    assert s1.nodes == ["a", "b", "c"]
    assert GraphSchema.model_validate_json(s1.model_dump_json()) == s1

    changed_edge = _diamond()
    changed_edge._decl.edges[1] = (("a",), "c")  # b no longer feeds c: a different graph
    changed_edge.edge("b", "c").edge("a", "b")
    assert schema_of(changed_edge.compile()).definition_hash != s1.definition_hash

    class FakeModel:
        model_id = "m1"
        weights_sha256 = "0" * 64

    with_model = _diamond()
    with_model.nodes["a"].model = FakeModel()
    assert schema_of(with_model.compile()).definition_hash != s1.definition_hash
    assert schema_of(_diamond(name="other").compile()).definition_hash != s1.definition_hash


def test_model_metadata_reaches_callbacks() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Model:
        model_id = "toy/model"
        weights_sha256 = "ab" * 32

    seen: dict[str, dict[str, Any]] = {}

    class Spy(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            meta = kw.get("metadata") or {}
            if "langgraph_node" in meta:
                seen[meta["langgraph_node"]] = meta

    b = _diamond()
    b.nodes["a"].model = Model()
    b.compile().invoke({"x": 1}, config={"callbacks": [Spy()]})
    assert seen["a"]["graphdistill_model_id"] == "toy/model"
    assert seen["a"]["graphdistill_weights_sha256"] == "ab" * 32
    assert "graphdistill_model_id" not in seen["b"]
    assert seen["c"]["graphdistill_reads"] == ["p", "q"]


def test_hand_written_state_graph_as_teacher() -> None:
    from langgraph.graph import StateGraph

    class State(TypedDict, total=False):
        question: str
        words: Annotated[list[str], operator.add]
        answer: str

    def split(s: State) -> dict[str, Any]:
        return {"words": s["question"].split()}

    def count(s: State) -> dict[str, Any]:
        return {"answer": f"{len(s['words'])} words"}

    sg = StateGraph(State)
    sg.add_node("split", split)
    sg.add_node("count", count)
    sg.add_edge(START, "split")
    sg.add_edge("split", "count")
    sg.add_edge("count", END)
    teacher = as_teacher(sg, name="counter", inputs={"question": Kind.TEXT}, outputs={"answer": Kind.TEXT})
    assert teacher.invoke({"question": "how many words here"})["answer"] == "4 words"
    schema = schema_of(teacher)
    assert schema.name == "counter" and set(schema.nodes) == {"split", "count"}
    assert schema.output_kinds() == {"answer": Kind.TEXT} and len(schema.definition_hash) == 64
    again = as_teacher(sg.compile(), name="counter", inputs={"question": "text"}, outputs={"answer": "text"})
    assert schema_of(again).definition_hash == schema.definition_hash
    with pytest.raises(GraphBuildError, match="output 'nope' is not a state field"):
        as_teacher(sg, name="counter", inputs={"question": Kind.TEXT}, outputs={"nope": Kind.TEXT})


def test_schema_of_rejects_plain_graph() -> None:
    from langgraph.graph import StateGraph

    class S(TypedDict):
        a: int

    sg = StateGraph(S)
    sg.add_node("n", lambda s: {"a": 1})
    sg.add_edge(START, "n")
    with pytest.raises(GraphBuildError, match="not a teacher graph"):
        schema_of(sg.compile())


def test_reads_pixels_follows_the_declared_dataflow_and_stops_at_detections() -> None:
    from graphdistill.trace import FieldSpec, NodeFlow

    def schema(**flows: tuple[list[str], dict[str, Kind]]) -> GraphSchema:
        return GraphSchema(
            name="g",
            inputs=[FieldSpec(name="image", kind=Kind.IMAGE), FieldSpec(name="q", kind=Kind.TEXT)],
            outputs=[FieldSpec(name="answer", kind=Kind.TEXT)],
            dataflow={n: NodeFlow(reads=r, writes=w) for n, (r, w) in flows.items()},
        )

    det = (["image"], {"dets": Kind.DETECTIONS})
    # the answer is made from the detections and the question: pixels reach it only as detected objects
    assert schema(det=det, llm=(["q", "dets"], {"answer": Kind.TEXT})).reads_pixels("answer") is False
    # ... through an intermediate text field too (a prompt built from the detections)
    prompt = (["dets", "q"], {"prompt": Kind.TEXT})
    assert schema(det=det, p=prompt, llm=(["prompt"], {"answer": Kind.TEXT})).reads_pixels("answer") is False
    # a node that looks at the image itself (a VLM), or at masks made from it, brings the pixels
    assert schema(vlm=(["image", "q"], {"answer": Kind.TEXT})).reads_pixels("answer") is True
    seg = (["image", "dets"], {"masks": Kind.MASKS})
    assert schema(det=det, seg=seg, llm=(["masks"], {"answer": Kind.TEXT})).reads_pixels("answer") is True
    emb = (["image"], {"vec": Kind.EMBEDDING})
    docs = (["vec", "q"], {"docs": Kind.DOCUMENTS})
    assert schema(emb=emb, r=docs, llm=(["docs"], {"answer": Kind.TEXT})).reads_pixels("answer") is True
    # a loop in the declared reads ends; a graph that declares no dataflow is unknown, not "no pixels"
    loop = schema(
        a=(["q", "b_out"], {"a_out": Kind.TEXT}), b=(["a_out"], {"b_out": Kind.TEXT, "answer": Kind.TEXT})
    )
    assert loop.reads_pixels("answer") is False
    assert schema().reads_pixels("answer") is None
    # a builder's schema carries its dataflow, and it survives JSON
    s = schema_of(_diamond().compile())
    assert s.dataflow["c"].reads == ["p", "q"] and s.dataflow["b"].writes == {"q": Kind.NUMBER}
    assert GraphSchema.model_validate_json(s.model_dump_json()).dataflow == s.dataflow
