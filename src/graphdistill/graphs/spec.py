"""Loading a teacher graph from a spec string: ``module:attr`` or ``path/to/file.py:attr``.

The attribute may be a :class:`~graphdistill.graphs.builder.GraphBuilder` (compiled here), a compiled LangGraph
graph, or a zero-argument factory returning either. ``None`` gives the reference ``visual_rag`` graph.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from graphdistill._user_code import import_user_module
from graphdistill.errors import GraphdistillError
from graphdistill.graphs.builder import GraphBuilder

log = logging.getLogger(__name__)


class GraphSpecError(GraphdistillError, ValueError):
    """A graph spec does not name a usable teacher graph; the message names the spec."""


def load_graph(spec: str | None, **overrides: Any) -> Any:
    """The compiled teacher graph a spec names.

    ``overrides`` go to the reference graph's :class:`~graphdistill.graphs.visual_rag.VisualRagConfig`
    fields (plus ``teachers=``) when ``spec`` is None, and to a factory's keyword arguments otherwise.
    """
    if spec is None or not spec.strip():
        from graphdistill.graphs.visual_rag import VisualRagConfig, visual_rag

        teachers = overrides.pop("teachers", None)
        try:
            config = VisualRagConfig(**{k: v for k, v in overrides.items() if v is not None})
        except TypeError as exc:
            raise GraphSpecError(f"visual_rag: {exc}") from exc
        return visual_rag(config, teachers=teachers)
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise GraphSpecError(f"graph spec {spec!r}: expected 'package.module:attr' or 'path/to/file.py:attr'")
    module = import_user_module(module_part, f"graph spec {spec!r}", GraphSpecError)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GraphSpecError(f"graph spec {spec!r}: {module_part} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _to_graph(obj, spec, overrides)


def _is_compiled_graph(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("invoke", "batch", "stream", "get_graph"))


def _to_graph(obj: Any, spec: str, overrides: dict[str, Any], depth: int = 0) -> Any:
    if isinstance(obj, GraphBuilder):
        return obj.compile()
    from langgraph.graph import StateGraph

    if isinstance(obj, StateGraph):
        return obj.compile()
    if _is_compiled_graph(obj):
        return obj
    if (
        callable(obj)
        and depth == 0
        and (inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj))
    ):
        try:
            inspect.signature(obj).bind(**overrides)
        except TypeError as exc:
            raise GraphSpecError(
                f"graph spec {spec!r}: the factory must take no required arguments ({exc})"
            ) from exc
        except ValueError:  # no signature to check (a builtin); just call it
            pass
        try:
            made = obj(**overrides)
        except Exception as exc:
            raise GraphSpecError(
                f"graph spec {spec!r}: the factory failed: {type(exc).__name__}: {exc}"
            ) from exc
        return _to_graph(made, spec, {}, depth + 1)
    raise GraphSpecError(
        f"graph spec {spec!r}: expected a GraphBuilder, a compiled LangGraph graph or a zero-argument factory "
        f"returning one, got {type(obj).__name__}"
    )
