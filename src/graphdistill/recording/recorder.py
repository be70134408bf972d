"""Live recording: a langchain-core callback handler that turns each execution of a LangGraph graph into a
:class:`~graphdistill.trace.Trace` in a :class:`~graphdistill.store.trace_store.TraceStore`.

Add it to any compiled graph with one line::

    graph.invoke(inputs, config={"callbacks": [TraceRecorder(store)]})
    # or: recorded = record(graph, store); recorded.invoke(inputs)

How LangGraph reports a run (sync and async alike): the graph's own run starts with ``parent_run_id=None``
(the *root*), each node runs as a child of the root with ``metadata["langgraph_node"]`` plus the node's own
metadata (``graphdistill_model_id`` / ``graphdistill_weights_sha256``). Runs nested deeper (a node that
calls a chain, a subgraph's inner nodes) are not spans of this graph and are ignored. State is keyed by the
root run id, so ``batch`` / ``abatch`` (threads, tasks) record each input separately.

Recording never changes the graph's results and never raises into the graph: failures are logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np
from langchain_core.callbacks import BaseCallbackHandler

from graphdistill.store.buffer import TraceBuffer
from graphdistill.store.trace_store import DuplicateTraceError, StoreError, TraceStore, as_store
from graphdistill.trace import (
    BLOB_KEY,
    BlobRef,
    GraphId,
    GraphSchema,
    NodeSpan,
    Provenance,
    Trace,
    content_hash,
    encode_array,
    encode_value,
)

log = logging.getLogger(__name__)

# keys of config["metadata"] the recorder reads
META_GROUP = "graphdistill_group_id"
META_SAMPLE = "graphdistill_sample_index"
META_PROVENANCE = "graphdistill_provenance"
META_METADATA = "graphdistill_metadata"
# set by runs that are not plain executions on their inputs (replays, see recording.replay): the root run's
# input fields that are the trace's inputs (the rest is state given from outside), the trace's input hash
# (the store's resume key) and its id
META_INPUT_FIELDS = "graphdistill_input_fields"
META_INPUT_HASH = "graphdistill_input_hash"
META_TRACE_ID = "graphdistill_trace_id"
# keys of a node's metadata
META_MODEL_ID = "graphdistill_model_id"
META_WEIGHTS = "graphdistill_weights_sha256"


class ImageEncodings:
    """Recently PNG-encoded images by pixel content (a sha256 of the raw pixels, far cheaper than encoding
    the PNG): the K samples of one input, and the input hash ``graphdistill record`` takes before
    the run, all reuse one encoding. The bytes are exactly :func:`~graphdistill.trace.encode_array`'s, so
    blob names and input hashes do not change. Bounded by ``max_bytes`` of encoded data; thread-safe.

    :meth:`prefetch` starts encoding an input image on a helper thread when its run starts (Pillow's
    encoder releases the GIL), so by the time the run ends and its trace is written the PNG is usually
    ready: the encode leaves the synchronous recorder's critical path."""

    min_pixels_bytes = 16 * 1024  # smaller images encode faster than they hash-and-look-up
    max_pending = 256  # prefetched images not yet used by a trace (their runs may have been dropped)

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, tuple[int, ...], str], tuple[BlobRef, bytes]] = OrderedDict()
        self._bytes = 0
        self._pending: dict[int, tuple[np.ndarray, Future[tuple[BlobRef, bytes]]]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def prefetch(self, arr: np.ndarray) -> None:
        """Start encoding ``arr`` in the background; :meth:`encode` of this same array then waits for it."""
        if not self.handles(arr):
            return
        with self._lock:
            if id(arr) in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="graphdistill-png")
            self._pending[id(arr)] = (arr, self._pool.submit(self._encode_now, arr))  # keeps arr alive
            while len(self._pending) > self.max_pending:
                del self._pending[next(iter(self._pending))]  # it still completes into the cache

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._pending.clear()
        if pool is not None:
            pool.shutdown(wait=True)

    def encode(self, arr: np.ndarray) -> tuple[BlobRef, bytes]:
        with self._lock:
            pending = self._pending.pop(id(arr), None)
        if pending is not None and pending[0] is arr:
            try:
                return pending[1].result()
            except Exception:  # encode it here, where an error reaches the caller
                log.debug("prefetched encoding failed; encoding again", exc_info=True)
        return self._encode_now(arr)

    @staticmethod
    def handles(arr: np.ndarray) -> bool:
        """What ``encode_array`` stores as PNG (uint8 HxW, HxWx3, HxWx4), when large enough to be worth it."""
        return (
            arr.dtype == np.uint8
            and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)))
            and arr.nbytes >= ImageEncodings.min_pixels_bytes
        )

    def _encode_now(self, arr: np.ndarray) -> tuple[BlobRef, bytes]:
        if not self.handles(arr):
            return encode_array(arr)
        arr = np.ascontiguousarray(arr)
        key = (hashlib.sha256(arr.data).hexdigest(), tuple(arr.shape), arr.dtype.str)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        ref, data = encode_array(arr)  # outside the lock: threads encode different images at once
        with self._lock:
            if key not in self._items and len(data) <= self.max_bytes:
                self._items[key] = (ref, data)
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, (_, old) = self._items.popitem(last=False)
                    self._bytes -= len(old)
        return ref, data


_PLAIN = (str, int, bool, type(None))


def _plain_list(values: list[Any] | tuple[Any, ...]) -> bool:
    """Every item a JSON scalar that ``encode_value`` would return unchanged (long RLE counts, scores)."""
    for v in values:
        t = type(v)
        if t is float:
            if not math.isfinite(v):
                return False
        elif t not in _PLAIN:
            return False
    return True


class _Encoder:
    """``encode_value`` (same output) with a per-run memo for arrays, so the image in the state is encoded
    once per run rather than once per node that reads it; images go through the recorder's
    :class:`ImageEncodings`; plain lists (mask run lengths) are copied in one go, not item by item."""

    def __init__(self, images: ImageEncodings | None = None) -> None:
        self.blobs: dict[str, bytes] = {}
        self._images = images
        self._memo: dict[int, tuple[Any, Any]] = {}  # id(array) -> (array kept alive, encoded value)

    def __call__(self, value: Any) -> Any:
        return self._one(value)

    def _one(self, value: Any) -> Any:
        t = type(value)
        if t in _PLAIN:
            return value
        if t is dict:
            return {str(k): self._one(v) for k, v in value.items()}
        if t is list or t is tuple:
            return list(value) if _plain_list(value) else [self._one(v) for v in value]
        if isinstance(value, np.ndarray):
            hit = self._memo.get(id(value))
            if hit is not None and hit[0] is value:
                return hit[1]
            if self._images is not None:
                ref, data = self._images.encode(value)
                self.blobs[ref.blob] = data
                encoded: Any = {BLOB_KEY: ref.model_dump()}
            else:
                encoded = encode_value(value, self.blobs)
            self._memo[id(value)] = (value, encoded)
            return encoded
        return encode_value(value, self.blobs)


@dataclass
class _Span:
    node: str
    start: float
    reads: Any  # raw values, encoded when the trace is written
    model_id: str | None
    weights_sha256: str | None
    end: float | None = None
    writes: Any = None
    error: str | None = None


@dataclass
class _Run:
    start_wall: float
    start_perf: float
    inputs: Any
    metadata: dict[str, Any]
    name: str = "graph"  # the root run's name (LangGraph's default is "LangGraph"; with_config(run_name=...))
    spans: dict[UUID, _Span] = field(default_factory=dict)


class TraceNotRecorded(StoreError):
    """A run finished but its trace could not be written. ``result``: the graph's own output (None when the
    graph itself failed, or for failures raised by ``flush``); ``failures``: one line per run not recorded."""

    def __init__(self, message: str, *, result: Any = None, failures: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.result = result
        self.failures = list(failures)


class TraceRecorder(BaseCallbackHandler):
    """Records every run of a LangGraph graph it is attached to as one trace in ``store``.

    ``schema``: the graph's :class:`GraphSchema` (output restricted to its output fields; graph id from it).
    ``graph_id``: the graph's name and hash when there is no schema (``record()`` derives one from the graph).
    With neither, each trace's id is derived from its run (a callback never sees the graph object): the
    root run's name plus a hash of that name and the nodes that ran (name, model id, weights), so two
    different graphs recorded on one input into one store do not collide on the store's unique key.
    ``group_id``: default group for every trace (else ``config["metadata"]["graphdistill_group_id"]``, else
    the input hash). ``metadata``: merged into every trace's metadata. ``on_trace(trace, trace_id)`` is
    called after each append (``trace_id`` is None when the store refused it, e.g. a duplicate).

    ``store``: a :class:`TraceStore`, a folder path or a ``file://`` URL (opened at once; anything else is
    refused here, before the first run), or a :class:`~graphdistill.store.buffer.TraceBuffer` that keeps the
    traces for a writer elsewhere (a Ray actor's recorder; ``recording.ray_engine``).

    **No trace is lost in silence.** Every run whose trace cannot be written (the store deleted or read-only,
    the disk full, a value that cannot be stored) is counted in ``failed_to_record``, described in
    ``failures`` and logged as an error. With ``strict=True`` (default) it is also raised:
    :class:`TraceNotRecorded` from ``invoke`` / ``batch`` itself once the graph has finished (the graph's own
    result is the exception's ``result``: nothing the graph computed is lost either), or, with
    ``background=True``, from the next :meth:`flush` / :meth:`close`. ``strict=False`` only counts and logs
    (a batch recorder that reports its own tallies); :meth:`raise_if_failed` raises for failures not yet
    raised in either mode. A run where the graph itself failed is a trace too (status ``error``).

    ``background=False`` (default): the trace is encoded and durably appended before ``invoke`` returns;
    the input images' PNGs are started on a helper thread when the run starts, so that encode overlaps the
    graph (see :class:`ImageEncodings`). ``background=True``: encoding (PNG) and the fsynced append run on
    one writer thread, off the graph's critical path; call :meth:`flush` (or :meth:`close`) before reading
    the store. At most ``max_pending`` traces wait; beyond that the graph waits (memory stays bounded).
    Values are encoded while or after the graph runs, so nodes must not mutate arrays in place (LangGraph's
    state convention). :meth:`close` also stops the helper thread.
    """

    run_inline = True  # called in the graph's own thread / event loop: ordering and keys stay exact
    raise_error = False  # per instance: True when strict, so LangChain lets TraceNotRecorded out of invoke

    def __init__(
        self,
        store: TraceStore | TraceBuffer | str | os.PathLike[str],
        *,
        schema: GraphSchema | None = None,
        graph_id: GraphId | None = None,
        group_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        on_trace: Callable[[Trace, str | None], None] | None = None,
        background: bool = False,
        max_pending: int = 32,
        strict: bool = True,
    ) -> None:
        self.store: TraceStore | TraceBuffer = (
            store if isinstance(store, TraceBuffer) else as_store(store, what="TraceRecorder store")
        )
        self.strict = strict
        self.raise_error = strict
        self.schema = schema
        if graph_id is None and schema is not None:
            graph_id = GraphId(
                name=schema.name, hash=schema.definition_hash or _hash_text(schema.model_dump_json())
            )
        self.graph_id = graph_id  # None: derived per run, see _run_graph_id
        self.group_id = group_id
        self.metadata = dict(metadata or {})
        if schema is not None:  # the filter and eval pick outputs by their declared kind, not their name
            self.metadata.setdefault("graph_schema", schema.model_dump(mode="json"))
        self.on_trace = on_trace
        self.background = background
        self.recorded = 0  # traces appended
        self.duplicates = 0  # traces the store already had (refused, not an error)
        self.failed_to_record = 0  # runs whose trace could not be written (logged, raised when strict)
        self.failures: list[str] = []  # what went wrong, one line per run not recorded
        self._reported = 0  # failures already raised
        self._lost: set[UUID] = set()  # root runs whose start could not be recorded
        self._lock = threading.Lock()
        self._runs: dict[UUID, _Run] = {}
        self._node_root: dict[UUID, UUID] = {}  # node run id -> its root run id
        self._queue: queue.Queue[tuple[_Run, Any, str | None, float] | None] = queue.Queue(max_pending)
        self._writer: threading.Thread | None = None
        self.images = ImageEncodings()  # shared by every run: K samples of one input encode it once

    def input_hash(self, inputs: dict[str, Any]) -> str:
        """The ``input_hash`` a run on ``inputs`` gets (its encoding is then reused when the run is written)."""
        return content_hash(_Encoder(self.images)(inputs))

    # --- root and node starts ----------------------------------------------------------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            meta = metadata or {}
            root = False
            with self._lock:
                if parent_run_id is None or (
                    parent_run_id not in self._runs
                    and parent_run_id not in self._node_root
                    and "langgraph_node" not in meta
                ):
                    self._runs[run_id] = _Run(
                        time.time(),
                        time.perf_counter(),
                        _snapshot(inputs),
                        dict(meta),
                        name=str(kwargs.get("name") or "graph"),
                    )
                    root = True
                elif parent_run_id in self._runs and "langgraph_node" in meta:
                    self._node_root[run_id] = parent_run_id
                    self._runs[parent_run_id].spans[run_id] = _Span(
                        node=str(meta["langgraph_node"]),
                        start=time.time(),
                        reads=_snapshot(inputs),
                        model_id=_opt_str(meta.get(META_MODEL_ID)),
                        weights_sha256=_opt_str(meta.get(META_WEIGHTS)),
                    )
            if root and isinstance(inputs, dict):  # encode the input images while the graph runs
                for value in inputs.values():
                    if isinstance(value, np.ndarray):
                        self.images.prefetch(value)
        except Exception as exc:
            if parent_run_id is None:  # a root run: its trace cannot be written at its end
                with self._lock:
                    self._lost.add(run_id)
            self._fail(f"run {run_id} (at its start)", exc)

    # --- ends ---------------------------------------------------------------------------------------------

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, outputs, None)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, None, error)

    def _end(self, run_id: UUID, outputs: Any, error: BaseException | None) -> None:
        with self._lock:
            lost = run_id in self._lost
            self._lost.discard(run_id)
        if lost:
            self._raise_new(outputs)
            return
        root = False
        try:
            with self._lock:
                root_id = self._node_root.pop(run_id, None)
                if root_id is not None:
                    run = self._runs.get(root_id)
                    span = run.spans.get(run_id) if run is not None else None
                    if span is not None:
                        span.end = max(time.time(), span.start)
                        span.writes = _snapshot(outputs) if error is None else None
                        span.error = _error_text(error) if error is not None else None
                    return
                run = self._runs.pop(run_id, None)
            if run is None:
                return
            root = True
            duration = time.perf_counter() - run.start_perf
            job = (
                run,
                _snapshot(outputs) if error is None else None,
                _error_text(error) if error else None,
                duration,
            )
            if self.background:
                self._ensure_writer()
                self._queue.put(job)
            else:
                self._write(*job)
        except Exception as exc:
            self._fail(f"run {run_id}", exc)
            if root and not self.background:
                self._raise_new(outputs)

    # --- failures -----------------------------------------------------------------------------------------

    def _fail(self, what: str, exc: BaseException) -> None:
        line = f"{what}: {type(exc).__name__}: {exc}"
        with self._lock:
            self.failed_to_record += 1
            self.failures.append(line)
            n = self.failed_to_record
        log.error(
            "trace NOT recorded in %s (%d so far): %s",
            self.store.root,
            n,
            line,
            exc_info=exc,
        )

    def _raise_new(self, result: Any = None) -> None:
        if self.strict:
            self.raise_if_failed(result)

    def raise_if_failed(self, result: Any = None) -> None:
        """Raise :class:`TraceNotRecorded` for the runs whose trace could not be written since the last time
        this raised (nothing when there are none). ``result``: the graph's output to hand back with it."""
        with self._lock:
            new = self.failures[self._reported :]
            self._reported = len(self.failures)
        if not new:
            return
        more = f" (and {len(new) - 1} more)" if len(new) > 1 else ""
        raise TraceNotRecorded(
            f"{len(new)} run(s) finished but their trace was NOT written to trace store {self.store.root}: "
            f"{new[0]}{more}. The graph's own result is this error's .result, and .failures lists every run not recorded",
            result=result,
            failures=new,
        )

    # --- writing ------------------------------------------------------------------------------------------

    def _write(self, run: _Run, outputs: Any, error: str | None, duration: float) -> None:
        encoder = _Encoder(self.images)
        meta = run.metadata
        raw_inputs = run.inputs if isinstance(run.inputs, dict) else {"input": run.inputs}
        input_fields = meta.get(META_INPUT_FIELDS)
        if isinstance(input_fields, (list, tuple)):
            raw_inputs = {k: raw_inputs[k] for k in input_fields if k in raw_inputs}
        inputs = encoder(raw_inputs)
        output: dict[str, Any] = {}
        if error is None and outputs is not None:
            raw = outputs if isinstance(outputs, dict) else {"output": outputs}
            if self.schema is not None:
                wanted = [f.name for f in self.schema.outputs]
                raw = {k: raw[k] for k in wanted if k in raw}
            output = encoder(raw)
        spans = []
        for s in sorted(run.spans.values(), key=lambda s: s.start):
            reads = encoder(s.reads)
            writes = encoder(s.writes) if s.writes is not None else {}
            spans.append(
                NodeSpan(
                    node=s.node,
                    start=s.start,
                    end=s.end if s.end is not None else max(time.time(), s.start),
                    reads=reads if isinstance(reads, dict) else {"input": reads},
                    writes=writes if isinstance(writes, dict) else {"output": writes},
                    model_id=s.model_id,
                    weights_sha256=s.weights_sha256,
                    error=s.error if s.end is not None else (s.error or "the node never ended"),
                )
            )
        input_hash = str(meta.get(META_INPUT_HASH) or content_hash(inputs))
        user_meta = meta.get(META_METADATA) or {}
        trace = Trace(
            graph=self.graph_id if self.graph_id is not None else _run_graph_id(run),
            inputs=inputs,
            spans=spans,
            output=output,
            status="ok" if error is None else "error",
            error=error,
            group_id=str(meta.get(META_GROUP) or self.group_id or input_hash),
            sample_index=int(meta.get(META_SAMPLE, 0) or 0),
            input_hash=input_hash,
            provenance=Provenance.model_validate(meta.get(META_PROVENANCE) or {}),
            metadata=encode_value({**self.metadata, **dict(user_meta)}, encoder.blobs),
            created_at=run.start_wall,
            duration_s=duration,
        )
        if meta.get(META_TRACE_ID):
            trace.id = str(meta[META_TRACE_ID])
        try:
            trace_id: str | None = self.store.append(trace, encoder.blobs)
        except DuplicateTraceError as exc:
            log.warning("not recorded: %s", exc)
            trace_id = None
        with self._lock:
            if trace_id is not None:
                self.recorded += 1
            else:
                self.duplicates += 1
        if self.on_trace is not None:
            self.on_trace(trace, trace_id)

    def _ensure_writer(self) -> None:
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=self._drain, name="graphdistill-trace-writer", daemon=True
                )
                self._writer.start()

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._write(*job)
            except Exception as exc:
                self._fail("a run written in the background", exc)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every finished run is written (a no-op when not in background mode); with ``strict``,
        raise :class:`TraceNotRecorded` if any of them could not be."""
        if self._writer is not None:
            self._queue.join()
        self._raise_new()

    def close(self) -> None:
        """Flush and stop the writer thread (and the image-encoding helper); with ``strict``, raise
        :class:`TraceNotRecorded` if a run could not be written."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            self._queue.put(None)
            writer.join()
        self._writer = None
        self.images.close()
        self._raise_new()


def graph_identity(graph: Any) -> tuple[GraphSchema | None, GraphId]:
    """The graph's schema (via ``graphdistill.graphs.schema_of`` when it knows the graph) and its id.

    Without a schema the id is the graph's name and a hash of its structure (nodes and edges)."""
    schema: GraphSchema | None = None
    try:
        from graphdistill import graphs

        schema_of = getattr(graphs, "schema_of", None)
        if schema_of is not None:
            schema = schema_of(graph)
    except Exception as exc:  # no builder yet, or a hand-written graph it does not know
        log.debug("no schema for graph %r: %s", getattr(graph, "name", graph), exc)
        schema = None
    if schema is not None:
        return schema, GraphId(
            name=schema.name, hash=schema.definition_hash or _hash_text(schema.model_dump_json())
        )
    name = str(getattr(graph, "name", None) or type(graph).__name__)
    try:
        drawn = graph.get_graph()
        structure = {
            "nodes": sorted(str(n) for n in drawn.nodes),
            "edges": sorted([str(e.source), str(e.target), bool(e.conditional)] for e in drawn.edges),
        }
        digest = _hash_text(json.dumps(structure, sort_keys=True))
    except Exception:
        digest = _hash_text(name)
    return None, GraphId(name=name, hash=digest)


def record(graph: Any, store: TraceStore | str | os.PathLike[str], **kwargs: Any) -> Any:
    """``graph`` with a :class:`TraceRecorder` bound: every invoke/batch/stream (sync or async) is recorded.

    ``store``: a :class:`TraceStore`, a folder path or a ``file://`` URL (anything else is refused here).
    Keyword arguments go to :class:`TraceRecorder` (``schema``, ``graph_id``, ``group_id``, ``metadata``,
    ``on_trace``, ``background``, ``strict``); schema and graph id are derived from the graph when not given.
    A run whose trace cannot be written raises :class:`TraceNotRecorded` from ``invoke`` (``strict``, the
    default) with the graph's result attached. With ``background=True`` build the :class:`TraceRecorder`
    yourself, so that you can ``flush()`` it.
    """
    if kwargs.get("schema") is None and kwargs.get("graph_id") is None:
        kwargs["schema"], kwargs["graph_id"] = graph_identity(graph)
    return graph.with_config(callbacks=[TraceRecorder(store, **kwargs)])


def stable_seed(group_id: str, sample_index: int) -> int:
    """The ``gd_seed`` of (input, sample): the same in every run and every worker (a hex group id)."""
    return (int(group_id[:8], 16) + sample_index * 1_000_003) & 0x7FFFFFFF


def sampling_configurable(group_id: str, sample_index: int) -> dict[str, Any]:
    """``config["configurable"]`` for sample ``sample_index`` of an input under the sampling contract
    (``graphs.visual_rag``): sample 0 greedy, the others drawn with a seed stable for (input, sample)."""
    return {
        "gd_sample_index": sample_index,
        "gd_sampling": sample_index > 0,
        "gd_seed": stable_seed(group_id, sample_index),
    }


def _run_graph_id(run: _Run) -> GraphId:
    """The id of a graph seen only through its callbacks: the root run's name and a hash of it plus the
    distinct nodes that ran (sorted, with their model id and weights). Stable for one graph on one input;
    a conditional branch not taken is not part of it (the callback never sees the compiled graph)."""
    nodes = sorted({(s.node, s.model_id or "", s.weights_sha256 or "") for s in run.spans.values()})
    text = json.dumps({"name": run.name, "nodes": nodes}, sort_keys=True)
    return GraphId(name=run.name, hash=_hash_text(text))


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _snapshot(value: Any) -> Any:
    """A shallow copy of a state dict: later key reassignments in the graph do not change what we record."""
    return dict(value) if isinstance(value, dict) else value


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 4000 else text[:4000] + "…"
