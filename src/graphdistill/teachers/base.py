"""The small interfaces every teacher adapter satisfies (structural typing: no shared base class).

Each adapter lives in its own file (``llm.py``, ``detector.py``, ...) and is checked against the protocol of
its role by shape only, so a user's own adapter needs no import from here to plug into a teacher graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from graphdistill.errors import GraphdistillError
from graphdistill.trace import Detections, Document, Masks, TokenLogprobs

Messages = list[dict[str, str]]
"""A chat: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``."""

Prompt = str | Messages
"""A bare user message or a whole chat."""


@runtime_checkable
class Teacher(Protocol):
    """What every adapter tells a trace about itself."""

    model_id: str
    weights_sha256: str
    device: str


@runtime_checkable
class Detector(Teacher, Protocol):
    names: list[str]

    def detect(self, image: np.ndarray) -> Detections: ...

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]: ...


@runtime_checkable
class Segmenter(Teacher, Protocol):
    def segment(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> Masks: ...

    def segment_batch(
        self, images: Sequence[np.ndarray], boxes_per_image: Sequence[Sequence[Sequence[float]]]
    ) -> list[Masks]: ...


@dataclass(frozen=True)
class LLMOutput:
    """One generated answer: the text, the teacher's top-k log-probabilities per token, why it stopped."""

    text: str
    logprobs: TokenLogprobs
    finish_reason: Literal["stop", "length"]


@runtime_checkable
class LLM(Teacher, Protocol):
    """``max_new_tokens``, ``stop`` (strings that end an answer) and ``max_sentences``: None means the
    adapter's own setting. A chat prompt that ends with an assistant message asks for its continuation: the
    answer goes on from that opening and ``text`` holds only what the model added (visual_rag's reason node
    sends one by default, ``VisualRagConfig.scene_opening``)."""

    def generate(
        self,
        prompt: Prompt,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        max_sentences: int | None = None,
    ) -> LLMOutput: ...

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        max_sentences: int | None = None,
    ) -> list[LLMOutput]: ...


@runtime_checkable
class TextEmbedder(Teacher, Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class ImageEmbedder(Teacher, Protocol):
    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class Retriever(Teacher, Protocol):
    def ingest(self, docs: Sequence[Document]) -> int: ...

    def query(
        self, text: str | None = None, image_embedding: np.ndarray | None = None, k: int | None = None
    ) -> list[Document]: ...

    def query_batch(self, texts: Sequence[str], k: int | None = None) -> list[list[Document]]: ...

    def doc_ids(self) -> list[str]: ...

    def get(self, ids: Sequence[str]) -> list[Document]: ...


def pick_device(device: str | None) -> str:
    """``None`` -> "cuda" when torch sees a GPU, else "cpu"; an explicit choice is returned unchanged."""
    if device:
        return device
    from graphdistill._lazy import require

    torch: Any = require("torch")
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------------
# What a teacher offers the student to start from
# --------------------------------------------------------------------------------------------------------
# An adapter may have a method ``student_offer() -> dict | None``: a small JSON reference (``kind``, the weights
# and their sha256, the licence, whatever its loader needs) that the graph schema records per node
# (``GraphSchema.offers``) and the dataset carries to training. :func:`load_offer` turns it back into modules the
# student starts from. A student whose graph's nodes offer nothing starts from scratch.

# kind -> "module:function" that loads that kind of offer (imported only when such an offer is used)
OFFER_LOADERS: dict[str, str] = {
    "ultralytics-detect": "graphdistill.teachers.detector:load_student_start",
    "text-retriever": "graphdistill.teachers.text_embedder:load_retrieval_teacher",
}


class OfferError(GraphdistillError, ValueError):
    """An offer cannot be loaded: an unknown kind, weights that are missing or no longer match their sha256."""


@dataclass
class StudentStart:
    """Modules a teacher offers, loaded: the student builds its part from ``spec`` and copies ``state_dict``.

    ``kind`` says which part and how to build it (``"ultralytics-detect"``: the vision trunk and the dense
    detection head of an Ultralytics detector, ``spec`` its model YAML as a dict). The licence of the weights
    travels with them into every run and bundle started from them."""

    kind: str
    spec: dict[str, Any]
    state_dict: dict[str, Any]
    class_names: list[str]
    input_size: int  # the image size the teacher itself runs at
    score_threshold: float  # the teacher's own confidence threshold: the student keeps objects above it
    nms_iou: float
    model_id: str
    weights_sha256: str
    licence: str
    node: str = ""  # the graph node that offered it

    def describe(self) -> dict[str, Any]:
        """Where the student's starting weights came from (for run meta and bundle manifests)."""
        return _offered_by(self) | {"licence": self.licence}


@dataclass
class RetrievalTeacher:
    """A retriever's offer, loaded: its text embedder, which the trainer asks to rank the knowledge base for
    queries no recorded trace asked (:mod:`graphdistill.student.retrieval_kd`). Nothing of it enters the
    student's weights: it is a teacher the trainer may call, as cheap as one embedding per query."""

    kind: str
    embed: Callable[[Sequence[str]], Any]  # texts -> [n, dim] L2-normalised vectors (cosine = dot product)
    k: int  # how many documents the retriever returns
    model_id: str
    weights_sha256: str
    node: str = ""

    def describe(self) -> dict[str, Any]:
        """Which retriever taught the run (for its meta)."""
        return _offered_by(self) | {"k": self.k}


def _offered_by(loaded: StudentStart | RetrievalTeacher) -> dict[str, Any]:
    return {
        "kind": loaded.kind,
        "node": loaded.node,
        "model_id": loaded.model_id,
        "weights_sha256": loaded.weights_sha256,
    }


def load_offer(ref: dict[str, Any], node: str = "") -> StudentStart | RetrievalTeacher:
    """A node's offer reference (``GraphSchema.offers[node]``) -> what it offers, loaded: modules the student
    starts from (:class:`StudentStart`) or a teacher the trainer may call (:class:`RetrievalTeacher`)."""
    import importlib

    kind = str(ref.get("kind", ""))
    target = OFFER_LOADERS.get(kind)
    if target is None:
        raise OfferError(
            f"node {node or '?'} offers modules of unknown kind {kind!r}; known: {sorted(OFFER_LOADERS)}"
        )
    module, _, attr = target.partition(":")
    loaded: StudentStart | RetrievalTeacher = getattr(importlib.import_module(module), attr)(ref)
    loaded.node = node
    return loaded


def pick_offer(offers: dict[str, dict[str, Any]], kind: str) -> tuple[str, dict[str, Any]] | None:
    """The first node (schema order) whose offer is of ``kind``, with its reference; None when none is."""
    for node, ref in offers.items():
        if ref.get("kind") == kind:
            return node, ref
    return None
