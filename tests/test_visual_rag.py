"""The reference visual RAG teacher graph: its prompt pieces, its sampling contract and a real run."""

from __future__ import annotations

from typing import Any

import pytest

from graphdistill.graphs.visual_rag import (
    SAMPLE_TEMPERATURE,
    SAMPLE_TOP_P,
    VisualRagConfig,
    build_prompt,
    position_words,
    retrieval_query,
    sampling_settings,
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


def test_prompt_and_query() -> None:
    docs = [Document(id="cat-1", text="Cats sleep up to 16 hours a day.")]
    system, user = build_prompt("  What is it? ", CAT, docs)
    assert system["role"] == "system" and "one or two" in system["content"]
    assert user["role"] == "user"
    text = user["content"]
    assert "cat (0.91, center, large)" in text and "bottom right, small" in text
    assert "Cats sleep up to 16 hours a day." in text and text.endswith("Question: What is it?")
    empty = Detections(image_size=[10, 10])
    assert "no objects detected" in build_prompt("q", empty, [])[1]["content"]
    assert retrieval_query(" What is it? ", CAT) == "What is it? cat"
    assert retrieval_query("q", empty) == "q"


@pytest.mark.parametrize(("field", "value"), [("k", 0), ("conf", 1.5), ("max_new_tokens", 0)])
def test_config_validation(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        VisualRagConfig(**{field: value})


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
        (("detect",), "segment"),
        (("detect",), "retrieve"),
        (("segment", "retrieve"), "reason"),
        (("reason",), "compose"),
        (("compose",), END),
    }
    kinds = b.field_kinds()
    assert kinds["llm"] == Kind.TOKEN_LOGPROBS and kinds["masks"] == Kind.MASKS
    assert kinds["documents"] == Kind.DOCUMENTS and kinds["detections"] == Kind.DETECTIONS
    assert b.schema().nodes == ["detect", "segment", "retrieve", "reason", "compose"]


# ------------------------------------------------------------------------------------------------ real models
def _teachers() -> dict[str, Any]:
    import _models

    return {
        "detector": _models.detector(),
        "segmenter": _models.segmenter(),
        "llm": _models.llm(),
        "retriever": _models.retriever(),
    }


@pytest.mark.slow
def test_chelsea_real_run_and_schema() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    import _models
    from graphdistill.graphs import schema_of
    from graphdistill.graphs.visual_rag import visual_rag

    teachers = _teachers()
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
    docs = {d.id: d.text for d in teachers["retriever"].get(final["sources"])}
    assert any("cat" in text.lower() for text in docs.values()), docs
    assert isinstance(writes["reason"]["llm"], TokenLogprobs) and writes["reason"]["llm"].token_ids
    assert isinstance(writes["detect"]["detections"], Detections)
    assert metas["detect"]["graphdistill_model_id"] == teachers["detector"].model_id
    assert metas["reason"]["graphdistill_weights_sha256"] == teachers["llm"].weights_sha256


@pytest.mark.slow
def test_sampling_contract_reaches_the_llm() -> None:
    import _models
    from graphdistill.graphs.visual_rag import visual_rag

    graph = visual_rag(teachers=_teachers())
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
    image = np.asarray(_models.builtin_image("skimage/coffee"))
    dets = Detections(
        xyxy=[[0, 0, 10, 10]], class_ids=[41], names=["cup"], scores=[0.9], image_size=[400, 600]
    )
    out = b.nodes["retrieve"].fn({"question": "What is this?", "detections": dets, "image": image})
    text_ids = [d.id for d in retriever.query(text=retrieval_query("What is this?", dets), k=3)]
    image_ids = [d.id for d in retriever.query(image_embedding=clip.embed_images([image])[0], k=3)]
    assert [d.id for d in out["documents"]] == text_ids + [i for i in image_ids if i not in text_ids]
