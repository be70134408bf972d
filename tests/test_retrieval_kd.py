"""Retrieval distillation: a retriever offers its text embedder, training asks it to rank the knowledge base for
synthetic queries made the graph's way, and the sources head learns that ranking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import bag_embedder, dataset_offering, tiny_train_config
from graphdistill.student.retrieval_kd import (
    MAX_LABELS,
    make_retrieval_queries,
    ranking_recall,
    synthetic_queries,
    teacher_targets,
)
from graphdistill.teachers.retriever import RetrieverError, labelled_query, read_knowledge_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["cat", "traffic light", "dog", "cup"]
DOCS = [
    "A cat is a small furry pet that purrs.",
    "A traffic light controls cars at a crossing.",
    "A dog is a loyal pet that barks.",
    "A cup is for drinking coffee or tea.",
]


def test_labelled_query_is_the_question_then_each_label_once() -> None:
    assert labelled_query(" What is it? ", ["cat", "dog", "cat"]) == "What is it? cat dog"
    assert labelled_query("q", []) == "q"


def test_synthetic_queries_swap_the_class_a_question_names_or_quote_a_document() -> None:
    questions = ["Is there a cat in the picture?", "How many traffic lights are there?"]
    queries = synthetic_queries(questions, DOCS, CLASSES, n=300, seed=3)
    assert queries == synthetic_queries(questions, DOCS, CLASSES, n=300, seed=3)  # deterministic in the seed
    assert queries != synthetic_queries(questions, DOCS, CLASSES, n=300, seed=4)
    spans = swapped = 0
    for q in queries:
        assert 1 <= len(q.labels) <= MAX_LABELS and len(set(q.labels)) == len(q.labels)
        assert all(0 <= i < len(CLASSES) for i in q.labels)
        first = CLASSES[q.labels[0]]
        if q.question.startswith(("Is there a ", "How many ")):  # a training question, about the first label
            swapped += 1
            assert f" {first}" in q.question
            others = [c for c in CLASSES if c != first and f" {c}" in q.question]
            assert not others, q  # the class it named is gone
        else:  # a span of a document's words
            spans += 1
            assert any(q.question in d for d in DOCS), q
            assert 3 <= len(q.question.split()) <= 8 or any(d.endswith(q.question) for d in DOCS)
        assert q.text(CLASSES) == labelled_query(q.question, [CLASSES[i] for i in q.labels])
    assert 0.2 < spans / len(queries) < 0.4 and swapped > 0
    with pytest.raises(ValueError, match="class names"):
        synthetic_queries(questions, DOCS, [], n=1)
    with pytest.raises(ValueError, match="questions or document texts"):
        synthetic_queries([" "], [], CLASSES, n=1)


def test_teacher_targets_are_the_embedders_top_k_documents() -> None:
    texts = ["Is there a cat? cat", "coffee cup", "What barks? dog traffic light"]
    t = teacher_targets(bag_embedder, texts, DOCS, k=2)
    assert t.shape == (3, 4) and t.sum(1).tolist() == [2.0, 2.0, 2.0]
    assert t[0, 0] == 1 and t[1, 3] == 1 and t[2, 2] == 1
    sims = bag_embedder(texts) @ bag_embedder(DOCS).T
    expected = np.argsort(-sims, axis=1)[:, :2]
    assert [set(r) for r in expected.tolist()] == [set(np.nonzero(r)[0].tolist()) for r in t.numpy()]
    with pytest.raises(ValueError, match="documents"):
        teacher_targets(bag_embedder, texts, [], k=2)


def test_ranking_recall_is_the_evaluations_sources_recall() -> None:
    import torch

    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert ranking_recall(logits, targets) == pytest.approx((0.5 + 1.0) / 2)


def test_retrieval_queries_tokenise_the_question_and_keep_the_labels() -> None:
    from graphdistill.student.tokenizer import PAD_ID, StudentTokenizer

    tok = StudentTokenizer.train(["Is there a cat in the picture?"] * 3, vocab_size=300, class_names=CLASSES)
    rq = make_retrieval_queries(
        bag_embedder,
        2,
        questions=["Is there a cat in the picture?"],
        documents=DOCS,
        class_names=CLASSES,
        tokenizer=tok,
        max_question_len=6,
        n=40,
        seed=0,
    )
    assert len(rq) == 40 and rq.question_ids.shape == (40, 6) and rq.targets.shape == (40, 4)
    for i, q in enumerate(rq.queries):
        ids = tok.encode(q.question)[:6]
        assert rq.question_ids[i, : len(ids)].tolist() == ids
        assert (rq.question_ids[i, len(ids) :] == PAD_ID).all() and int(rq.question_mask[i].sum()) == len(ids)
        assert rq.classes[i, : len(q.labels)].tolist() == list(q.labels)
        assert int(rq.valid[i].sum()) == len(q.labels)
    half = rq.subset(slice(0, 20))
    assert len(half) == 20 and half.targets.shape == (20, 4)


# ---- training learns the retriever's ranking ---------------------------------------------------------------


def test_training_teaches_the_sources_head_the_offered_retrievers_ranking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graphdistill.teachers.base as base
    from graphdistill.student.train import TrainRecipe

    asked: list[tuple[dict[str, Any], str]] = []

    def fake_load_offer(ref: dict[str, Any], node: str = "") -> Any:
        asked.append((ref, node))
        return base.RetrievalTeacher(
            kind="text-retriever",
            embed=bag_embedder,
            k=int(ref["k"]),
            model_id="toy/bag",
            weights_sha256="c" * 64,
        )

    monkeypatch.setattr(base, "load_offer", fake_load_offer)
    # the synthetic dataset, its graph's retrieve node offering a text embedder (as a recorded visual_rag's does)
    offer = {"kind": "text-retriever", "embedder": "toy-bag", "weights_sha256": "c" * 64, "k": 1}
    ds = dataset_offering(tmp_path / "ds", {"retrieve": offer})

    def recipe(out: str, n: int) -> Any:
        cfg = tiny_train_config(ds, tmp_path / out, epochs=12, lr=3e-3, start="none", retrieval_queries=n)
        r = TrainRecipe(cfg)
        r.setup()
        return r

    taught = recipe("taught", 300)
    assert asked == [
        (json.loads((ds / "manifest.json").read_text())["graph"]["offers"]["retrieve"], "retrieve")
    ]
    assert taught.retrieval is not None and len(taught.retrieval) == 300
    assert taught.retrieval_val is not None and len(taught.retrieval_val) == 256
    before = taught.validate()["retrieval_recall"]
    steps: list[dict[str, float]] = []
    taught.on_step = lambda info: steps.append(info["losses"])
    taught.train()
    after = taught.validate()["retrieval_recall"]
    assert all("retrieval" in s for s in steps)
    assert after > before + 0.15, (before, after)  # it learnt to rank as the retriever on unseen queries
    meta = taught.save()  # the run names the retriever that taught it
    assert json.loads((tmp_path / "taught" / "meta.json").read_text())["retrieval_teacher"] == {
        "kind": "text-retriever", "node": "", "model_id": "toy/bag", "weights_sha256": "c" * 64, "k": 1,
        "queries": 300,
    }  # fmt: skip
    assert meta["val"]["retrieval_recall"] == pytest.approx(after)

    plain = recipe("plain", 0)  # 0 queries: the traces alone, and the offer is never loaded
    assert plain.retrieval is None and len(asked) == 1
    plain.on_step = lambda info: steps.append(info["losses"])
    steps.clear()
    plain.train()
    assert steps and not any("retrieval" in s for s in steps)
    assert "retrieval_recall" not in plain.validate() and plain.meta()["retrieval_teacher"] is None


@pytest.mark.slow
def test_the_real_retriever_offers_its_embedder_and_the_targets_are_chromas_ranking() -> None:
    import _models
    from graphdistill.graphs.visual_rag import visual_rag_builder
    from graphdistill.teachers.base import OfferError, RetrievalTeacher, load_offer
    from graphdistill.teachers.knowledge import default_documents

    retriever = _models.retriever()
    ref = retriever.student_offer()
    assert ref is not None and ref["kind"] == "text-retriever" and ref["embedder"] == "all-minilm-l6-v2"
    assert ref["k"] == retriever.k and ref["weights_sha256"] == _models.text_embedder().weights_sha256
    unused = object()
    schema = visual_rag_builder(
        teachers={"detector": unused, "segmenter": unused, "llm": unused, "retriever": retriever}
    ).schema()
    assert schema.offers["retrieve"] == ref  # recorded with every trace, carried into the dataset
    teacher = load_offer(ref, node="retrieve")
    assert isinstance(teacher, RetrievalTeacher) and teacher.node == "retrieve"
    docs = default_documents()
    queries = [
        labelled_query("What is in the picture?", ["cat"]),
        labelled_query("Anything here I could drink from?", ["cup", "dining table"]),
        labelled_query("worn around the neck", ["person", "tie"]),
    ]
    targets = teacher_targets(teacher.embed, queries, [d.text for d in docs], k=retriever.k)
    for q, row in zip(queries, targets, strict=True):
        ours = {docs[i].id for i in row.nonzero().flatten().tolist()}
        assert ours == {d.id for d in retriever.query(text=q)}, q
    with pytest.raises(OfferError, match="is not the recorded"):
        load_offer({**ref, "weights_sha256": "0" * 64})
    # the offer names its knowledge base, and the filter reads all of it: the student ranks what Chroma does
    assert ref["knowledge_base"] == {"path": retriever.location, "collection": retriever.collection_name}
    assert [d.id for d in read_knowledge_base(ref)] == sorted(d.id for d in docs)
    with pytest.raises(RetrieverError, match="no Chroma database"):
        read_knowledge_base({**ref, "knowledge_base": {**ref["knowledge_base"], "path": "/nonexistent/kb"}})
