"""graphdistill: distil a whole multimodal RAG pipeline into one small model that runs on a phone.

``import graphdistill`` is light: it pulls in no torch, ultralytics, segment_anything, open_clip, chromadb or
transformers. The public names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily, PEP 562)
_EXPORTS: dict[str, str] = {
    "SCHEMA_VERSION": "graphdistill.trace",
    "Trace": "graphdistill.trace",
    "NodeSpan": "graphdistill.trace",
    "Detections": "graphdistill.trace",
    "Masks": "graphdistill.trace",
    "RLE": "graphdistill.trace",
    "Document": "graphdistill.trace",
    "Kind": "graphdistill.trace",
    "GraphSchema": "graphdistill.trace",
    "MissingDependencyError": "graphdistill._lazy",
    "ImageError": "graphdistill.images",
    "load_image": "graphdistill.images",
    "record": "graphdistill.recording.recorder",
    "TraceRecorder": "graphdistill.recording.recorder",
    "TraceNotRecorded": "graphdistill.recording.recorder",
    "TraceStore": "graphdistill.store.trace_store",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphdistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
