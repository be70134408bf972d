"""Recording any LangGraph graph by adding one callback: sync, async, invoke, batch, stream, errors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pytest
from langgraph.graph import END, START, StateGraph

from graphdistill.recording.recorder import TraceRecorder, graph_identity, record
from graphdistill.store.trace_store import TraceStore
from graphdistill.trace import FieldSpec, GraphSchema, Kind, content_hash, encode_value


class State(TypedDict, total=False):
    image: Any
    question: str
    mask: Any
    answer: str


def seg(state: State) -> dict[str, Any]:
    return {"mask": state["image"][..., 0] > 100}


def answer(state: State) -> dict[str, Any]:
    if state["question"] == "explode":
        raise ValueError("the answer node refuses")
    return {"answer": f"{state['question']}: {int(state['mask'].sum())}"}


def toy_graph() -> Any:
    g = StateGraph(State)
    g.add_node(
        "seg", seg, metadata={"graphdistill_model_id": "toy-seg", "graphdistill_weights_sha256": "ab" * 32}
    )
    g.add_node("answer", answer)
    g.add_edge(START, "seg")
    g.add_edge("seg", "answer")
    g.add_edge("answer", END)
    return g.compile()


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (16, 20, 3), dtype=np.uint8)


def check_trace(store: TraceStore, trace_id: str, inputs: dict[str, Any], result: dict[str, Any]) -> None:
    t = store.get(trace_id)
    assert t.status == "ok" and t.error is None
    np.testing.assert_array_equal(store.load(t.inputs["image"]), inputs["image"])
    assert t.inputs["question"] == inputs["question"]
    assert t.output["answer"] == result["answer"]
    np.testing.assert_array_equal(store.load(t.output["mask"]), result["mask"])
    assert [s.node for s in t.spans] == ["seg", "answer"]
    seg_span = t.spans[0]
    assert seg_span.model_id == "toy-seg" and seg_span.weights_sha256 == "ab" * 32
    np.testing.assert_array_equal(store.load(seg_span.reads["image"]), inputs["image"])
    np.testing.assert_array_equal(store.load(seg_span.writes["mask"]), result["mask"])
    assert t.spans[1].writes == {"answer": result["answer"]}
    assert t.input_hash == content_hash(encode_value(inputs, {}))
    assert t.group_id == t.input_hash and t.sample_index == 0
    assert t.duration_s > 0


@pytest.fixture
def store(tmp_path: Path) -> TraceStore:
    return TraceStore(tmp_path / "store")


def test_one_callback_records_a_plain_stategraph(store: TraceStore) -> None:
    graph = toy_graph()
    inputs = {"image": image(), "question": "how many"}
    bare = graph.invoke(inputs)
    ids: list[str | None] = []
    recorder = TraceRecorder(store, on_trace=lambda t, i: ids.append(i))
    result = graph.invoke(inputs, config={"callbacks": [recorder]})
    assert result["answer"] == bare["answer"]  # recording changes nothing
    np.testing.assert_array_equal(result["mask"], bare["mask"])
    assert store.count() == 1 and recorder.recorded == 1 and ids[0] is not None
    check_trace(store, ids[0], inputs, result)


def test_record_batch_threads_keep_runs_apart(store: TraceStore) -> None:
    graph = record(toy_graph(), store)
    inputs = [{"image": image(i), "question": f"q{i}"} for i in range(6)]
    results = graph.batch(inputs, config={"max_concurrency": 4})
    assert store.count() == 6
    by_question = {t.inputs["question"]: t.id for t in store.iter()}
    for inp, res in zip(inputs, results, strict=True):
        check_trace(store, by_question[inp["question"]], inp, res)


@pytest.mark.parametrize("mode", ["values", "updates"])
def test_record_stream(store: TraceStore, mode: str) -> None:
    graph = record(toy_graph(), store)
    inputs = {"image": image(1), "question": "stream"}
    chunks = list(graph.stream(inputs, stream_mode=mode))
    assert chunks  # the stream itself is untouched
    final = toy_graph().invoke(inputs)
    (t,) = list(store.iter())
    check_trace(store, t.id, inputs, final)


def test_record_ainvoke_abatch_astream(store: TraceStore) -> None:
    graph = record(toy_graph(), store)
    inputs = [{"image": image(i), "question": f"a{i}"} for i in range(5)]

    async def main() -> tuple[Any, Any, Any]:
        one = await graph.ainvoke(inputs[0])
        many = await graph.abatch(inputs[1:4])
        streamed = [c async for c in graph.astream(inputs[4], stream_mode="values")]
        return one, many, streamed

    one, many, streamed = asyncio.run(main())
    assert store.count() == 5
    by_question = {t.inputs["question"]: t.id for t in store.iter()}
    for inp, res in zip(inputs, [one, *many, streamed[-1]], strict=True):
        check_trace(store, by_question[inp["question"]], inp, res)


def test_concurrent_async_runs_with_gather(store: TraceStore) -> None:
    graph = record(toy_graph(), store)
    inputs = [{"image": image(i), "question": f"g{i}"} for i in range(4)]

    async def main() -> list[Any]:
        return await asyncio.gather(*(graph.ainvoke(x) for x in inputs))

    results = asyncio.run(main())
    by_question = {t.inputs["question"]: t.id for t in store.iter()}
    for inp, res in zip(inputs, results, strict=True):
        check_trace(store, by_question[inp["question"]], inp, res)


def test_failing_node_gives_a_failed_trace_and_the_same_exception(store: TraceStore) -> None:
    graph = record(toy_graph(), store)
    with pytest.raises(ValueError, match="refuses"):
        graph.invoke({"image": image(), "question": "explode"})
    (t,) = list(store.iter())
    assert t.status == "error" and "the answer node refuses" in (t.error or "")
    assert t.output == {}
    spans = {s.node: s for s in t.spans}
    assert spans["seg"].error is None and "refuses" in (spans["answer"].error or "")


def test_call_metadata_sets_group_sample_provenance_and_metadata(store: TraceStore) -> None:
    graph = record(toy_graph(), store, metadata={"run": "r1"})
    config = {
        "metadata": {
            "graphdistill_group_id": "g-1",
            "graphdistill_sample_index": 3,
            "graphdistill_provenance": {"photos": ["coffee"], "recipe": {"crop": 0.5}},
            "graphdistill_metadata": {"tta": {"flip": True}},
        }
    }
    graph.invoke({"image": image(), "question": "meta"}, config=config)
    (t,) = list(store.iter())
    assert (t.group_id, t.sample_index) == ("g-1", 3)
    assert t.provenance.photos == ["coffee"] and t.provenance.recipe == {"crop": 0.5}
    assert t.metadata == {"run": "r1", "tta": {"flip": True}}
    assert store.has_input(t.input_hash, 3)


def test_schema_restricts_output_and_names_the_graph(store: TraceStore) -> None:
    schema = GraphSchema(
        name="toy_rag",
        inputs=[FieldSpec(name="image", kind=Kind.IMAGE), FieldSpec(name="question", kind=Kind.TEXT)],
        outputs=[FieldSpec(name="answer", kind=Kind.TEXT)],
        definition_hash="d" * 64,
    )
    graph = record(toy_graph(), store, schema=schema)
    graph.invoke({"image": image(), "question": "schema"})
    (t,) = list(store.iter())
    assert set(t.output) == {"answer"}
    assert (t.graph.name, t.graph.hash) == ("toy_rag", "d" * 64)


def test_graph_identity_without_schema_is_stable_and_structural() -> None:
    _, a = graph_identity(toy_graph())
    _, b = graph_identity(toy_graph())
    g = StateGraph(State)
    g.add_node("seg", seg)
    g.add_edge(START, "seg")
    g.add_edge("seg", END)
    _, c = graph_identity(g.compile())
    assert a == b and a.hash != c.hash


def test_a_trace_that_cannot_be_written_is_never_lost_in_silence(
    store: TraceStore, caplog: pytest.LogCaptureFixture
) -> None:
    """strict (default): invoke raises TraceNotRecorded once the graph is done, the graph's result attached;
    strict=False: the graph's result comes back and the failure is counted, logged and raisable."""
    from graphdistill.recording.recorder import TraceNotRecorded

    inputs = {"image": image(), "question": "still works"}
    expected = toy_graph().invoke(inputs)
    strict = record(toy_graph(), store)
    lenient_recorder = TraceRecorder(store, strict=False)
    store.close()  # every append now fails
    with pytest.raises(TraceNotRecorded, match=r"1 run\(s\) finished but their trace was NOT written") as got:
        strict.invoke(inputs)
    assert got.value.result["answer"] == expected["answer"]  # the graph's own result is safe
    np.testing.assert_array_equal(got.value.result["mask"], expected["mask"])
    assert len(got.value.failures) == 1 and "closed" in got.value.failures[0].lower()

    result = toy_graph().invoke(inputs, config={"callbacks": [lenient_recorder]})
    assert result["answer"] == expected["answer"]
    assert lenient_recorder.failed_to_record == 1 and len(lenient_recorder.failures) == 1
    assert "trace NOT recorded" in caplog.text
    with pytest.raises(TraceNotRecorded, match="1 run"):
        lenient_recorder.raise_if_failed()
    lenient_recorder.raise_if_failed()  # each failure is raised once


def test_the_store_argument_is_a_store_a_path_or_a_file_url_and_anything_else_is_refused_at_once(
    tmp_path: Path,
) -> None:
    from graphdistill.store.trace_store import StoreError

    inputs = {"image": image(), "question": "q"}
    for i, where in enumerate(
        (str(tmp_path / "as-str"), tmp_path / "as-path", (tmp_path / "as-url").as_uri())
    ):
        live = record(toy_graph(), where)
        live.invoke(inputs)
        (t,) = list(TraceStore(tmp_path / ["as-str", "as-path", "as-url"][i]).iter())
        assert t.output["answer"] == "q: " + str(int((image()[..., 0] > 100).sum()))
    for bad, error, message in (
        (3, TypeError, "must be a TraceStore, a folder path or a file:// URL, not int 3"),
        (None, TypeError, "not NoneType None"),
        (["a"], TypeError, "not list"),
        ("s3://bucket/traces", StoreError, r"a local folder.*not s3://"),
        ("", StoreError, "an empty path"),
    ):
        with pytest.raises(error, match=message):
            record(toy_graph(), bad)
        with pytest.raises(error, match=message):
            TraceRecorder(bad)
    assert not (tmp_path / "s3:").exists()


def _count(root: Path) -> int:
    with TraceStore(root, readonly=True) as s:
        return s.count()


def test_each_way_a_write_can_fail_raises_and_leaves_what_was_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import shutil
    import sqlite3

    from graphdistill.recording.recorder import TraceNotRecorded

    root = tmp_path / "store"
    store = TraceStore(root)
    live = record(toy_graph(), store)
    live.invoke({"image": image(0), "question": "kept"})
    assert _count(root) == 1

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for name, patch, message in (
        ("read-only", ("_insert_row", read_only), "readonly database"),
        ("disk full", ("_write_blob", disk_full), "No space left on device"),
    ):
        with monkeypatch.context() as m:
            m.setattr(store, *patch)
            with pytest.raises(TraceNotRecorded, match=message):
                live.invoke({"image": image(1), "question": name})
        assert _count(root) == 1, name  # nothing half-written, the first trace untouched
        assert store.get(next(store.iter()).id).inputs["question"] == "kept"

    class Unstorable:  # a node output that cannot be encoded (not even by its repr)
        def __repr__(self) -> str:
            raise RuntimeError("no representation")

    g = StateGraph(State)
    g.add_node("weird", lambda s: {"answer": Unstorable()})
    g.add_edge(START, "weird")
    g.add_edge("weird", END)
    with pytest.raises(TraceNotRecorded, match="no representation") as got:
        record(g.compile(), store).invoke({"image": image(2), "question": "weird"})
    assert isinstance(got.value.result["answer"], Unstorable)
    assert _count(root) == 1

    # a node that raises is not a recording failure: its trace is kept, status error, and its error comes out
    with pytest.raises(ValueError, match="refuses"):
        live.invoke({"image": image(3), "question": "explode"})
    assert _count(root) == 2

    shutil.rmtree(root)  # the store deleted while open: SQLite would write into the deleted file
    with pytest.raises(TraceNotRecorded, match="was deleted while open"):
        live.invoke({"image": image(4), "question": "gone"})


def test_a_background_recorder_raises_its_failures_at_flush(store: TraceStore) -> None:
    from graphdistill.recording.recorder import TraceNotRecorded

    recorder = TraceRecorder(store, background=True)
    graph = toy_graph()
    graph.invoke({"image": image(), "question": "one"}, config={"callbacks": [recorder]})
    recorder.flush()
    assert store.count() == 1
    store.close()
    graph.invoke({"image": image(), "question": "two"}, config={"callbacks": [recorder]})  # queued
    with pytest.raises(TraceNotRecorded, match="1 run"):
        recorder.flush()
    recorder.close()  # already raised: nothing new


def test_nested_runnables_inside_a_node_are_not_spans(store: TraceStore) -> None:
    from langchain_core.runnables import RunnableLambda

    inner = RunnableLambda(lambda x: x * 2)

    def calls_inner(state: State) -> dict[str, Any]:
        return {"answer": str(inner.invoke(len(state["question"])))}

    g = StateGraph(State)
    g.add_node("outer", calls_inner)
    g.add_edge(START, "outer")
    g.add_edge("outer", END)
    record(g.compile(), store).invoke({"image": image(), "question": "abc"})
    (t,) = list(store.iter())
    assert [s.node for s in t.spans] == ["outer"] and t.output["answer"] == "6"


def test_recorder_used_from_many_threads(store: TraceStore) -> None:
    graph = toy_graph()
    recorder = TraceRecorder(store)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(3):
                graph.invoke({"image": image(k * 10 + j), "question": f"t{k}-{j}"}, {"callbacks": [recorder]})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and store.count() == 12 and recorder.recorded == 12
    assert store.check()["ok"]


def test_as_teacher_graph_is_recorded_under_its_schema(store: TraceStore) -> None:
    from graphdistill.graphs import as_teacher, schema_of

    teacher = as_teacher(
        toy_graph(),
        name="toy_teacher",
        inputs={"image": "image", "question": "text"},
        outputs={"answer": "text"},
    )
    schema = schema_of(teacher)
    record(teacher, store).invoke({"image": image(), "question": "teacher"})
    (t,) = list(store.iter())
    assert t.graph.name == "toy_teacher" and t.graph.hash == (schema.definition_hash or t.graph.hash)
    assert set(t.output) == {"answer"}


def test_background_writer_records_everything_after_flush(store: TraceStore) -> None:
    graph = toy_graph()
    recorder = TraceRecorder(store, background=True, max_pending=2)
    inputs = [{"image": image(i), "question": f"bg{i}"} for i in range(5)]
    results = [graph.invoke(x, config={"callbacks": [recorder]}) for x in inputs]
    recorder.flush()
    assert recorder.recorded == 5 and store.count() == 5
    by_question = {t.inputs["question"]: t.id for t in store.iter()}
    for inp, res in zip(inputs, results, strict=True):
        check_trace(store, by_question[inp["question"]], inp, res)
    recorder.close()


def test_one_callback_derives_the_graph_id_so_two_graphs_on_one_input_do_not_collide(
    store: TraceStore,
) -> None:
    def count(state: State) -> dict[str, Any]:
        return {"answer": str(int(state["mask"].sum()))}

    g = StateGraph(State)
    g.add_node("seg", seg)
    g.add_node("count", count)
    g.add_edge(START, "seg")
    g.add_edge("seg", "count")
    g.add_edge("count", END)
    other = g.compile()
    inputs = {"image": image(), "question": "same input"}
    recorder = TraceRecorder(store)  # bare: no schema, no graph id
    for graph in (toy_graph(), other, toy_graph()):
        graph.invoke(inputs, config={"callbacks": [recorder]})
    assert (recorder.recorded, recorder.duplicates) == (2, 1)  # the same graph twice still dedups
    traces = list(store.iter())
    assert {tuple(s.node for s in t.spans) for t in traces} == {("seg", "answer"), ("seg", "count")}
    hashes = {t.graph.hash for t in traces}
    assert len(hashes) == 2 and "unknown" not in hashes
    assert {t.graph.name for t in traces} == {"LangGraph"}  # the root run's name

    named = toy_graph().with_config(run_name="toy")  # a run name is part of the id
    named.invoke(inputs, config={"callbacks": [recorder]})
    assert recorder.recorded == 3
    assert any(t.graph.name == "toy" and t.graph.hash not in hashes for t in store.iter())


@pytest.mark.parametrize(
    ("answer_text", "finish", "truncated"),
    [("It is a cat.", "length", True), ("a cat", "stop", False)],
)
def test_visual_rag_reason_span_records_finish_reason_and_the_check_uses_it(
    store: TraceStore, answer_text: str, finish: str, truncated: bool
) -> None:
    """The heuristic alone would get both cases wrong (a full stop is not a finished answer, a missing one
    is not a cut-off one): the truncated check must read the finish_reason the reason node recorded."""
    from graphdistill.filter.checks import run_checks
    from graphdistill.filter.vote import vote_group, written
    from graphdistill.graphs.visual_rag import visual_rag
    from graphdistill.teachers.base import LLMOutput
    from graphdistill.trace import Detections, Document, TokenLogprobs

    class Det:
        def detect(self, image: Any) -> Detections:
            return Detections(image_size=list(image.shape[:2]))

    class Ret:
        def query(self, text: str, k: int) -> list[Document]:
            return [Document(id="doc-cat", text="Cats sleep a lot.")]

    class LLM:
        def generate(self, prompt: Any, **kw: Any) -> LLMOutput:
            lp = TokenLogprobs(tokenizer="t", token_ids=[1], topk_ids=[[1]], topk_logprobs=[[0.0]])
            return LLMOutput(text=answer_text, logprobs=lp, finish_reason=finish)  # type: ignore[arg-type]

    unused = object()  # no detections: the segmenter is never called
    graph = visual_rag(teachers={"detector": Det(), "segmenter": unused, "llm": LLM(), "retriever": Ret()})
    record(graph, store).invoke({"image": image(), "question": "What is it?"})
    (t,) = list(store.iter())
    reason = next(s for s in t.spans if s.node == "reason")
    assert reason.writes["finish_reason"] == finish and written(t, "finish_reason") == finish
    found = dict(run_checks(vote_group([t]), [t]))
    assert ("truncated_answer" in found) is truncated
    if truncated:
        assert "finish_reason 'length'" in found["truncated_answer"]


def test_recorder_encoding_equals_encode_value_and_reuses_one_png_per_image(store: TraceStore) -> None:
    """The recorder's faster encoder gives exactly ``encode_value``'s output (so blob names and input hashes
    do not change), and the K samples of one input (plus `record`'s input hash) PNG-encode its image once."""
    from graphdistill.recording.recorder import ImageEncodings, _Encoder
    from graphdistill.trace import RLE, Masks

    big = np.random.default_rng(5).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    assert ImageEncodings.handles(big) and not ImageEncodings.handles(image())
    value = {
        "image": big,
        "small": image(),
        "floats": [0.5, float("nan"), 2.0],
        "counts": list(range(500)),
        "nested": ({"a": (1, "x", None, True)}, [np.float32(1.5), np.int64(3)]),
        "masks": Masks(rles=[RLE(size=[2, 2], counts=[1, 3])], scores=[0.5]),
        "view": big[:, ::-1],  # not contiguous
    }
    blobs: dict[str, bytes] = {}
    expected = encode_value(value, blobs)
    encoder = _Encoder(ImageEncodings())
    assert encoder(value) == expected and encoder.blobs == blobs

    graph = toy_graph()
    recorder = TraceRecorder(store)
    inputs = {"image": big, "question": "k samples"}
    ih = recorder.input_hash(inputs)
    assert ih == content_hash(encode_value(inputs, {}))
    for i in range(3):  # a fresh array per sample, as `graphdistill record` loads the image per task
        graph.invoke(
            {"image": big.copy(), "question": "k samples"},
            config={"callbacks": [recorder], "metadata": {"graphdistill_sample_index": i}},
        )
    assert recorder.recorded == 3
    assert (recorder.images.misses, recorder.images.hits) == (1, 3)
    for t in store.iter():
        assert t.input_hash == ih
        np.testing.assert_array_equal(store.load(t.inputs["image"]), big)


def test_image_encodings_stay_within_their_byte_budget() -> None:
    from graphdistill.recording.recorder import ImageEncodings

    cache = ImageEncodings(max_bytes=120_000)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (100, 100, 3), dtype=np.uint8) for _ in range(4)]  # ~30 KB PNGs (noise)
    refs = [cache.encode(a)[0] for a in imgs]
    assert cache._bytes <= 120_000 and len(cache._items) < 4
    assert cache.encode(imgs[-1])[0] == refs[-1] and cache.hits == 1  # the newest is kept
    assert cache.encode(imgs[0])[0] == refs[0] and cache.misses == 5  # the oldest was evicted


def test_sync_recorder_encodes_the_input_image_while_the_graph_runs(
    store: TraceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The input image's PNG is made on the helper thread, started with the run (off invoke's critical
    path); the trace is still complete and durable when invoke returns."""
    import graphdistill.recording.recorder as recording

    threads: list[str] = []
    real = recording.encode_array

    def spy(arr: np.ndarray) -> Any:
        threads.append(threading.current_thread().name)
        return real(arr)

    monkeypatch.setattr(recording, "encode_array", spy)
    big = np.random.default_rng(7).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    recorder = TraceRecorder(store)
    result = toy_graph().invoke({"image": big, "question": "prefetch"}, config={"callbacks": [recorder]})
    assert recorder.recorded == 1 and store.count() == 1  # written before invoke returned
    (t,) = list(store.iter())
    check_trace(store, t.id, {"image": big, "question": "prefetch"}, result)
    png = [name for name in threads if name.startswith("graphdistill-png")]
    assert len(png) == 1 and len(threads) == 2  # the image on the helper; the mask (bool, .npy) inline
    recorder.close()
