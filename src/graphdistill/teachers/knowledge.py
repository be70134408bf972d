"""The knowledge base: the default COCO facts shipped in the package, and user JSONL files.

A knowledge-base JSONL file has one JSON object per line: ``{"id": str, "text": str[, "label": str]}``
(blank lines are skipped). Ids must be unique within the file. The shipped file
``teachers/kb/coco_facts.jsonl`` holds at least three short facts about each of the 80 COCO classes, with
stable ids ``coco/<class, spaces as underscores>/<n>``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from graphdistill.errors import GraphdistillError
from graphdistill.teachers.base import Retriever
from graphdistill.trace import Document

log = logging.getLogger(__name__)

DEFAULT_KB = "coco_facts.jsonl"


class KnowledgeBaseError(GraphdistillError, ValueError):
    """A knowledge-base file is unreadable or has a bad row; the message names the file and the line."""


def parse_jsonl(text: str, source: str) -> list[Document]:
    """Rows of a knowledge-base JSONL file -> documents (metadata ``{"label": ...}`` when a label is given).

    Every row is checked before anything is returned, so a bad file is refused as a whole.
    """
    docs: list[Document] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KnowledgeBaseError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise KnowledgeBaseError(f"{where}: expected a JSON object, got {type(row).__name__}")
        unknown = set(row) - {"id", "text", "label"}
        if unknown:
            raise KnowledgeBaseError(
                f"{where}: unknown field(s) {sorted(unknown)}; rows have id, text and optional label"
            )
        doc_id, text_value, label = row.get("id"), row.get("text"), row.get("label")
        if not isinstance(doc_id, str) or not doc_id.strip():
            raise KnowledgeBaseError(f"{where}: 'id' must be a non-empty string, got {doc_id!r}")
        if not isinstance(text_value, str) or not text_value.strip():
            raise KnowledgeBaseError(f"{where}: 'text' must be a non-empty string (row id {doc_id!r})")
        if label is not None and not isinstance(label, str):
            raise KnowledgeBaseError(f"{where}: 'label' must be a string, got {label!r}")
        if doc_id in first_line:
            raise KnowledgeBaseError(
                f"{where}: duplicate id {doc_id!r} (first seen on line {first_line[doc_id]})"
            )
        first_line[doc_id] = lineno
        meta = {"label": label} if label is not None else {}
        docs.append(Document(id=doc_id, text=text_value.strip(), metadata=meta))
    return docs


def load_jsonl(path: str | os.PathLike[str]) -> list[Document]:
    """Read and validate a knowledge-base JSONL file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KnowledgeBaseError(f"{p}: no such knowledge-base file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KnowledgeBaseError(f"{p}: cannot read it ({exc})") from None
    docs = parse_jsonl(text, str(p))
    if not docs:
        raise KnowledgeBaseError(f"{p}: has no rows")
    return docs


def default_documents() -> list[Document]:
    """The shipped knowledge base: facts about every COCO class (metadata ``{"label": class name}``)."""
    res = resources.files("graphdistill.teachers").joinpath("kb", DEFAULT_KB)
    return parse_jsonl(res.read_text(encoding="utf-8"), f"graphdistill/teachers/kb/{DEFAULT_KB}")


def ingest_documents(
    retriever: Retriever,
    docs: Sequence[Document],
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Ingest ``docs`` into ``retriever`` (those it already holds only with ``force``), a batch of the
    retriever's size at a time; ``progress(done, total)`` after each. Returns ``{rows, ingested,
    skipped_already_present, total_documents}``."""
    present = set(retriever.doc_ids())
    todo = list(docs) if force else [d for d in docs if d.id not in present]
    step = max(1, int(getattr(retriever, "batch_size", 128)))
    for start in range(0, len(todo), step):
        retriever.ingest(todo[start : start + step])
        if progress is not None:
            progress(min(start + step, len(todo)), len(todo))
    return {
        "rows": len(docs),
        "ingested": len(todo),
        "skipped_already_present": len(docs) - len(todo),
        "total_documents": len(present | {d.id for d in todo}),
    }


def ensure_default_kb(retriever: Retriever) -> int:
    """Build the default knowledge base into ``retriever``: the default documents it does not hold yet.

    Returns how many documents were written (0 when the collection was already complete).
    """
    docs = default_documents()
    result = ingest_documents(retriever, docs)
    if result["ingested"]:
        log.info(
            "built the default knowledge base (%d of %d documents written)", result["ingested"], len(docs)
        )
    return result["ingested"]
