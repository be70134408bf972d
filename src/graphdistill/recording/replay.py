"""Counterfactual replays: a recorded run of a teacher graph, run again from one node on an edited state.

A replay takes a recorded trace (the *parent*), a node to start from and an :class:`Edit`; it

1. rebuilds the state the run had: the trace's inputs plus what every node that does not run again wrote
   (from the trace's spans; blobs loaded back into arrays);
2. applies the edit (visual_rag's: relabel, drop or duplicate detections, their masks edited with them;
   :mod:`graphdistill.recording.replay_plan`);
3. runs only the nodes after the start node that the change reaches (:func:`graphs.replay.replay_nodes`;
   for visual_rag from ``retrieve``: retrieve, reason, compose, never detect or segment), K samples under the
   sampling contract, batched through ``graph.batch`` so the LLM batcher serves them together;
4. records each sample through the ordinary :class:`~graphdistill.recording.recorder.TraceRecorder` into the
   same store, as a trace of the SAME graph (name, hash, schema), so filtering treats it like any other.

A replay trace's inputs are the parent's inputs (same image blob, same question); its group is one
(parent, start node, edit); its ``input_hash`` and id are derived from those and the sample index, so a replay
already in the store is never recorded again (resume). Its provenance keeps the parent's photos (splits keep
it with the parent's photo) and adds ``recipe["replay"] = {"parent_trace", "parent_group", "from_node",
"edit"}`` (:func:`replay_of`). Traces of held-out inputs are never replayed: their rows must stay real photos.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphdistill.errors import GraphdistillError
from graphdistill.recording.photos import DEFAULT_HELDOUT
from graphdistill.store.trace_store import TraceStore
from graphdistill.trace import Document, Kind, Provenance, Trace, decode_value

log = logging.getLogger(__name__)

REPLAY_KEY = "replay"  # provenance.recipe key, and the dataset column
DEFAULT_FROM_NODE = "retrieve"


class ReplayError(GraphdistillError, ValueError):
    """A replay cannot be made (unknown trace or node, another graph's trace); nothing was stored."""


@dataclass(frozen=True)
class Edit:
    """A change to a recorded state. ``fn(state) -> state`` makes it; ``describe()`` is its JSON description
    (recorded in the replay's provenance and part of its id, so it must say everything the edit does);
    ``supplies``: the state fields the edit takes responsibility for, so the nodes that write only those
    fields do not run again (an edit of detections that edits their masks too supplies both)."""

    kind: str
    params: Mapping[str, Any]
    supplies: tuple[str, ...]
    fn: Callable[[dict[str, Any]], dict[str, Any]] = field(compare=False, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.params)}

    def apply(self, state: Mapping[str, Any]) -> dict[str, Any]:
        out = self.fn(dict(state))
        if not isinstance(out, dict):
            raise TypeError(f"edit {self.kind}: must return the edited state dict, got {type(out).__name__}")
        return out


@dataclass(frozen=True)
class ReplayRequest:
    """Replay trace ``parent`` from node ``from_node`` after ``edit``."""

    parent: str
    edit: Edit
    from_node: str = DEFAULT_FROM_NODE

    def key(self) -> str:
        return replay_key(self.parent, self.from_node, self.edit.describe())


@dataclass
class ReplayResult:
    """What a call of :func:`replay` did, counted in traces (one per replay and sample)."""

    recorded: int = 0
    skipped: int = 0  # already in the store (resume)
    failed: int = 0  # the run failed (stored as a failed trace) or could not be stored
    refused: list[tuple[str, str]] = field(default_factory=list)  # (parent trace id, why it was not replayed)
    groups: list[str] = field(default_factory=list)  # replay group ids, recorded now or before
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "recorded": self.recorded,
            "skipped": self.skipped,
            "failed": self.failed,
            "refused": len(self.refused),
            "groups": len(self.groups),
            "seconds": round(self.seconds, 3),
        }


def replay_key(parent_trace: str, from_node: str, edit: Mapping[str, Any]) -> str:
    """The replay's group id and input hash: a sha256 of (parent trace, start node, edit description)."""
    text = json.dumps(
        {"parent_trace": parent_trace, "from_node": from_node, "edit": edit},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def replay_trace_id(key: str, sample_index: int) -> str:
    return hashlib.sha256(f"{key}:{sample_index}".encode()).hexdigest()[:32]


def replay_of(provenance: Provenance | Trace | None) -> dict[str, Any] | None:
    """The replay description a trace (or its provenance) carries, or None for an ordinary run."""
    if isinstance(provenance, Trace):
        provenance = provenance.provenance
    if provenance is None:
        return None
    value = provenance.recipe.get(REPLAY_KEY)
    return dict(value) if isinstance(value, dict) else None


def replay_column(provenance: Provenance | None) -> dict[str, Any] | None:
    """The dataset row's ``replay`` (:class:`graphdistill.dataset.DatasetRow`): ``{"parent_trace",
    "from_node", "edit"}`` or None."""
    info = replay_of(provenance)
    if info is None:
        return None
    return {k: info.get(k) for k in ("parent_trace", "from_node", "edit")}


def is_heldout(provenance: Provenance, heldout_photos: Iterable[str] = ()) -> bool:
    """A held-out input: its recipe says so, or it uses one of ``heldout_photos``."""
    recipe = provenance.recipe or {}
    return (
        bool(recipe.get("heldout"))
        or recipe.get("kind") == "heldout"
        or bool(set(heldout_photos) & set(provenance.photos))
    )


def why_not_parent(trace: Trace, heldout_photos: Iterable[str] = DEFAULT_HELDOUT) -> str | None:
    """Why ``trace`` cannot be replayed, or None when it can."""
    if trace.status != "ok":
        return f"the run failed ({trace.error})"
    failed = next((s.node for s in trace.spans if s.error), None)
    if failed is not None:
        return f"node {failed!r} failed in it"
    if replay_of(trace) is not None:
        return "it is itself a replay (its spans hold only the nodes it ran again)"
    if is_heldout(trace.provenance, heldout_photos):
        return "it is a held-out input (its test rows must stay real photos)"
    tta = trace.metadata.get("tta")
    if isinstance(tta, dict) and (tta.get("flip") or float(tta.get("scale", 1.0)) != 1.0):
        return "it saw an augmented image (test-time augmentation)"
    return None


def _coerce(value: Any, kind: Kind | None) -> Any:
    """Recorded values back to what nodes were given: documents as :class:`Document`."""
    if kind == Kind.DOCUMENTS and isinstance(value, list):
        return [Document.model_validate(d) if isinstance(d, dict) else d for d in value]
    return value


def parent_state(
    trace: Trace,
    store: TraceStore,
    nodes: Iterable[str],
    *,
    kinds: Mapping[str, Kind] | None = None,
    images: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The trace's inputs plus the fields the spans of ``nodes`` wrote (later spans win), decoded: blobs as
    arrays, records typed, documents as :class:`Document` (``kinds``: field -> kind). ``images`` caches
    decoded blobs by sha across calls."""
    cache = images if images is not None else {}

    def load(sha: str) -> bytes:
        return store.blob(sha)

    def decoded(value: Any) -> Any:
        from graphdistill.trace import BLOB_KEY, BlobRef, decode_array

        if isinstance(value, dict) and BLOB_KEY in value and len(value) == 1:
            ref = BlobRef.model_validate(value[BLOB_KEY])
            if ref.blob not in cache:
                cache[ref.blob] = decode_array(ref, load(ref.blob))
            return cache[ref.blob]
        return decode_value(value, load)

    kinds = kinds or {}
    state: dict[str, Any] = {k: decoded(v) for k, v in trace.inputs.items()}
    wanted = set(nodes)
    for span in trace.spans:
        if span.node in wanted:
            for k, v in span.writes.items():
                state[k] = _coerce(decoded(v), kinds.get(k))
    return state


def _plan(graph: Any, request: ReplayRequest, parent: Trace, cache: dict[Any, Any]) -> tuple[Any, Any]:
    """The nodes a request runs again and the compiled graph of them (cached per shape)."""
    from graphdistill.graphs.replay import replay_graph, replay_nodes

    hint = {s.node: tuple(sorted(s.writes)) for s in parent.spans}
    key = (request.from_node, tuple(sorted(request.edit.supplies)), tuple(sorted(hint.items())))
    if key not in cache:
        nodes = replay_nodes(graph, request.from_node, request.edit.supplies, writes_hint=hint)
        cache[key] = (nodes, replay_graph(graph, nodes, name=getattr(graph, "name", None)))
    return cache[key]  # type: ignore[no-any-return]


def replay(
    graph: Any,
    store: TraceStore,
    requests: Sequence[ReplayRequest],
    *,
    samples: int = 1,
    batch_size: int = 16,
    heldout_photos: Iterable[str] = DEFAULT_HELDOUT,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Run and record every request, ``samples`` samples each (see the module docstring).

    Raises :class:`ReplayError` before anything runs when a request names a trace the store lacks, a node the
    graph lacks, or a trace another graph recorded. Parents that cannot be replayed (held-out, failed, replays
    themselves, TTA samples) and edits that do not fit their state are skipped, logged and listed in
    ``refused``. ``progress(done, total)`` is called after each batch."""
    from graphdistill.graphs.replay import CONF_REPLAY_FROM, ReplayGraphError, field_kinds, graph_node_names
    from graphdistill.recording.recorder import (
        META_GROUP,
        META_INPUT_FIELDS,
        META_INPUT_HASH,
        META_METADATA,
        META_PROVENANCE,
        META_SAMPLE,
        META_TRACE_ID,
        TraceRecorder,
        graph_identity,
        sampling_configurable,
    )

    if samples < 1 or batch_size < 1:
        raise ReplayError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    start = time.perf_counter()
    try:
        names = graph_node_names(graph)
    except ReplayGraphError as exc:
        raise ReplayError(str(exc)) from exc
    schema, gid = graph_identity(graph)
    held = tuple(heldout_photos)
    parents: dict[str, Trace] = {}
    for req in requests:  # every request checked before anything runs
        if req.from_node not in names:
            raise ReplayError(
                f"--from-node {req.from_node!r}: not a node of graph {gid.name} ({', '.join(names)})"
            )
        if req.parent not in parents:
            try:
                parents[req.parent] = store.get(req.parent)
            except KeyError:
                raise ReplayError(f"trace {req.parent!r}: not in trace store {store.root}") from None
        parent = parents[req.parent]
        if parent.graph.hash != gid.hash:
            raise ReplayError(
                f"trace {req.parent}: recorded by graph {parent.graph.name} ({parent.graph.hash[:12]}), not by "
                f"the graph given ({gid.name}, {gid.hash[:12]}): replays must run the graph that recorded them"
            )
    kinds = field_kinds(graph)
    result = ReplayResult()
    outcomes: list[tuple[Trace, str | None]] = []
    recorder = TraceRecorder(  # not strict: a replay it could not store counts as failed in the result
        store, schema=schema, graph_id=gid, strict=False, on_trace=lambda t, i: outcomes.append((t, i))
    )
    graphs: dict[Any, Any] = {}
    images: dict[str, Any] = {}  # decoded parent images, a few at a time
    pending: list[tuple[ReplayRequest, Trace, str, list[int]]] = []
    for req in requests:
        parent = parents[req.parent]
        why = why_not_parent(parent, held)
        if why is not None:
            log.warning("not replaying trace %s: %s", parent.id, why)
            result.refused.append((parent.id, why))
            continue
        key = req.key()
        todo = [i for i in range(samples) if not store.has_input(key, i, graph_hash=gid.hash)]
        result.skipped += samples - len(todo)
        if todo:
            pending.append((req, parent, key, todo))
        else:
            result.groups.append(key)

    def config(req: ReplayRequest, parent: Trace, key: str, i: int, nodes: Any) -> dict[str, Any]:
        info = {
            "parent_trace": parent.id,
            "parent_group": parent.group_id,
            "from_node": req.from_node,
            "edit": req.edit.describe(),
        }
        meta: dict[str, Any] = {"replay_nodes": {"ran": list(nodes.run), "reused": list(nodes.reused)}}
        if parent.metadata.get("source") is not None:
            meta["source"] = parent.metadata["source"]
        return {
            "callbacks": [recorder],
            "max_concurrency": batch_size,
            "metadata": {
                META_GROUP: key,
                META_SAMPLE: i,
                META_PROVENANCE: {
                    "photos": list(parent.provenance.photos),
                    "recipe": {**parent.provenance.recipe, REPLAY_KEY: info},
                },
                META_METADATA: meta,
                META_INPUT_FIELDS: list(parent.inputs),
                META_INPUT_HASH: key,
                META_TRACE_ID: replay_trace_id(key, i),
            },
            "configurable": {**sampling_configurable(key, i), CONF_REPLAY_FROM: req.from_node},
        }

    total = sum(len(todo) for *_, todo in pending)
    done = 0
    batch: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []  # (compiled replay graph, state, config)

    def run_batch() -> None:
        nonlocal done
        by_graph: dict[int, list[tuple[Any, dict[str, Any], dict[str, Any]]]] = {}
        for t in batch:
            by_graph.setdefault(id(t[0]), []).append(t)
        for group in by_graph.values():
            group[0][0].batch([t[1] for t in group], config=[t[2] for t in group], return_exceptions=True)
        done += len(batch)
        batch.clear()
        if progress is not None:
            progress(done, total)

    for req, parent, key, todo in pending:  # states are built batch by batch: memory stays bounded
        if len(images) > 8:
            images.clear()
        try:
            nodes, sub = _plan(graph, req, parent, graphs)
            state = req.edit.apply(parent_state(parent, store, nodes.reused, kinds=kinds, images=images))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            why = f"edit {json.dumps(req.edit.describe(), sort_keys=True)} does not apply: {exc}"
            log.warning("not replaying trace %s: %s", parent.id, why)
            result.refused.append((parent.id, why))
            total -= len(todo)
            continue
        result.groups.append(key)
        for i in todo:
            batch.append((sub, state, config(req, parent, key, i, nodes)))
            if len(batch) >= batch_size:
                run_batch()
    if batch:
        run_batch()
    for trace, trace_id in outcomes:
        if trace_id is None:
            result.skipped += 1
        elif trace.status == "ok":
            result.recorded += 1
        else:
            result.failed += 1
    result.failed += recorder.failed_to_record
    recorder.close()
    result.seconds = time.perf_counter() - start
    log.info("replays: %s", result.summary())
    return result
