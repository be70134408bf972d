"""Teacher graphs: the declarative builder on LangGraph, the reference ``visual_rag`` graph, graph specs.

Importing this package is light; LangGraph is imported when a graph is compiled, models when one is built.
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
from graphdistill.graphs.spec import GraphSpecError, load_graph
from graphdistill.graphs.visual_rag import VisualRagConfig, visual_rag, visual_rag_builder

__all__ = [
    "END",
    "START",
    "GraphBuildError",
    "GraphBuilder",
    "GraphSpecError",
    "NodeError",
    "VisualRagConfig",
    "as_teacher",
    "load_graph",
    "schema_of",
    "visual_rag",
    "visual_rag_builder",
]
