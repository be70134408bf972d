"""Teacher graphs: the declarative builder on LangGraph, the reference ``visual_rag`` graph, graph specs.

Importing this package is light; LangGraph is imported when a graph is compiled.
"""

from __future__ import annotations

from graphdistill.graphs.builder import (
    END,
    START,
    GraphBuilder,
    GraphBuildError,
    NodeError,
    as_teacher,
    schema_of,
)

__all__ = ["END", "START", "GraphBuildError", "GraphBuilder", "NodeError", "as_teacher", "schema_of"]
