"""Retrieval distillation: the student's sources head learns to rank the knowledge base as the teacher's
retriever does, on queries no recorded trace asked.

A recorded trace teaches the sources head one ranking: the documents its one query (the question and the
labels the detector found) retrieved. A few hundred traces about a few photos name a few classes, so the head
learns which documents those photos retrieved, not how the retriever ranks (the README has the measured
effect). The retriever is the cheapest teacher in the graph: one sentence embedding a query.
When the graph's retrieve node offers its text embedder (``ChromaRetriever.student_offer``, kind
``"text-retriever"``), training asks it about thousands of synthetic queries, made the way the graph makes its
own (:func:`graphdistill.teachers.retriever.labelled_query`):

- the question: one of the dataset's training questions with the class it names swapped for the query's first
  label (the user's own wording, about every class of the detector's label set), or a span of a document's
  text (the knowledge base's own words: "drink", "cutlery", "worn around the neck"), which teaches the
  words no training question uses;
- the labels: one to three classes of the label set, drawn at random.

The teacher's top ``k`` documents for each (cosine of the embeddings, as Chroma ranks them) are the target of
the same listwise loss as the recorded rows' (``losses["retrieval"]``). A head that ranks in the retriever's own
space (``StudentConfig.source_dims``, :class:`graphdistill.student.model.SpaceSourceHead`) holds the
documents' embeddings projected onto their ``dims`` principal directions (:func:`teacher_space`) and also learns
the retriever's query embedding itself, projected the same way (``losses["retrieval_embed"]``, one minus the
cosine): a whole vector per query instead of a top-k set. Fitted alone on 20,000 of the demo's queries, it
recalled 0.76 of the retriever's top 3 on unseen ones, the word head fitted the same way 0.72 (README).
Only the sources head and the token embeddings it shares learn from them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from graphdistill.student.model import PAD_ID
from graphdistill.student.tokenizer import StudentTokenizer
from graphdistill.teachers.retriever import labelled_query

log = logging.getLogger(__name__)

SPAN_SHARE = 0.3  # the share of queries whose question is a span of a document's text
SPAN_WORDS = (3, 8)  # a span's length in words, both ends included
MAX_LABELS = 3  # a query holds 1..MAX_LABELS labels
EMBED_BATCH = 256


@dataclass(frozen=True)
class SyntheticQuery:
    question: str
    labels: tuple[int, ...]  # class indices, distinct

    def text(self, class_names: Sequence[str]) -> str:
        """What the teacher's retriever embeds for it."""
        return labelled_query(self.question, [class_names[i] for i in self.labels])


@dataclass
class RetrievalQueries:
    """Synthetic queries, tokenised for the student, with the teacher's ranking as their target."""

    queries: list[SyntheticQuery]
    question_ids: Tensor  # [N, Lq] int64, PAD after the question
    question_mask: Tensor  # [N, Lq] bool
    classes: Tensor  # [N, MAX_LABELS] int64
    valid: Tensor  # [N, MAX_LABELS] bool
    targets: Tensor  # [N, D] float: 1 on the teacher's top-k documents
    # with a head in the retriever's space (dims > 0): the retriever's embedding of each query and of each
    # document, projected onto the documents' principal directions (:func:`teacher_space`); else None
    vectors: Tensor | None = None  # [N, dims]
    doc_keys: Tensor | None = None  # [D, dims]

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, rows: slice) -> RetrievalQueries:
        return RetrievalQueries(
            self.queries[rows],
            self.question_ids[rows],
            self.question_mask[rows],
            self.classes[rows],
            self.valid[rows],
            self.targets[rows],
            None if self.vectors is None else self.vectors[rows],
            self.doc_keys,
        )

    def batch(self, idx: Tensor, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Rows ``idx`` as training inputs: the student's query parts and ``retrieval_targets``."""
        out = {
            "question_ids": self.question_ids[idx].to(device),
            "question_mask": self.question_mask[idx].to(device),
            "classes": self.classes[idx].to(device),
            "valid": self.valid[idx].to(device),
            "retrieval_targets": self.targets[idx].to(device),
        }
        if self.vectors is not None:
            out["retrieval_vectors"] = self.vectors[idx].to(device)
        return out


def _name_pattern(class_names: Sequence[str]) -> re.Pattern[str] | None:
    names = sorted({n for n in class_names if n}, key=len, reverse=True)  # "traffic light" before "light"
    if not names:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")(?=s?\b)", re.IGNORECASE)


def synthetic_queries(
    questions: Sequence[str],
    documents: Sequence[str],
    class_names: Sequence[str],
    n: int,
    seed: int = 0,
) -> list[SyntheticQuery]:
    """``n`` queries (see the module docstring): training ``questions`` with their class swapped for the
    query's first label, or spans of ``documents``; labels drawn from ``class_names``. Deterministic in
    ``seed``."""
    if not class_names:
        raise ValueError("synthetic retrieval queries need the detector's class names")
    qs = [q for q in questions if q and q.strip()]
    docs = [d.split() for d in documents if d and d.split()]
    if not qs and not docs:
        raise ValueError("synthetic retrieval queries need training questions or document texts")
    pattern = _name_pattern(class_names)
    rng = np.random.default_rng(seed)
    out: list[SyntheticQuery] = []
    for _ in range(n):
        m = int(rng.integers(1, min(MAX_LABELS, len(class_names)) + 1))
        labels = tuple(int(i) for i in rng.choice(len(class_names), size=m, replace=False))
        if docs and (not qs or rng.random() < SPAN_SHARE):
            words = docs[int(rng.integers(len(docs)))]
            start = int(rng.integers(len(words)))
            length = int(rng.integers(SPAN_WORDS[0], SPAN_WORDS[1] + 1))
            question = " ".join(words[start : start + length])
        else:
            question = qs[int(rng.integers(len(qs)))]
            if pattern is not None:
                question = pattern.sub(class_names[labels[0]], question)
        out.append(SyntheticQuery(question, labels))
    return out


def teacher_rankings(
    embed: Callable[[Sequence[str]], Any],
    texts: Sequence[str],
    documents: Sequence[str],
    k: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(targets [len(texts), len(documents)] 0/1: each text's ``k`` nearest documents by the cosine of ``embed``'s
    vectors (L2-normalised: a dot product), as the teacher's retriever ranks them; the texts' vectors
    [len(texts), E]; the documents' vectors [len(documents), E]), the vectors as ``embed`` gives them."""
    if not documents:
        raise ValueError("retrieval distillation needs the knowledge base's documents")
    docs = torch.as_tensor(np.asarray(embed(list(documents)), dtype=np.float32))
    targets = torch.zeros(len(texts), len(documents))
    vectors = torch.zeros(len(texts), docs.shape[1])
    k = min(k, len(documents))
    for start in range(0, len(texts), EMBED_BATCH):
        chunk = list(texts[start : start + EMBED_BATCH])
        vecs = torch.as_tensor(np.asarray(embed(chunk), dtype=np.float32))
        vectors[start : start + len(chunk)] = vecs
        top = (vecs @ docs.t()).topk(k, dim=-1).indices
        targets[start : start + len(chunk)].scatter_(1, top, 1.0)
        if progress is not None:
            progress("retrieval targets", min(start + EMBED_BATCH, len(texts)), len(texts))
    return targets, vectors, docs


def teacher_space(doc_vectors: Tensor, dims: int) -> Tensor:
    """[E, dims]: the ``dims`` principal directions of the documents' embeddings ``doc_vectors`` [D, E] (right
    singular vectors of the centred matrix, largest first), zero columns past their rank. Projected onto them
    the documents keep what tells them apart in the fewest numbers; the retriever's ranking survives the
    projection to the extent the directions dropped carry little (on the demo's 240 documents and MiniLM's 384
    dimensions, 64 directions keep 0.89 of its top-3)."""
    if dims < 1:
        raise ValueError(f"the retriever's space needs at least one dimension, got {dims}")
    centred = doc_vectors.double() - doc_vectors.double().mean(0, keepdim=True)
    _, sv, vt = torch.linalg.svd(centred, full_matrices=False)
    rank = int((sv > sv[:1].clamp(min=1e-12) * 1e-6).sum()) if len(sv) else 0  # a null direction says nothing
    basis = torch.zeros(doc_vectors.shape[1], dims, dtype=torch.float64)
    n = min(dims, rank)
    basis[:, :n] = vt[:n].t()
    return basis.float()


def make_retrieval_queries(
    embed: Callable[[Sequence[str]], Any],
    k: int,
    *,
    questions: Sequence[str],
    documents: Sequence[str],
    class_names: Sequence[str],
    tokenizer: StudentTokenizer,
    max_question_len: int,
    n: int,
    seed: int = 0,
    dims: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> RetrievalQueries:
    """``n`` synthetic queries (:func:`synthetic_queries`), their teacher targets (:func:`teacher_rankings`,
    ``embed`` being the retriever's text embedder and ``k`` its number of results) and the student's inputs
    for them (the question's tokens, cut to ``max_question_len``, and the labels' class indices). With
    ``dims`` > 0 also the retriever's query and document vectors in its ``dims``-dimensional space
    (:func:`teacher_space`)."""
    queries = synthetic_queries(questions, documents, class_names, n, seed=seed)
    targets, q_vecs, d_vecs = teacher_rankings(
        embed, [q.text(class_names) for q in queries], documents, k, progress
    )
    vectors = doc_keys = None
    if dims > 0:
        basis = teacher_space(d_vecs, dims)
        vectors, doc_keys = q_vecs @ basis, d_vecs @ basis
    ids = torch.full((n, max_question_len), PAD_ID, dtype=torch.long)
    mask = torch.zeros(n, max_question_len, dtype=torch.bool)
    classes = torch.zeros(n, MAX_LABELS, dtype=torch.long)
    valid = torch.zeros(n, MAX_LABELS, dtype=torch.bool)
    for i, q in enumerate(queries):
        toks = tokenizer.encode(q.question)[:max_question_len]
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[i, : len(toks)] = True
        classes[i, : len(q.labels)] = torch.tensor(q.labels, dtype=torch.long)
        valid[i, : len(q.labels)] = True
    return RetrievalQueries(queries, ids, mask, classes, valid, targets, vectors, doc_keys)


def ranking_recall(logits: Tensor, targets: Tensor) -> float | None:
    """Sources recall (:func:`graphdistill.eval.metrics.source_metrics`) of the student's ranking ``logits``
    [N,D] against the teacher's ``targets`` [N,D] (0/1)."""
    from graphdistill.eval.metrics import source_metrics

    k = int(targets.sum(-1).max().item()) if len(targets) else 0
    order = logits.topk(max(k, 1), dim=-1).indices.tolist()
    teacher = [[str(j) for j in row.nonzero().flatten().tolist()] for row in targets]
    return source_metrics(teacher, [[str(j) for j in row] for row in order])["sources_recall"]
