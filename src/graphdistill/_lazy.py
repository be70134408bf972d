"""The one helper through which every heavy import goes.

`import graphdistill` must stay light (no torch, ultralytics, segment_anything, open_clip, chromadb or
transformers). Code that needs one of them calls :func:`require` at the point of use; when the package is
missing the error names the exact extra that provides it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from graphdistill.errors import GraphdistillError

# import name -> the extra of graphdistill that installs it
EXTRA_FOR: dict[str, str] = {
    "torch": "train",
    "torchvision": "train",
    "transformers": "llm",
    "gguf": "llm",
    "accelerate": "llm",
    "safetensors": "train",
    "ultralytics": "detect",
    "segment_anything": "sam",
    "mobile_sam": "sam",
    "timm": "train",
    "open_clip": "clip",
    "chromadb": "rag",
    "sentence_transformers": "rag",
    "tokenizers": "train",
    "torchmetrics": "train",
    "faster_coco_eval": "train",
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "executorch": "export",
    "torchao": "export",
    "ray": "ray",
    "fastapi": "ui",
    "uvicorn": "ui",
}


class MissingDependencyError(GraphdistillError, ImportError):
    """A heavy optional dependency is not installed; the message says which extra to install."""


def require(module: str, extra: str | None = None, *, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # the module itself, or one it needs, is missing
        top = module.split(".")[0]
        extra = extra or EXTRA_FOR.get(top, "all")
        what = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"graphdistill needs the package '{top}'{what}, which is not installed "
            f"({exc}). Install it with: pip install 'graphdistill[{extra}]'"
        ) from exc
