"""Retrieval distillation: a retriever offers its text embedder, training asks it to rank the knowledge base for
synthetic queries made the graph's way, and the sources head learns that ranking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import EXPORT_WARNINGS, bag_embedder, dataset_offering, tiny_train_config
from graphdistill.student.retrieval_kd import (
    MAX_LABELS,
    make_retrieval_queries,
    ranking_recall,
    synthetic_queries,
    teacher_rankings,
    teacher_space,
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
    t = teacher_rankings(bag_embedder, texts, DOCS, k=2)[0]
    assert t.shape == (3, 4) and t.sum(1).tolist() == [2.0, 2.0, 2.0]
    assert t[0, 0] == 1 and t[1, 3] == 1 and t[2, 2] == 1
    sims = bag_embedder(texts) @ bag_embedder(DOCS).T
    expected = np.argsort(-sims, axis=1)[:, :2]
    assert [set(r) for r in expected.tolist()] == [set(np.nonzero(r)[0].tolist()) for r in t.numpy()]
    with pytest.raises(ValueError, match="documents"):
        teacher_rankings(bag_embedder, texts, [], k=2)


def test_the_retrievers_space_keeps_what_tells_the_documents_apart() -> None:
    import torch

    texts = ["Is there a cat? cat", "coffee cup", "What barks? dog traffic light"]
    _, q, d = teacher_rankings(bag_embedder, texts, DOCS, k=2)
    assert torch.allclose(q, torch.as_tensor(bag_embedder(texts))) and d.shape == (4, 64)
    full = teacher_space(d, 8)  # 4 documents span 3 directions about their mean: the rest are zero columns
    assert full.shape == (64, 8) and torch.count_nonzero(full.abs().sum(0) > 1e-6) == 3
    assert torch.allclose(full.t() @ full, torch.diag((full.abs().sum(0) > 1e-6).float()), atol=1e-5)
    # on every direction the documents differ in, their differences are kept exactly, and a query's dot
    # product with each document moves by the same amount for all of them: the retriever's order stays
    diff = d[:, None] - d[None]
    assert torch.allclose((diff @ full).norm(dim=-1), diff.norm(dim=-1), atol=1e-5)
    moved = (q @ full) @ (d @ full).t() - q @ d.t()
    assert torch.allclose(moved, moved[:, :1].expand_as(moved), atol=1e-5)
    one = teacher_space(d, 1)  # fewer directions: the one the documents spread along most
    assert torch.allclose(one[:, 0].abs(), full[:, 0].abs(), atol=1e-5)
    assert (d @ one).var() >= (d @ full[:, 1:2]).var() - 1e-6
    with pytest.raises(ValueError, match="at least one dimension"):
        teacher_space(d, 0)


def test_the_head_in_the_retrievers_space_ranks_by_the_cosine_with_the_documents() -> None:
    import torch

    from graphdistill.student.model import SpaceSourceHead

    head = SpaceSourceHead(8, [[5, 6], [7], [], [5]], num_docs=4, vocab_size=10, dims=3)
    keys = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    head.set_space(keys)
    assert torch.allclose(head.doc_keys.norm(dim=-1), torch.ones(4))  # a document is a direction
    emb = torch.nn.Embedding(10, 8)
    ids, mask = torch.tensor([[5, 7, 0]]), torch.tensor([[True, True, False]])
    q = head.query(ids, mask, emb)
    assert q.shape == (1, 3) and torch.allclose(q.norm(dim=-1), torch.ones(1))
    with torch.no_grad():  # a query along the second document's direction ranks it first
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    logits = head(ids, mask, emb)
    assert logits.argmax().item() == 1 and logits[0, 3] > logits[0, 0] > logits[0, 2] - 1e-6
    before = head.token_weight.detach().clone()
    assert "doc_keys" in head.state_dict()  # the documents travel with the weights: nothing rebuilds them
    # a word no training query held says nothing: with 9 unknown, the query ranks as it does without it
    known = torch.ones(10, dtype=torch.bool)
    known[9] = False
    with torch.no_grad():
        head.proj.weight.normal_()
        head.proj.bias.zero_()
    head.set_space(keys, known)
    assert head.token_weight[9].item() == 0 and torch.equal(head.token_weight[:9], before[:9])
    with_unknown = head(torch.tensor([[5, 9, 7]]), torch.ones(1, 3, dtype=torch.bool), emb)
    assert torch.allclose(with_unknown, head(ids, mask, emb), atol=1e-6)
    with pytest.raises(ValueError, match="known tokens of shape"):
        head.set_space(keys, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(4, 2\) for a head of \(4, 3\)"):
        head.set_space(torch.ones(4, 2))


def test_ranking_recall_is_the_evaluations_sources_recall() -> None:
    import torch

    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert ranking_recall(logits, targets) == pytest.approx((0.5 + 1.0) / 2)


def test_retrieval_queries_tokenise_the_question_and_keep_the_labels() -> None:
    import torch

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
    assert rq.vectors is None and rq.doc_keys is None and "retrieval_vectors" not in rq.batch(torch.arange(2))
    spaced = make_retrieval_queries(
        bag_embedder, 2, questions=["Is there a cat in the picture?"], documents=DOCS, class_names=CLASSES,
        tokenizer=tok, max_question_len=6, n=40, seed=0, dims=3,
    )  # fmt: skip
    assert torch.equal(spaced.targets, rq.targets)
    basis = teacher_space(torch.as_tensor(bag_embedder(DOCS)), 3)
    texts = [q.text(CLASSES) for q in spaced.queries]
    assert spaced.vectors is not None and spaced.doc_keys is not None
    assert torch.allclose(spaced.vectors, torch.as_tensor(bag_embedder(texts)) @ basis, atol=1e-5)
    assert torch.allclose(spaced.doc_keys, torch.as_tensor(bag_embedder(DOCS)) @ basis, atol=1e-5)
    part = spaced.subset(slice(5, 9))
    assert part.vectors is not None and torch.equal(part.vectors, spaced.vectors[5:9])
    assert torch.equal(part.batch(torch.tensor([1]))["retrieval_vectors"], spaced.vectors[6:7])


# ---- training learns the retriever's ranking ---------------------------------------------------------------


@pytest.mark.filterwarnings(*EXPORT_WARNINGS)
def test_training_teaches_the_sources_head_the_offered_retrievers_ranking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import graphdistill.teachers.base as base
    from graphdistill.export.bundle import export_run
    from graphdistill.runner.bundle import MANIFEST
    from graphdistill.student.config import SOURCE_DIMS
    from graphdistill.student.model import SpaceSourceHead
    from graphdistill.student.predict import load_student
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
    # the head ranks in the retriever's space: the documents are the retriever's own vectors, projected
    head = taught.model.source_head
    cfg = taught.model_config  # a knowledge base of fewer documents than SOURCE_DIMS: one dimension each
    assert isinstance(head, SpaceSourceHead) and cfg.source_dims == cfg.num_sources < SOURCE_DIMS
    assert taught.retrieval.doc_keys is not None
    assert torch.allclose(head.doc_keys, torch.nn.functional.normalize(taught.retrieval.doc_keys, dim=-1))
    before = taught.validate()["retrieval_recall"]
    steps: list[dict[str, float]] = []
    taught.on_step = lambda info: steps.append(info["losses"])
    taught.train()
    after = taught.validate()["retrieval_recall"]
    assert all("retrieval" in s and "retrieval_embed" in s for s in steps)
    seen = set(taught.retrieval.question_ids[taught.retrieval.question_mask].tolist())
    unseen = [
        t for t in range(cfg.vocab_size) if t not in seen and t not in taught.model.class_words.tolist()
    ]
    unseen = [
        t
        for t in unseen
        if t not in {i for r in taught._train_rows() for i in taught.tokenizer.encode(r.question)}
    ]
    assert unseen and bool((head.token_weight[unseen] == 0).all())  # words no training query held stay silent
    assert bool((head.token_weight[sorted(seen - {0})] != 0).any())
    assert after > before + 0.15, (before, after)  # it learnt to rank as the retriever on unseen queries
    meta = taught.save()  # the run names the retriever that taught it
    assert json.loads((tmp_path / "taught" / "meta.json").read_text())["retrieval_teacher"] == {
        "kind": "text-retriever", "node": "", "model_id": "toy/bag", "weights_sha256": "c" * 64, "k": 1,
        "queries": 300,
    }  # fmt: skip
    assert meta["val"]["retrieval_recall"] == pytest.approx(after)
    # the run folder holds the documents' vectors: the loaded student ranks as the trained one did
    loaded = load_student(tmp_path / "taught").model
    b = taught.retrieval_val.batch(torch.arange(16))
    objects = {"classes": b["classes"], "valid": b["valid"]}
    with torch.no_grad():
        want = taught.model.eval().rank_sources(b["question_ids"], b["question_mask"], objects)
        got = loaded.rank_sources(b["question_ids"], b["question_mask"], objects)
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(loaded.source_head.doc_keys, head.doc_keys)
    # and its exported program ranks as it does (the parity gate compares the sources, among the rest)
    export_run(tmp_path / "taught", "onnx", tmp_path / "bundle", n_calibration=3, n_heldout=3)
    gate = json.loads((tmp_path / "bundle" / MANIFEST).read_text())["parity"]
    assert gate["passed"] and gate["vs_pytorch"]["source_logits_max_abs_diff"] <= 1e-3, gate

    plain = recipe("plain", 0)  # 0 queries: the traces alone, and the offer is never loaded
    assert plain.retrieval is None and len(asked) == 1
    assert not isinstance(plain.model.source_head, SpaceSourceHead) and plain.model_config.source_dims == 0
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
    targets = teacher_rankings(teacher.embed, queries, [d.text for d in docs], k=retriever.k)[0]
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


def test_the_train_command_states_the_trainers_number_of_queries() -> None:
    """The command leaves the default to TrainConfig (it cannot import the student: the runner's commands run
    where it is missing) and says what it is."""
    from graphdistill.cli import build_parser
    from graphdistill.student.train import TrainConfig

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    action = next(a for a in train._actions if a.dest == "retrieval_queries")
    assert action.default is None
    assert f"default {TrainConfig(dataset='', out='').retrieval_queries}" in (action.help or "")


def test_a_head_in_the_retrievers_space_without_a_retriever_is_refused(tmp_path: Path) -> None:
    from graphdistill.dataset import make_synthetic_dataset
    from graphdistill.student.train import TrainRecipe

    make_synthetic_dataset(tmp_path / "ds", n=6, seed=0, size=64)  # its graph offers nothing
    cfg = tiny_train_config(tmp_path / "ds", tmp_path / "run", start="none")
    cfg.overrides = {**cfg.overrides, "source_dims": 4}
    with pytest.raises(ValueError, match="source_dims=4: .* no node of the graph offers its retriever"):
        TrainRecipe(cfg).setup()
