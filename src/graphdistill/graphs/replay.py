"""Running part of a teacher graph again: the nodes after one node, on a state given from outside.

A *replay* starts at node ``start`` with a state rebuilt from a recorded trace and edited (see
:mod:`graphdistill.recording.replay`). Which nodes run again (:func:`replay_nodes`):

* ``start`` itself;
* every node after it (reachable along edges, conditional routes or ``Command`` destinations) that reads a
  field which changed: written by a node that runs again, or one of the fields the edit ``supplies``;
* but not a node whose every written field the edit supplies: the edit stands in for it (visual_rag's
  ``segment``: an edit of the detections edits their masks too, so SAM never runs again);
* and every node a conditional route of a running node can go to, and every router after ``start`` whose
  route can lead to a node that runs again (the route is decided anew).

When the nodes declare what they read and write (:class:`~graphdistill.graphs.builder.GraphBuilder` puts
``graphdistill_reads`` / ``graphdistill_writes`` in each node's metadata) the rule above is exact; for a
hand-written ``StateGraph`` without them every node after ``start`` runs again, except those the edit stands
in for (their writes are then taken from the recorded trace: ``writes_hint``).

:func:`replay_graph` compiles those nodes, with the same node runnables and metadata (so recording sees the
same node names, models and weights), into a new LangGraph graph whose input is the whole state. Edges among
them follow the original graph: a node that waited for several nodes waits for the nearest ones that run
again; a node reached only through nodes that do not run starts from ``START``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from graphdistill.graphs.builder import END, START, GraphBuilder, GraphBuildError, _NodeRunner
from graphdistill.trace import Kind

log = logging.getLogger(__name__)

# config["configurable"] key a replay sets to its start node on every execution: a node that announces work
# ahead when an execution starts (visual_rag's LLM batcher) can do so where a replay starts
CONF_REPLAY_FROM = "gd_replay_from"
META_READS = "graphdistill_reads"  # node metadata GraphBuilder writes (builder.state_graph)
META_WRITES = "graphdistill_writes"


class ReplayGraphError(GraphBuildError):
    """A replay cannot start where asked (unknown node, the edit supplies what the start node writes)."""


@dataclass(frozen=True)
class ReplayNodes:
    """Which nodes of a graph a replay from ``start`` runs again (``run``, in graph order) and which keep
    their recorded writes (``reused``; ``stood_in``: those whose writes the edit supplies)."""

    start: str
    run: tuple[str, ...]
    reused: tuple[str, ...]
    stood_in: tuple[str, ...]


def state_graph_of(graph: Any) -> Any:
    """The LangGraph ``StateGraph`` behind a compiled graph (``.builder``), a GraphBuilder or a StateGraph."""
    from langgraph.graph import StateGraph

    if isinstance(graph, GraphBuilder):
        return graph.state_graph()
    if isinstance(graph, StateGraph):
        return graph
    builder = getattr(graph, "builder", None)
    if isinstance(builder, StateGraph):
        return builder
    raise ReplayGraphError(
        f"{type(graph).__name__} is not a LangGraph StateGraph graph: a replay needs the graph's nodes and edges "
        "(a compiled StateGraph exposes them as .builder)"
    )


def graph_node_names(graph: Any) -> list[str]:
    """The graph's own nodes in declaration order (error handlers LangGraph adds are left out)."""
    sg = state_graph_of(graph)
    return [n for n, spec in sg.nodes.items() if not getattr(spec, "is_error_handler", False)]


def _runner(spec: Any) -> _NodeRunner | None:
    fn = getattr(spec.runnable, "func", None)
    return fn if isinstance(fn, _NodeRunner) else None


def node_models(graph: Any) -> dict[str, Any]:
    """The model object each GraphBuilder node was declared with (``model=``); nodes without one are absent."""
    sg = state_graph_of(graph)
    out: dict[str, Any] = {}
    for name, spec in sg.nodes.items():
        runner = _runner(spec)
        if runner is not None and runner.decl.model is not None:
            out[name] = runner.decl.model
    return out


def field_kinds(graph: Any) -> dict[str, Kind]:
    """The kind of every field a GraphBuilder node writes ({} for nodes of a hand-written graph)."""
    sg = state_graph_of(graph)
    kinds: dict[str, Kind] = {}
    for spec in sg.nodes.values():
        runner = _runner(spec)
        if runner is not None:
            for field, kind in runner.decl.writes.items():
                kinds.setdefault(field, kind)
    return kinds


@dataclass
class _Structure:
    names: list[str]
    edges: set[tuple[str, str]]
    waiting: set[tuple[tuple[str, ...], str]]
    branch_targets: dict[str, set[str]]  # source -> nodes its conditional routes (or Command) can go to
    reads: dict[str, set[str] | None]
    writes: dict[str, set[str] | None]

    def successors(self, node: str) -> set[str]:
        out = {b for a, b in self.edges if a == node}
        out |= {b for srcs, b in self.waiting if node in srcs}
        out |= self.branch_targets.get(node, set())
        return out - {END}

    def triggers(self, node: str) -> list[tuple[tuple[str, ...], bool]]:
        """Each way ``node`` is started: (one plain edge's source or one join's sources, False), or
        ((a router,), True) for a conditional route (or ``Command``) that can go to it."""
        out: list[tuple[tuple[str, ...], bool]] = [((a,), False) for a, b in sorted(self.edges) if b == node]
        out += [(srcs, False) for srcs, b in sorted(self.waiting) if b == node]
        out += [((src,), True) for src, targets in sorted(self.branch_targets.items()) if node in targets]
        return out


def _structure(sg: Any) -> _Structure:
    names = [n for n, spec in sg.nodes.items() if not getattr(spec, "is_error_handler", False)]
    branch_targets: dict[str, set[str]] = {}
    for src, branches in sg.branches.items():
        for br in branches.values():
            ends = set(br.ends.values()) if br.ends else set(names) | {END}
            branch_targets.setdefault(src, set()).update(ends)
    for name in names:
        goto = getattr(sg.nodes[name], "ends", None)
        if goto:  # a node that routes with Command(goto=...)
            targets = goto.values() if isinstance(goto, Mapping) else goto
            branch_targets.setdefault(name, set()).update(str(t) for t in targets)
    reads: dict[str, set[str] | None] = {}
    writes: dict[str, set[str] | None] = {}
    for name in names:
        meta = sg.nodes[name].metadata or {}
        r, w = meta.get(META_READS), meta.get(META_WRITES)
        reads[name] = set(r) if isinstance(r, (list, tuple)) else None
        writes[name] = set(w) if isinstance(w, (list, tuple)) else None
    return _Structure(
        names=names,
        edges={(str(a), str(b)) for a, b in sg.edges},
        waiting={(tuple(srcs), str(b)) for srcs, b in sg.waiting_edges},
        branch_targets=branch_targets,
        reads=reads,
        writes=writes,
    )


def replay_nodes(
    graph: Any,
    start: str,
    supplies: Iterable[str] = (),
    *,
    writes_hint: Mapping[str, Iterable[str]] | None = None,
) -> ReplayNodes:
    """Which nodes a replay from ``start`` runs again when an edit supplies the fields ``supplies`` (see the
    module docstring). ``writes_hint``: node -> fields it wrote in the recorded trace, for nodes that do not
    declare their writes."""
    sg = state_graph_of(graph)
    s = _structure(sg)
    if start not in s.names:
        raise ReplayGraphError(f"node {start!r} is not a node of this graph (nodes: {', '.join(s.names)})")
    given = set(supplies)
    hint = {k: set(v) for k, v in (writes_hint or {}).items()}

    def writes_of(n: str) -> set[str]:
        declared = s.writes[n]
        return declared if declared is not None else hint.get(n, set())

    if writes_of(start) and writes_of(start) <= given:
        raise ReplayGraphError(
            f"node {start!r} writes only fields the edit supplies ({', '.join(sorted(writes_of(start)))}): "
            "running it again would overwrite the edit; start from a node after it"
        )
    after: set[str] = set()
    todo = [start]
    while todo:
        for nxt in s.successors(todo.pop()):
            if nxt not in after and nxt != start:
                after.add(nxt)
                todo.append(nxt)
    run = {start}
    changed = writes_of(start) | given
    forced: set[str] = set(s.branch_targets.get(start, set())) - {END}
    grew = True
    while grew:
        grew = False
        for n in s.names:
            if n in run or n not in after:
                continue
            stood_in = bool(writes_of(n)) and writes_of(n) <= given
            reads = s.reads[n]
            routes_to_run = bool(s.branch_targets.get(n, set()) & run)  # its route is decided anew
            if n in forced or routes_to_run or (not stood_in and (reads is None or bool(reads & changed))):
                run.add(n)
                changed |= writes_of(n)
                forced |= s.branch_targets.get(n, set()) - {END}
                grew = True
    order = tuple(n for n in s.names if n in run)
    reused = tuple(n for n in s.names if n not in run)
    stood = tuple(n for n in reused if writes_of(n) and writes_of(n) <= given)
    return ReplayNodes(start=start, run=order, reused=reused, stood_in=stood)


def replay_graph(graph: Any, nodes: ReplayNodes, *, name: str | None = None) -> Any:
    """A compiled LangGraph graph of the nodes ``nodes.run``: its input is the whole state (the rebuilt,
    edited state of a recorded run), its output the original graph's output."""
    from langgraph.graph import StateGraph

    sg = state_graph_of(graph)
    s = _structure(sg)
    run = set(nodes.run)
    new: Any = StateGraph(
        sg.state_schema,
        context_schema=getattr(sg, "context_schema", None),
        input_schema=sg.state_schema,
        output_schema=sg.output_schema,
    )
    for n in nodes.run:
        spec = sg.nodes[n]
        kwargs: dict[str, Any] = {"metadata": spec.metadata, "input_schema": spec.input_schema}
        for attr in ("retry_policy", "cache_policy", "timeout", "trace_policy"):
            if getattr(spec, attr, None) is not None:
                kwargs[attr] = getattr(spec, attr)
        if getattr(spec, "defer", False):
            kwargs["defer"] = True
        if getattr(spec, "ends", None):
            kwargs["destinations"] = spec.ends
        handler = getattr(spec, "error_handler_node", None)
        if handler:
            kwargs["error_handler"] = sg.nodes[handler].runnable
        new.add_node(n, spec.runnable, **kwargs)

    memo: dict[str, frozenset[str]] = {}

    def nearest_run(node: str, seen: frozenset[str] = frozenset()) -> frozenset[str]:
        """The nodes that run again closest before ``node`` (which does not run), through nodes that do not."""
        if node in memo:
            return memo[node]
        found: set[str] = set()
        for trig, _ in s.triggers(node):
            for src in trig:
                if src == START or src in seen:
                    continue
                found |= {src} if src in run else nearest_run(src, seen | {node})
        memo[node] = frozenset(found)
        return memo[node]

    added: set[tuple[tuple[str, ...], str]] = set()
    for n in nodes.run:
        if n == nodes.start:
            added.add(((START,), n))
        for trig, routed in s.triggers(n):
            if routed and trig[0] in run:
                continue  # the route itself is copied below
            sources: set[str] = set()
            for src in trig:
                if src == START:
                    continue
                sources |= {src} if src in run else nearest_run(src)
            if sources:
                added.add((tuple(sorted(sources)), n))
    for n in nodes.run:
        if (n, END) in s.edges:
            added.add(((n,), END))
    for srcs, target in sorted(added):
        new.add_edge(srcs[0] if len(srcs) == 1 else list(srcs), target)
    for src, branches in sg.branches.items():
        if src in run:
            for key, br in branches.items():
                new.branches[src][key] = br
    has_out = {x for srcs, _ in added for x in srcs}
    for n in nodes.run:
        if n not in has_out and n not in sg.branches and not getattr(sg.nodes[n], "ends", None):
            new.add_edge(n, END)
    compiled = new.compile(name=name or f"replay:{nodes.start}")
    log.debug("replay graph from %s runs %s (reused: %s)", nodes.start, nodes.run, nodes.reused)
    return compiled
