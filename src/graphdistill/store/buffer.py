"""A trace sink in memory: where a recorder running away from the store (a Ray actor) puts its finished
traces until the one writer appends them to the :class:`~graphdistill.store.trace_store.TraceStore`.

The recorder builds every trace exactly as it does for a store (one code path for what a trace is); only
the last step differs: :meth:`TraceBuffer.append` keeps ``(trace, blobs)`` and :meth:`TraceBuffer.take`
hands them over. :meth:`TraceBuffer.has_input` answers resume questions from the keys the writer's store
held when the job started (``TraceStore.input_keys``); a trace made in this job is refused as a duplicate by
the writer's store, which decides.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from graphdistill.trace import Trace

InputKey = tuple[str, str, int]  # (graph_hash, input_hash, sample_index): the store's unique key


class TraceBuffer:
    """Finished traces and their blobs, in memory, in the order they were appended. Thread-safe."""

    def __init__(self, stored: Iterable[InputKey] = (), root: str = "<trace buffer>") -> None:
        self.root = Path(root)  # named in the recorder's log lines, like a store's folder
        self._stored = set(stored)
        self._items: list[tuple[Trace, dict[str, bytes]]] = []
        self._lock = threading.Lock()

    def append(self, trace: Trace, blobs: Mapping[str, bytes] | None = None) -> str:
        """Keep ``trace`` and ``blobs`` for the writer; returns the trace id (the writer's store may still
        refuse it as a duplicate: it is the one that decides)."""
        with self._lock:
            self._items.append((trace, dict(blobs or {})))
        return trace.id

    def take(self) -> list[tuple[Trace, dict[str, bytes]]]:
        """Every trace appended since the last take, with its blobs; the buffer is empty afterwards."""
        with self._lock:
            items, self._items = self._items, []
        return items

    def has_input(self, input_hash: str, sample_index: int = 0, *, graph_hash: str | None = None) -> bool:
        """Whether the writer's store held this (input, sample) of ``graph_hash`` when the job started."""
        if graph_hash is None:
            return any(k[1] == input_hash and k[2] == sample_index for k in self._stored)
        return (graph_hash, input_hash, sample_index) in self._stored
