"""A declarative teacher-graph builder on LangGraph's ``StateGraph``.

A teacher graph declares its inputs and outputs (with their :class:`~graphdistill.trace.Kind`), and nodes that
each read some state fields and write others. ``compile()`` validates the declaration and returns LangGraph's
own compiled graph, so ``invoke``/``batch``/``stream``/``ainvoke``/``abatch``/``astream`` behave exactly as
LangGraph users expect; the machine-readable :class:`~graphdistill.trace.GraphSchema` is recorded alongside
(:func:`schema_of`).

Node functions are plain Python: ``fn(reads: dict) -> dict`` or ``fn(reads: dict, config) -> dict``, where
``reads`` holds only the node's declared read fields and the returned dict may hold only its declared writes.

Edges, when not given explicitly:

* no edges at all (and no conditionals): the nodes run one after another in declaration order;
* no edge from ``START``: ``START`` feeds every node that has no incoming edge (those nodes must read only
  graph inputs);
* no edge into ``END``: every node with no outgoing edge (and no conditional route) feeds ``END``.

Several edges out of one node fan out: the targets run in parallel in one LangGraph superstep. ``edge([a, b],
c)`` fans in: ``c`` waits for both ``a`` and ``b``.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from graphdistill.errors import GraphdistillError
from graphdistill.trace import FieldSpec, GraphSchema, Kind, NodeFlow

if TYPE_CHECKING:  # langgraph/langchain-core are imported only when a graph is compiled
    from langchain_core.runnables import RunnableConfig

log = logging.getLogger(__name__)

START = "__start__"  # the same strings as langgraph.graph.START / END, without importing langgraph here
END = "__end__"

NodeFn = Callable[..., Mapping[str, Any]]


class GraphBuildError(GraphdistillError, ValueError):
    """A graph declaration is inconsistent; the message names the node, field or edge at fault."""


class NodeError(GraphdistillError, RuntimeError):
    """A node failed while the graph ran; the message names the node."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"node '{node}' failed: {message}")
        self.node = node


@dataclass
class _NodeDecl:
    name: str
    fn: NodeFn
    reads: list[str]
    writes: dict[str, Kind]
    model: Any = None

    @property
    def model_id(self) -> str | None:
        return getattr(self.model, "model_id", None) if self.model is not None else None

    @property
    def weights_sha256(self) -> str | None:
        return getattr(self.model, "weights_sha256", None) if self.model is not None else None


@dataclass
class _Conditional:
    source: str
    router: Callable[..., Hashable]
    mapping: dict[Hashable, str]


@dataclass
class _Decl:
    edges: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    conditionals: list[_Conditional] = field(default_factory=list)


def _accepts_config(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.name == "config" for p in params):
        return True
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


class _NodeRunner:
    """What LangGraph runs for a node: picks the read fields, calls the function, checks its writes."""

    def __init__(self, decl: _NodeDecl) -> None:
        self.decl = decl
        self.pass_config = _accepts_config(decl.fn)
        self.__name__ = decl.name  # LangGraph names runnables after their callable

    def __call__(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        from langgraph.errors import GraphBubbleUp

        name = self.decl.name
        missing = [r for r in self.decl.reads if r not in state]
        if missing:
            raise NodeError(
                name,
                f"it reads {', '.join(repr(m) for m in missing)}, which has no value yet "
                "(a missing graph input, or no earlier node wrote it)",
            )
        reads = {r: state[r] for r in self.decl.reads}
        try:
            result = self.decl.fn(reads, config) if self.pass_config else self.decl.fn(reads)
        except (NodeError, GraphBubbleUp):
            raise
        except Exception as exc:
            raise NodeError(name, f"{type(exc).__name__}: {exc}") from exc
        if result is None:
            result = {}
        if not isinstance(result, Mapping):
            raise NodeError(name, f"it must return a dict of its written fields, got {type(result).__name__}")
        undeclared = sorted(set(result) - set(self.decl.writes))
        if undeclared:
            raise NodeError(
                name,
                f"it wrote undeclared field(s) {', '.join(repr(u) for u in undeclared)}; "
                f"declared writes: {sorted(self.decl.writes)}",
            )
        return dict(result)


class GraphBuilder:
    """Declare a teacher graph: ``.input() .output() .node() .edge() .conditional()`` then ``.compile()``."""

    def __init__(self, name: str) -> None:
        if not name or not name.strip():
            raise GraphBuildError("a graph needs a non-empty name")
        self.name = name
        self.inputs: dict[str, FieldSpec] = {}
        self.outputs: dict[str, FieldSpec] = {}
        self.nodes: dict[str, _NodeDecl] = {}
        self._decl = _Decl()

    # -------------------------------------------------------------------------------------------- declare
    def input(self, name: str, kind: Kind | str, description: str = "") -> GraphBuilder:
        if name in self.inputs:
            raise GraphBuildError(f"graph '{self.name}': input '{name}' is declared twice")
        self.inputs[name] = FieldSpec(name=name, kind=Kind(kind), description=description)
        return self

    def output(self, name: str, kind: Kind | str, description: str = "") -> GraphBuilder:
        if name in self.outputs:
            raise GraphBuildError(f"graph '{self.name}': output '{name}' is declared twice")
        self.outputs[name] = FieldSpec(name=name, kind=Kind(kind), description=description)
        return self

    def node(
        self,
        name: str,
        fn: NodeFn,
        *,
        reads: Sequence[str] = (),
        writes: Sequence[str] | Mapping[str, Kind | str] = (),
        model: Any = None,
    ) -> GraphBuilder:
        """Add a node. ``writes`` is a list of field names, or ``{field: Kind}`` to give intermediates a kind
        (outputs take their declared kind; other fields default to ``Kind.JSON``)."""
        if not name or name in (START, END):
            raise GraphBuildError(f"graph '{self.name}': invalid node name {name!r}")
        if name in self.nodes:
            raise GraphBuildError(f"graph '{self.name}': node '{name}' is declared twice")
        if not callable(fn):
            raise GraphBuildError(f"node '{name}': fn must be callable, got {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
            raise GraphBuildError(
                f"node '{name}': async node functions are not supported; give a plain function "
                "(ainvoke/astream still work: LangGraph runs it in a worker thread)"
            )
        if isinstance(reads, str) or isinstance(writes, str):
            raise GraphBuildError(f"node '{name}': reads/writes must be lists of field names, not one string")
        kinds = (
            {k: Kind(v) for k, v in writes.items()}
            if isinstance(writes, Mapping)
            else {w: Kind.JSON for w in writes}
        )
        self.nodes[name] = _NodeDecl(name=name, fn=fn, reads=list(reads), writes=kinds, model=model)
        return self

    def edge(self, source: str | Sequence[str], target: str) -> GraphBuilder:
        sources = (source,) if isinstance(source, str) else tuple(source)
        if not sources:
            raise GraphBuildError(f"graph '{self.name}': an edge into '{target}' needs at least one source")
        self._decl.edges.append((sources, target))
        return self

    def conditional(
        self, source: str, router: Callable[..., Hashable], mapping: Mapping[Hashable, str]
    ) -> GraphBuilder:
        """After ``source``, ``router(state)`` (the whole state as a dict) returns a key of ``mapping``; the
        graph goes on to ``mapping[key]`` (a node name or ``END``)."""
        if not mapping:
            raise GraphBuildError(
                f"graph '{self.name}': conditional after '{source}' needs a non-empty mapping"
            )
        self._decl.conditionals.append(_Conditional(source=source, router=router, mapping=dict(mapping)))
        return self

    # -------------------------------------------------------------------------------------------- derive
    def field_kinds(self) -> dict[str, Kind]:
        """Every state field with its kind: inputs, intermediates (node writes) and outputs."""
        kinds: dict[str, Kind] = {n: f.kind for n, f in self.inputs.items()}
        for decl in self.nodes.values():
            for w, k in decl.writes.items():
                kinds.setdefault(w, k)
        for n, f in self.outputs.items():
            kinds[n] = f.kind
        return kinds

    def edges(self) -> list[tuple[tuple[str, ...], str]]:
        """The effective edges, defaults (see the module docstring) filled in."""
        explicit = list(self._decl.edges)
        conds = self._decl.conditionals
        names = list(self.nodes)
        if not explicit and not conds:
            chain = [START, *names, END]
            return [((a,), b) for a, b in itertools.pairwise(chain)]
        incoming: set[str] = set()
        outgoing: set[str] = set()
        for sources, target in explicit:
            incoming.add(target)
            outgoing.update(sources)
        for c in conds:
            outgoing.add(c.source)
            incoming.update(c.mapping.values())
        edges = explicit
        if START not in outgoing:
            edges = [((START,), n) for n in names if n not in incoming] + edges
        if END not in incoming:
            edges = edges + [((n,), END) for n in names if n not in outgoing]
        return edges

    def validate(self) -> None:
        if not self.nodes:
            raise GraphBuildError(f"graph '{self.name}' has no nodes")
        if not self.inputs:
            raise GraphBuildError(f"graph '{self.name}' declares no inputs")
        if not self.outputs:
            raise GraphBuildError(f"graph '{self.name}' declares no outputs")
        written = {w for d in self.nodes.values() for w in d.writes}
        for name, decl in self.nodes.items():
            if name in self.inputs or name in written or name in self.outputs:
                raise GraphBuildError(f"node '{name}' has the same name as a state field; rename one of them")
            for r in decl.reads:
                if r not in self.inputs and r not in written:
                    raise GraphBuildError(
                        f"node '{name}' reads '{r}', which is neither a graph input nor written by any node "
                        f"(inputs: {sorted(self.inputs)}, written: {sorted(written)})"
                    )
            for w in decl.writes:
                if w in self.inputs:
                    raise GraphBuildError(f"node '{name}' writes '{w}', which is a graph input")
        for out in self.outputs:
            if out not in written:
                raise GraphBuildError(f"graph '{self.name}': output '{out}' is written by no node")
        known = set(self.nodes)
        for sources, target in self._decl.edges:
            for s in sources:
                if s != START and s not in known:
                    raise GraphBuildError(
                        f"edge {s!r} -> {target!r}: unknown node {s!r} (known: {sorted(known)})"
                    )
            if target != END and target not in known:
                raise GraphBuildError(
                    f"edge {sources!r} -> {target!r}: unknown node {target!r} (known: {sorted(known)})"
                )
        for c in self._decl.conditionals:
            if c.source not in known:
                raise GraphBuildError(f"conditional from unknown node {c.source!r} (known: {sorted(known)})")
            for key, target in c.mapping.items():
                if target != END and target not in known:
                    raise GraphBuildError(
                        f"conditional after '{c.source}': route {key!r} goes to unknown node {target!r} "
                        f"(known: {sorted(known)})"
                    )
        self._check_reads_follow_writes()

    def _check_reads_follow_writes(self) -> None:
        """Every field a node reads is a graph input or written by a node that can run before it."""
        parents: dict[str, set[str]] = {n: set() for n in self.nodes}
        for sources, target in self.edges():
            if target in parents:
                parents[target].update(s for s in sources if s != START)
        for c in self._decl.conditionals:
            for target in c.mapping.values():
                if target in parents:
                    parents[target].add(c.source)
        for name, decl in self.nodes.items():
            ancestors: set[str] = set()
            todo = list(parents[name])
            while todo:
                n = todo.pop()
                if n not in ancestors:
                    ancestors.add(n)
                    todo.extend(parents[n])
            available = set(self.inputs) | {w for a in ancestors for w in self.nodes[a].writes}
            missing = [r for r in decl.reads if r not in available]
            if missing:
                writers = sorted(n for n, d in self.nodes.items() if set(missing) & set(d.writes))
                raise GraphBuildError(
                    f"node '{name}' reads {missing}, but no node that runs before it writes them "
                    f"(written by {writers}); add an edge from those nodes into '{name}'"
                )

    def definition(self) -> dict[str, Any]:
        """The canonical description the definition hash is taken over."""
        return {
            "name": self.name,
            "inputs": [[f.name, f.kind.value] for f in self.inputs.values()],
            "outputs": [[f.name, f.kind.value] for f in self.outputs.values()],
            "fields": sorted([k, v.value] for k, v in self.field_kinds().items()),
            "nodes": [
                {
                    "name": d.name,
                    "reads": sorted(d.reads),
                    "writes": sorted(d.writes),
                    "model_id": d.model_id,
                    "weights_sha256": d.weights_sha256,
                }
                for d in self.nodes.values()
            ],
            "edges": sorted([list(s), t] for s, t in self.edges()),
            "conditionals": [
                {
                    "source": c.source,
                    "router": getattr(c.router, "__qualname__", type(c.router).__name__),
                    "mapping": sorted([str(k), v] for k, v in c.mapping.items()),
                }
                for c in self._decl.conditionals
            ],
        }

    def schema(self) -> GraphSchema:
        self.validate()
        return GraphSchema(
            name=self.name,
            inputs=list(self.inputs.values()),
            outputs=list(self.outputs.values()),
            nodes=list(self.nodes),
            definition_hash=_hash(self.definition()),
            offers=self.offers(),
            dataflow={
                name: NodeFlow(reads=list(d.reads), writes=dict(d.writes)) for name, d in self.nodes.items()
            },
        )

    def offers(self) -> dict[str, dict[str, Any]]:
        """What each node's model offers the student to start from (``student_offer()`` of the adapter, see
        :mod:`graphdistill.teachers.base`): node -> a JSON reference the trainer loads. Nodes whose model
        offers nothing are absent."""
        out: dict[str, dict[str, Any]] = {}
        for name, decl in self.nodes.items():
            offer = getattr(decl.model, "student_offer", None) if decl.model is not None else None
            ref = offer() if callable(offer) else None
            if ref:
                out[name] = dict(ref)
        return out

    # -------------------------------------------------------------------------------------------- compile
    def state_graph(self) -> Any:
        """The (uncompiled) LangGraph ``StateGraph`` this declaration describes."""
        from langgraph.graph import StateGraph

        self.validate()
        state_t = _typed_dict(f"{_ident(self.name)}State", self.field_kinds())
        input_t = _typed_dict(f"{_ident(self.name)}Input", {n: f.kind for n, f in self.inputs.items()})
        output_t = _typed_dict(f"{_ident(self.name)}Output", {n: f.kind for n, f in self.outputs.items()})
        g: Any = StateGraph(state_t, input_schema=input_t, output_schema=output_t)
        for name, decl in self.nodes.items():
            meta: dict[str, Any] = {
                "graphdistill_graph": self.name,
                "graphdistill_reads": list(decl.reads),
                "graphdistill_writes": list(decl.writes),
            }
            if decl.model is not None:
                meta["graphdistill_model_id"] = decl.model_id
                meta["graphdistill_weights_sha256"] = decl.weights_sha256
            g.add_node(name, _NodeRunner(decl), metadata=meta)
        for sources, target in self.edges():
            g.add_edge(sources[0] if len(sources) == 1 else list(sources), target)
        for c in self._decl.conditionals:
            g.add_conditional_edges(c.source, c.router, dict(c.mapping))
        return g

    def compile(self, **kwargs: Any) -> Any:
        """Validate and compile; returns LangGraph's ``CompiledStateGraph`` (``schema_of`` gives its schema)."""
        schema = self.schema()
        kwargs.setdefault("name", self.name)
        compiled = self.state_graph().compile(**kwargs)
        _register(compiled, schema)
        log.debug("compiled graph %s (%s)", self.name, schema.definition_hash[:12])
        return compiled


# ------------------------------------------------------------------------------------------------ schemas
_SCHEMAS: weakref.WeakKeyDictionary[Any, GraphSchema] = weakref.WeakKeyDictionary()


def _register(compiled: Any, schema: GraphSchema) -> None:
    _SCHEMAS[compiled] = schema
    builder = getattr(compiled, "builder", None)  # shared by every `with_config` copy of the compiled graph
    if builder is not None:
        _SCHEMAS[builder] = schema


def schema_of(graph: Any) -> GraphSchema:
    """The :class:`GraphSchema` of a teacher graph compiled by :class:`GraphBuilder` or made by
    :func:`as_teacher` (also of its ``with_config`` copies)."""
    if isinstance(graph, GraphBuilder):
        return graph.schema()
    for key in (graph, getattr(graph, "builder", None)):
        if key is None:
            continue
        try:
            found = _SCHEMAS.get(key)
        except TypeError:  # not weak-referenceable
            found = None
        if found is not None:
            return found
    raise GraphBuildError(
        f"{type(graph).__name__} is not a teacher graph: build it with GraphBuilder, or declare its inputs and "
        "outputs with graphdistill.graphs.as_teacher(graph, name=..., inputs=..., outputs=...)"
    )


def as_teacher(
    graph: Any, *, name: str, inputs: Mapping[str, Kind | str], outputs: Mapping[str, Kind | str]
) -> Any:
    """Make a hand-written LangGraph ``StateGraph`` (compiled here) or compiled graph a teacher with a schema."""
    from langgraph.graph import StateGraph

    compiled = graph.compile(name=name) if isinstance(graph, StateGraph) else graph
    if not hasattr(compiled, "get_graph") or not hasattr(compiled, "invoke"):
        raise GraphBuildError(
            f"as_teacher needs a LangGraph StateGraph or compiled graph, got {type(graph).__name__}"
        )
    if not inputs or not outputs:
        raise GraphBuildError(f"as_teacher('{name}'): declare at least one input and one output")
    channels = set(getattr(compiled, "channels", {}) or {})
    for role, fields in (("input", inputs), ("output", outputs)):
        for f in fields:
            if channels and f not in channels:
                known = sorted(c for c in channels if not c.startswith("__") and not c.startswith("branch:"))
                raise GraphBuildError(
                    f"as_teacher('{name}'): {role} '{f}' is not a state field of the graph ({known})"
                )
    drawn = compiled.get_graph()
    nodes = [n for n in drawn.nodes if n not in (START, END)]
    edges = sorted([e.source, e.target, bool(e.conditional)] for e in drawn.edges)
    in_specs = [FieldSpec(name=k, kind=Kind(v)) for k, v in inputs.items()]
    out_specs = [FieldSpec(name=k, kind=Kind(v)) for k, v in outputs.items()]
    definition = {
        "name": name,
        "inputs": [[f.name, f.kind.value] for f in in_specs],
        "outputs": [[f.name, f.kind.value] for f in out_specs],
        "nodes": sorted(nodes),
        "edges": edges,
    }
    schema = GraphSchema(
        name=name, inputs=in_specs, outputs=out_specs, nodes=nodes, definition_hash=_hash(definition)
    )
    _register(compiled, schema)
    return compiled


def _hash(definition: Mapping[str, Any]) -> str:
    text = json.dumps(definition, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.title()) or "Graph"


def _typed_dict(name: str, fields: Mapping[str, Kind]) -> type:
    # Kinds are checked by the nodes and the trace records; LangGraph only needs the keys (LastValue channels).
    state: type = TypedDict(name, dict.fromkeys(fields, Any), total=False)  # type: ignore[misc]
    return state
