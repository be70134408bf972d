"""Real default teachers, loaded once per test process and shared by every test module that needs them.

Only tests marked `slow` use these. Each getter imports its adapter lazily (see docs/design.md).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any


@functools.cache
def detector() -> Any:
    from graphdistill.teachers.detector import YoloDetector

    return YoloDetector()


@functools.cache
def segmenter() -> Any:
    from graphdistill.teachers.segmenter import SamSegmenter

    return SamSegmenter()


@functools.cache
def llm() -> Any:
    from graphdistill.teachers.llm import HFCausalLM

    return HFCausalLM()


@functools.cache
def text_embedder() -> Any:
    from graphdistill.teachers.text_embedder import SentenceEmbedder

    return SentenceEmbedder()


@functools.cache
def kb_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="gd-test-kb-"))


@functools.cache
def retriever() -> Any:
    """The default knowledge base, built once into a private Chroma folder."""
    from graphdistill.teachers.knowledge import default_documents
    from graphdistill.teachers.retriever import ChromaRetriever

    r = ChromaRetriever(path=kb_dir() / "chroma", text_embedder=text_embedder())
    if not r.doc_ids():
        r.ingest(default_documents())
    return r


def visual_rag_teachers() -> dict[str, Any]:
    """The reference graph's four default teachers, by the names visual_rag takes them (a fresh dict each call,
    the models themselves shared)."""
    return {"detector": detector(), "segmenter": segmenter(), "llm": llm(), "retriever": retriever()}


@functools.cache
def builtin_image(photo_id: str) -> Any:
    from graphdistill.recording.photos import photo

    return photo(photo_id).image()
