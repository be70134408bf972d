"""The reference visual RAG teacher graph: its prompt pieces, its sampling contract and a real run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from graphdistill.graphs.visual_rag import (
    EXAMPLES,
    NO_OBJECT,
    PLAIN_SYSTEM_PROMPT,
    SAMPLE_TEMPERATURE,
    SAMPLE_TOP_P,
    SYSTEM_PROMPT,
    VisualRagConfig,
    build_prompt,
    position_words,
    prompt_facts,
    retrieval_query,
    sampling_settings,
    scene_sentence,
)
from graphdistill.trace import RLE, Detections, Document, Kind, TokenLogprobs

CAT = Detections(
    xyxy=[[10, 10, 300, 200], [380, 250, 400, 290]],
    class_ids=[15, 15],
    names=["cat", "cat"],
    scores=[0.91, 0.4],
    image_size=[300, 400],
)


def test_sampling_contract() -> None:
    greedy = {"temperature": 0.0, "top_p": 1.0, "seed": None}
    assert sampling_settings(None) == greedy
    assert sampling_settings({"configurable": {"gd_sample_index": 3}}) == greedy  # no gd_sampling: greedy
    assert sampling_settings({"configurable": {"gd_sampling": True, "gd_sample_index": 0}}) == greedy
    s1 = sampling_settings({"configurable": {"gd_sampling": True, "gd_sample_index": 1, "gd_seed": 7}})
    s2 = sampling_settings({"configurable": {"gd_sampling": True, "gd_sample_index": 2, "gd_seed": 7}})
    s1b = sampling_settings({"configurable": {"gd_sampling": True, "gd_sample_index": 1, "gd_seed": 8}})
    assert s1["temperature"] == SAMPLE_TEMPERATURE == 0.7 and s1["top_p"] == SAMPLE_TOP_P == 0.95
    assert len({s1["seed"], s2["seed"], s1b["seed"]}) == 3  # the seed follows gd_seed and the index
    again = sampling_settings({"configurable": {"gd_sampling": True, "gd_sample_index": 1, "gd_seed": 7}})
    assert again == s1


def test_positions_in_words() -> None:
    assert position_words([0, 0, 10, 10], [300, 300]) == "top left, small"
    assert position_words([100, 100, 200, 200], [300, 300]) == "center, medium"
    assert position_words([0, 250, 300, 300], [300, 300]) == "bottom, medium"
    assert position_words([0, 0, 300, 300], [300, 300]) == "center, large"


def test_plain_prompt_and_query() -> None:
    docs = [Document(id="cat-1", text="Cats sleep up to 16 hours a day.")]
    system, user = build_prompt("  What is it? ", CAT, docs, style="plain")
    assert system == {"role": "system", "content": PLAIN_SYSTEM_PROMPT} and "one or two" in system["content"]
    assert user["role"] == "user"
    text = user["content"]
    assert "cat (0.91, center, large)" in text and "bottom right, small" in text
    assert "Cats sleep up to 16 hours a day." in text and text.endswith("Question: What is it?")
    empty = Detections(image_size=[10, 10])
    assert "no objects detected" in build_prompt("q", empty, [], style="plain")[1]["content"]
    assert retrieval_query(" What is it? ", CAT) == "What is it? cat"
    assert retrieval_query("q", empty) == "q"
    with pytest.raises(ValueError, match="prompt style must be one of"):
        build_prompt("q", CAT, docs, style="chatty")


MIXED = Detections(
    xyxy=[[0, 0, 40, 40], [100, 100, 300, 290], [350, 10, 395, 60]],
    class_ids=[60, 41, 41],
    names=["dining table", "cup", "cup"],
    scores=[0.8, 0.7, 0.6],
    image_size=[300, 400],
)


def test_fewshot_prompt_is_the_examples_then_the_detected_labels_facts_and_question() -> None:
    docs = [
        Document(id="cup-1", text="A cup is a small open container for drinks.", metadata={"label": "cup"}),
        Document(id="cat-1", text="Cats sleep a lot.", metadata={"label": "cat"}),  # cat: not detected
        Document(id="cup-2", text="Cups sit on a saucer or a table.", metadata={"label": "cup"}),
        Document(id="free", text="Hot drinks can scald.", metadata={}),  # no label: kept
    ]
    msgs = build_prompt(" What is next to the cup? ", MIXED, docs, class_names=["cup", "dining table", "cat"])
    assert msgs == build_prompt(
        " What is next to the cup? ", MIXED, docs, class_names=["cup", "dining table", "cat"]
    )
    assert [m["role"] for m in msgs] == ["system", *["user", "assistant"] * len(EXAMPLES), "user"]
    assert msgs[0]["content"] == SYSTEM_PROMPT and len(EXAMPLES) == 3
    for ex, user, assistant in zip(EXAMPLES, msgs[1:-1:2], msgs[2:-1:2], strict=True):
        assert assistant["content"] == ex.answer
        assert user["content"].endswith(f"Question: {ex.question}")
        for label, where in ex.objects:
            assert f" {label}: " in user["content"] and where in user["content"]
        for fact in ex.facts:
            assert f"- {fact}" in user["content"]
    last = msgs[-1]["content"]
    # the labels exactly as the detector spells them, grouped with a count, then the positions
    assert "Objects:\n- 1 dining table: top left, small\n- 2 cup: center, large; top right, small\n" in last
    # facts about detected labels (or with no label), in retrieval order, at most MAX_FACTS: cat's fact is out
    assert "Facts:\n- A cup is a small open container for drinks.\n- Cups sit on a saucer" in last
    assert "Cats sleep" not in last and "Hot drinks" not in last  # the third kept fact is past MAX_FACTS
    assert last.endswith("\nQuestion: What is next to the cup?")
    # no detections: "none" for objects and facts (every fact is about an undetected label), as in the first
    # worked example
    nothing = Detections(image_size=[10, 10])
    empty = build_prompt("What is in the picture?", nothing, docs[:3])[-1]["content"]
    assert empty == "Objects: none\nFacts: none\nQuestion: What is in the picture?"


def test_scene_sentence_names_the_detected_labels_with_counts_and_positions() -> None:
    """The answer's first sentence, written by the graph: every worked example's answer opens with it (the
    LLM sees the rule it continues), labels grouped in the detector's order, counted and placed."""
    for ex in EXAMPLES:
        assert ex.answer.startswith(scene_sentence(ex.objects)), ex.question
    assert scene_sentence(()) == NO_OBJECT == EXAMPLES[0].answer
    objects = tuple(
        (n, position_words(b, MIXED.image_size)) for n, b in zip(MIXED.names, MIXED.xyxy, strict=True)
    )
    assert scene_sentence(objects) == (
        "The photo shows a dining table at the top left and 2 cups, in the center and at the top right."
    )
    three = [
        ("cat", "left, small"),
        ("apple", "center, large"),
        ("cat", "right, small"),
        ("dog", "top, small"),
    ]
    assert scene_sentence(three) == (
        "The photo shows 2 cats, on the left and on the right, an apple in the center and a dog at the top."
    )
    crowd = (
        [("person", "left, small")] * 4 + [("wine glass", "bottom, small")] * 2 + [("bus", "center, large")]
    )
    assert scene_sentence(crowd) == (
        "The photo shows 4 people, 2 wine glasses, at the bottom and at the bottom, and a bus in the center."
    )
    # the prompt ends with it as the assistant's opening, for the LLM to continue
    msgs = build_prompt("What is next to the cup?", MIXED, [], opening=True)
    assert msgs[:-1] == build_prompt("What is next to the cup?", MIXED, [])
    assert msgs[-1] == {"role": "assistant", "content": scene_sentence(objects)}


def test_prompt_facts_leave_out_facts_naming_an_undetected_class() -> None:
    docs = [
        Document(id="t", text="A toilet is a bowl with a seat.", metadata={"label": "toilet"}),
        Document(id="t2", text="Toilets are in bathrooms.", metadata={"label": "toilet"}),
    ]
    toilet = Detections(
        xyxy=[[0, 0, 9, 9]], class_ids=[61], names=["toilet"], scores=[0.9], image_size=[10, 10]
    )
    # "bowl" is a class of the detector's label set and no bowl was detected: that fact would teach the
    # LLM to name it
    assert prompt_facts(toilet, docs, ["toilet", "bowl"]) == ["Toilets are in bathrooms."]
    assert prompt_facts(toilet, docs, ["toilet"]) == [d.text for d in docs]  # "bowl" is no class here
    bowl_too = Detections(
        xyxy=[[0, 0, 9, 9], [0, 0, 5, 5]],
        class_ids=[61, 45],
        names=["toilet", "bowl"],
        scores=[0.9, 0.8],
        image_size=[10, 10],
    )
    assert prompt_facts(bowl_too, docs, ["toilet", "bowl"]) == [d.text for d in docs]


def test_the_config_asks_every_llm_call_for_its_stop_rule() -> None:
    cfg = VisualRagConfig()
    assert cfg.prompt_style == "fewshot" and cfg.opens_answers()
    # two sentences in all: the graph writes the first, the LLM one more
    assert cfg.llm_options() == {"max_new_tokens": 96, "stop": ("\n",), "max_sentences": 1}
    whole = VisualRagConfig(scene_opening=False)
    assert not whole.opens_answers() and whole.llm_options()["max_sentences"] == 2
    one = VisualRagConfig(max_sentences=1)  # the graph's opening is the whole answer: no sentence left
    assert one.llm_sentences() == 0 and not one.llm_writes() and cfg.llm_writes()
    assert VisualRagConfig(max_sentences=1, scene_opening=False).llm_options()["max_sentences"] == 1
    assert VisualRagConfig(max_sentences=None).llm_sentences() is None
    assert not VisualRagConfig(prompt_style="plain").opens_answers()
    old = VisualRagConfig(prompt_style="plain", max_new_tokens=48, stop=(), max_sentences=None)
    assert old.llm_options() == {"max_new_tokens": 48, "stop": (), "max_sentences": None}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("k", 0),
        ("conf", 1.5),
        ("max_new_tokens", 0),
        ("prompt_style", "chatty"),
        ("max_sentences", 0),
        ("no_repeat_ngram", 1),
    ],
)
def test_config_validation(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        VisualRagConfig(**{field: value})


def test_the_llm_the_graph_loads_gets_the_configs_repeat_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphdistill.teachers.llm as llm_mod
    from graphdistill.graphs.visual_rag import load_teachers

    made: list[dict[str, Any]] = []
    monkeypatch.setattr(llm_mod, "HFCausalLM", lambda **kw: made.append(kw) or object())
    given = {"detector": object(), "segmenter": object(), "retriever": object()}
    load_teachers(VisualRagConfig(), dict(given))
    load_teachers(VisualRagConfig(no_repeat_ngram=None, max_new_tokens=40), dict(given))
    assert [(m["no_repeat_ngram"], m["max_new_tokens"]) for m in made] == [(3, 96), (None, 40)]


def test_unknown_teacher_role() -> None:
    from graphdistill.graphs.visual_rag import visual_rag

    with pytest.raises(ValueError, match=r"unknown teacher role\(s\) \['detctor'\]"):
        visual_rag(teachers={"detctor": object()})


def test_declaration_shape() -> None:
    """The graph's wiring, checked without running a model (the adapters are never called here)."""
    from graphdistill.graphs.builder import END, START
    from graphdistill.graphs.visual_rag import visual_rag_builder

    unused = object()
    roles = ("detector", "segmenter", "llm", "retriever")
    b = visual_rag_builder(teachers=dict.fromkeys(roles, unused))
    edges = {(s, t) for s, t in b.edges()}
    assert edges == {
        ((START,), "detect"),
        (("detect",), "retrieve"),
        (("retrieve",), "segment"),  # segment and reason share a superstep: reason never waits for it
        (("retrieve",), "reason"),
        (("segment", "reason"), "compose"),
        (("compose",), END),
    }
    kinds = b.field_kinds()
    assert kinds["llm"] == Kind.TOKEN_LOGPROBS and kinds["masks"] == Kind.MASKS
    assert kinds["documents"] == Kind.DOCUMENTS and kinds["detections"] == Kind.DETECTIONS
    assert b.schema().nodes == ["detect", "segment", "retrieve", "reason", "compose"]
    # the LLM reads the detections, the question and documents found by text: the answer is made from what the
    # detector saw, never from the pixels themselves (so the student's text reads no pixels); masks are pixels
    schema = b.schema()
    assert schema.reads_pixels("answer") is False
    # node by node: compose reads the masks, so what it writes counts as made from pixels
    assert schema.reads_pixels("objects") is True and schema.reads_pixels("sources") is True
    assert schema.dataflow["reason"].reads == ["question", "detections", "documents"]
    # with CLIP image retrieval the documents, and so the answer, follow the pixels
    with_clip = visual_rag_builder(teachers=dict.fromkeys((*roles, "clip"), unused)).schema()
    assert "image" in with_clip.dataflow["retrieve"].reads
    assert with_clip.reads_pixels("answer") is True


class _FakeTeachers:
    """Fast stand-ins. The segmenter blocks until the LLM has been called: the graph only finishes when
    reason runs while segment is still busy (the two branches are parallel)."""

    def __init__(self) -> None:
        import threading

        self.llm_called = threading.Event()
        # set by the test once every execution of a batch has entered detect (and so announced itself to
        # the LLM batcher); the first detect waits for it, so the test does not depend on thread start-up
        self.all_detecting = threading.Event()
        self.batches: list[list[Any]] = []
        self.order: list[str] = []

        outer = self

        class Det:
            def detect(self, image: Any) -> Detections:
                outer.all_detecting.wait(timeout=10)
                return CAT

        class Seg:
            def segment(self, image: Any, boxes: Any) -> Any:
                from graphdistill.trace import Masks

                outer.order.append("segment-start")
                if not outer.llm_called.wait(timeout=10):
                    raise AssertionError("reason never ran while segment was busy")
                return Masks(
                    rles=[RLE(size=[300, 400], counts=[120000]) for _ in boxes], scores=[0.9] * len(boxes)
                )

        class Ret:
            def query(self, text: str, k: int) -> list[Document]:
                return [Document(id=f"doc-{text}", text="Cats sleep a lot.")]

        class LLM:
            temperature = 0.0

            def generate_batch(self, prompts: list[Any], **kw: Any) -> list[Any]:
                from graphdistill.teachers.base import LLMOutput

                outer.batches.append(prompts)
                outer.order.append("llm")
                outer.llm_called.set()
                return [
                    LLMOutput(
                        text=f" answer to {p[-2]['content'].rsplit(': ', 1)[-1]} ",
                        logprobs=TokenLogprobs(
                            tokenizer="t", token_ids=[1], topk_ids=[[1]], topk_logprobs=[[0.0]]
                        ),
                        finish_reason="stop",
                    )
                    for p in prompts
                ]

            def generate(self, prompt: Any, **kw: Any) -> Any:
                return self.generate_batch([prompt], **kw)[0]

        self.roles = {"detector": Det(), "segmenter": Seg(), "retriever": Ret(), "llm": LLM()}


def test_one_sentence_is_the_graphs_opening_and_the_llm_is_not_asked(tmp_path: Path) -> None:
    from graphdistill.graphs.visual_rag import visual_rag
    from graphdistill.recording.recorder import record
    from graphdistill.store.trace_store import TraceStore

    fakes = _FakeTeachers()
    fakes.all_detecting.set()
    fakes.llm_called.set()  # the fake segmenter waits for an LLM call that never comes
    store = TraceStore(tmp_path / "store")
    graph = record(visual_rag(VisualRagConfig(max_sentences=1), teachers=fakes.roles), store)
    image = __import__("numpy").zeros((300, 400, 3), "uint8")
    outs = graph.batch([{"image": image, "question": q} for q in ("q1?", "q2?")])
    assert [o["answer"] for o in outs] == [
        "The photo shows 2 cats, in the center and at the bottom right."
    ] * 2
    assert fakes.batches == [] and "llm" not in fakes.order
    traces = list(store.iter())
    assert len(traces) == 2 and all(t.status == "ok" for t in traces)
    reason = [sp for t in traces for sp in t.spans if sp.node == "reason"]
    assert [sp.writes.get("finish_reason") for sp in reason] == ["stop", "stop"]
    assert all(sp.writes.get("llm") is None for sp in reason)


def test_reason_runs_in_parallel_with_segment_and_batch_shares_llm_calls() -> None:
    import threading

    from langchain_core.callbacks import BaseCallbackHandler

    from graphdistill.graphs.visual_rag import visual_rag

    fakes = _FakeTeachers()
    graph = visual_rag(teachers=fakes.roles)
    nodes: list[str] = []

    class Spy(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            meta = kw.get("metadata") or {}
            if meta.get("langgraph_node") == kw.get("name"):
                nodes.append(kw["name"])
                if nodes.count("detect") == 3 and kw["name"] == "detect":
                    # each node body announces itself right after this callback, then takes the detector lock
                    threading.Timer(0.2, fakes.all_detecting.set).start()

    image = __import__("numpy").zeros((300, 400, 3), "uint8")
    xs = [{"image": image, "question": q} for q in ("q1?", "q2?", "q3?")]
    outs = graph.batch(xs, config={"callbacks": [Spy()], "max_concurrency": 3})
    # the graph's opening sentence, then the LLM's continuation of it
    opening = "The photo shows 2 cats, in the center and at the bottom right."
    assert [o["answer"] for o in outs] == [f"{opening} answer to q{i}?" for i in (1, 2, 3)]
    assert all(p[-1] == {"role": "assistant", "content": opening} for b in fakes.batches for p in b)
    for o in outs:
        assert [ob["label"] for ob in o["objects"]] == ["cat", "cat"] and o["objects"][0]["mask"] is not None
        assert o["sources"] and o["sources"][0].startswith("doc-")
    # every span name is still there, once per input
    assert sorted(set(nodes)) == ["compose", "detect", "reason", "retrieve", "segment"]
    assert all(nodes.count(n) == 3 for n in set(nodes))
    # the three reason calls were served by fewer LLM calls than prompts (micro-batched)
    assert sum(len(b) for b in fakes.batches) == 3 and len(fakes.batches) < 3
    # one-by-one invoke gives the same outputs
    one = [graph.invoke(x) for x in xs]
    assert [o["answer"] for o in one] == [o["answer"] for o in outs]
    assert [o["objects"] for o in one] == [o["objects"] for o in outs]


# ------------------------------------------------------------------------------------------------ real models
@pytest.mark.slow
def test_chelsea_real_run_and_schema() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    import _models
    from graphdistill.graphs import schema_of
    from graphdistill.graphs.visual_rag import visual_rag

    teachers = _models.visual_rag_teachers()
    graph = visual_rag(teachers=teachers)
    schema = schema_of(graph)
    assert schema.name == "visual_rag"
    assert schema.input_kinds() == {"image": Kind.IMAGE, "question": Kind.TEXT}
    assert schema.output_kinds() == {"answer": Kind.TEXT, "objects": Kind.OBJECTS, "sources": Kind.SOURCES}
    assert schema.nodes == ["detect", "segment", "retrieve", "reason", "compose"]

    writes: dict[str, Any] = {}
    metas: dict[str, dict[str, Any]] = {}

    class Spy(BaseCallbackHandler):
        def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
            meta = kw.get("metadata") or {}
            if meta.get("langgraph_node") == kw.get("name"):
                metas[kw["name"]] = meta

    image = _models.builtin_image("skimage/chelsea")
    for mode, chunk in graph.stream(
        {"image": image, "question": "What is in this picture?"},
        stream_mode=["updates", "values"],
        config={"callbacks": [Spy()]},
    ):
        if mode == "updates":
            for node, w in chunk.items():
                writes[node] = w
        else:
            final = chunk
    cats = [o for o in final["objects"] if o["label"] == "cat"]
    assert cats, final["objects"]
    mask = RLE.model_validate(cats[0]["mask"])
    assert mask.size == list(image.shape[:2]) and mask.area() > 0.05 * image.shape[0] * image.shape[1]
    assert final["answer"].strip()
    assert any(s.startswith("coco/cat/") for s in final["sources"]), final["sources"]
    assert isinstance(writes["reason"]["llm"], TokenLogprobs) and writes["reason"]["llm"].token_ids
    assert isinstance(writes["detect"]["detections"], Detections)
    assert metas["detect"]["graphdistill_model_id"] == teachers["detector"].model_id
    assert metas["reason"]["graphdistill_weights_sha256"] == teachers["llm"].weights_sha256


@pytest.mark.slow
def test_sampling_contract_reaches_the_llm() -> None:
    import _models
    from graphdistill.graphs.visual_rag import visual_rag

    # the LLM writing the whole answer: with the graph's opening, chelsea's one-sentence continuation (a fact
    # copied whole) can come out the same in a sampled draw
    graph = visual_rag(VisualRagConfig(scene_opening=False), teachers=_models.visual_rag_teachers())
    x = {"image": _models.builtin_image("skimage/chelsea"), "question": "What is in this picture?"}

    def run(**configurable: Any) -> str:
        return str(graph.invoke(x, config={"configurable": configurable})["answer"])

    # sample 0 stays greedy whatever the flags (sampling_settings above); samples > 0 are seeded draws
    sampled = run(gd_sampling=True, gd_sample_index=1, gd_seed=1)
    assert run(gd_sampling=True, gd_sample_index=1, gd_seed=1) == sampled  # seeded: reproducible
    assert sampled != run()  # and really sampled: differs from the greedy answer


@pytest.mark.slow
def test_clip_variant_adds_image_hits(tmp_path: Any) -> None:
    """With a CLIP embedder (seeded random weights: no real CLIP checkpoint exists offline) the retrieve node
    appends what the image query finds to the text hits. Only the retrieve node runs, for real."""
    import numpy as np

    import _models
    from graphdistill.graphs.visual_rag import retrieval_query, visual_rag_builder
    from graphdistill.teachers.clip import ClipEmbedder
    from graphdistill.teachers.knowledge import default_documents
    from graphdistill.teachers.retriever import ChromaRetriever

    clip = ClipEmbedder(arch="ViT-S-16", random_weights=True)
    retriever = ChromaRetriever(
        path=tmp_path / "chroma", text_embedder=_models.text_embedder(), image_embedder=clip, k=3
    )
    retriever.ingest(default_documents()[:40])
    unused = object()  # detect/segment/reason do not run in this test
    b = visual_rag_builder(
        teachers={
            "detector": unused,
            "segmenter": unused,
            "llm": unused,
            "retriever": retriever,
            "clip": clip,
        }
    )
    assert b.name == "visual_rag_clip"
    # the retrieve node's model (what traces carry) names the CLIP model, random weights included
    retrieve = b.nodes["retrieve"]
    assert "RANDOM WEIGHTS" in str(retrieve.model_id) and clip.model_id in str(retrieve.model_id)
    assert _models.text_embedder().model_id in str(retrieve.model_id)
    text_only = ChromaRetriever(path=tmp_path / "chroma", text_embedder=_models.text_embedder())
    assert "RANDOM" not in text_only.model_id
    assert retrieve.weights_sha256 not in (text_only.weights_sha256, clip.weights_sha256, None)
    image = np.asarray(_models.builtin_image("skimage/coffee"))
    dets = Detections(
        xyxy=[[0, 0, 10, 10]], class_ids=[41], names=["cup"], scores=[0.9], image_size=[400, 600]
    )
    out = b.nodes["retrieve"].fn({"question": "What is this?", "detections": dets, "image": image})
    text_ids = [d.id for d in retriever.query(text=retrieval_query("What is this?", dets), k=3)]
    image_ids = [d.id for d in retriever.query(image_embedding=clip.embed_images([image])[0], k=3)]
    assert [d.id for d in out["documents"]] == text_ids + [i for i in image_ids if i not in text_ids]


@pytest.mark.slow
def test_real_batch_equals_invoke_one_by_one_and_batches_the_llm() -> None:
    import _models
    from graphdistill.graphs.visual_rag import visual_rag

    teachers = _models.visual_rag_teachers()
    real = teachers["llm"]
    sizes: list[int] = []

    class CountingLLM:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def generate_batch(self, prompts: Any, **kw: Any) -> Any:
            sizes.append(len(prompts))
            return real.generate_batch(prompts, **kw)

    graph = visual_rag(teachers={**teachers, "llm": CountingLLM()})
    xs = [
        {"image": _models.builtin_image(p), "question": "What is in this picture?"}
        for p in ("skimage/chelsea", "skimage/coffee")
    ]
    batched = graph.batch(xs)
    assert sum(sizes) == 2 and len(sizes) == 1, sizes  # both reason calls in one generate_batch
    one = [graph.invoke(x) for x in xs]
    for b, o in zip(batched, one, strict=True):
        assert b["answer"] == o["answer"] and b["answer"].strip()
        assert b["objects"] == o["objects"] and b["sources"] == o["sources"]
