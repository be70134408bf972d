"""The trace store: SQLite (WAL) for the trace records + a content-addressed blob folder for dense data.

Layout of a store folder::

    root/traces.sqlite          table ``traces`` (indexed columns + the full trace JSON), ``trace_blobs``
    root/blobs/<sha[:2]>/<sha>  the bytes of every image / array a trace references, stored once

Promises (each has a test in ``tests/test_store.py``):

* an acknowledged :meth:`TraceStore.append` survives ``kill -9``: blobs are written to a temp file, fsynced,
  renamed and their folder fsynced; only then is the row committed with ``synchronous=FULL``;
* no half-written trace is ever visible: the row is the last thing written, in one transaction, and a trace
  that references a blob present neither in the given blobs nor in the store is refused;
* several processes can append at once (``busy_timeout``, ``BEGIN IMMEDIATE``, retries);
* a store opened after a crash is consistent and usable (stray temp files of dead writers are removed, the
  database is checked);
* a bad trace is refused with an error naming the field and nothing stored is touched;
* ``(input_hash, sample_index, graph_hash)`` is unique, so a rerun cannot duplicate a trace.

Inspect with the sqlite3 shell: ``sqlite3 root/traces.sqlite 'select id, status from traces'``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from pydantic import ValidationError

from graphdistill.errors import GraphdistillError
from graphdistill.trace import BLOB_KEY, BlobRef, Trace, decode_array, sha256_bytes

log = logging.getLogger(__name__)

DB_NAME = "traces.sqlite"
BLOB_DIR = "blobs"
_TMP_PREFIX = ".tmp-"
_BUSY_TIMEOUT_MS = 60_000
_RETRIES = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    id TEXT PRIMARY KEY,
    graph_name TEXT NOT NULL,
    graph_hash TEXT NOT NULL,
    group_id TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    input_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    duration_s REAL NOT NULL,
    schema_version INTEGER NOT NULL,
    json TEXT NOT NULL,
    UNIQUE (input_hash, sample_index, graph_hash)
);
CREATE INDEX IF NOT EXISTS traces_graph ON traces (graph_name, graph_hash);
CREATE INDEX IF NOT EXISTS traces_group ON traces (group_id, sample_index);
CREATE INDEX IF NOT EXISTS traces_status ON traces (status);
CREATE INDEX IF NOT EXISTS traces_created ON traces (created_at);
CREATE TABLE IF NOT EXISTS trace_blobs (
    trace_id TEXT NOT NULL REFERENCES traces (id) ON DELETE CASCADE,
    sha TEXT NOT NULL,
    PRIMARY KEY (trace_id, sha)
);
CREATE INDEX IF NOT EXISTS trace_blobs_sha ON trace_blobs (sha);
"""


class StoreError(GraphdistillError, RuntimeError):
    """The store cannot do what was asked; the message names the store and the trace or blob at fault."""


class TraceValidationError(StoreError, ValueError):
    """A trace was refused before anything was written; the message names the offending field."""


class DuplicateTraceError(StoreError):
    """A trace for the same (input_hash, sample_index, graph_hash) is already stored."""


def as_store(store: Any, *, what: str = "store") -> TraceStore:
    """A :class:`TraceStore` as is; a path (``str`` / ``os.PathLike``) or a ``file://`` URL opened (created
    when absent). Anything else is refused at once, naming it: a recorder must never find out at the end of
    its first run that it has nowhere to write."""
    if isinstance(store, TraceStore):
        return store
    if isinstance(store, str) and "://" in store:
        parsed = urlparse(store)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise StoreError(
                f"{what} {store!r}: a trace store is a local folder; give a path or a file:// URL "
                f"(not {parsed.scheme}://)"
            )
        store = unquote(parsed.path)
    if isinstance(store, str | os.PathLike):
        if not os.fspath(store):
            raise StoreError(f"{what}: an empty path is not a trace store")
        return TraceStore(store)
    raise TypeError(
        f"{what} must be a TraceStore, a folder path or a file:// URL, not {type(store).__name__} {store!r:.80}"
    )


class TraceStore:
    """A folder of traces. Thread-safe; many processes may append to one store at once.

    ``readonly=True`` opens the database read-only (readers never block writers in WAL mode).
    ``check=True`` runs ``PRAGMA quick_check`` on open and refuses a damaged database.
    """

    def __init__(self, root: str | os.PathLike[str], *, readonly: bool = False, check: bool = True) -> None:
        self.root = Path(root)
        self.readonly = readonly
        self.blob_root = self.root / BLOB_DIR
        self._lock = threading.RLock()
        db = self.root / DB_NAME
        if readonly:
            if not db.exists():
                raise StoreError(f"trace store {self.root}: no {DB_NAME} there (not a trace store?)")
            self._db = sqlite3.connect(
                f"{db.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        else:
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"trace store {self.root}: exists and is not a folder")
            self.blob_root.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(db), timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        self._db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        if not readonly:
            self._retry(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._retry(lambda: self._db.executescript(_SCHEMA))
            self._clean_stray_temp_files()
        if check:
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StoreError(f"trace store {self.root}: the database is damaged: {problems[:5]}")

    # ---------------------------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TraceStore({str(self.root)!r}{', readonly' if self.readonly else ''})"

    def _retry(self, fn: Any) -> Any:
        """Run ``fn`` retrying on 'database is locked' beyond the busy timeout (many writers at once)."""
        delay = 0.05
        for attempt in range(_RETRIES):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or attempt == _RETRIES - 1:
                    raise
                log.debug("trace store %s busy (%s); retrying", self.root, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def _clean_stray_temp_files(self) -> None:
        """Remove temp blob files left by writers that died (their pid is gone) or that are a day old."""
        removed = 0
        for tmp in self.blob_root.glob(f"*/{_TMP_PREFIX}*"):
            try:
                pid = int(tmp.name[len(_TMP_PREFIX) :].split("-")[0])
            except ValueError:
                pid = -1
            try:
                stale = time.time() - tmp.stat().st_mtime > 86_400
                if stale or not _pid_alive(pid):
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("trace store %s: removed %d temp files left by a crashed writer", self.root, removed)

    def check(self) -> dict[str, Any]:
        """Full consistency check: ``PRAGMA integrity_check`` and every referenced blob present and intact."""
        with self._lock:
            integrity = [r[0] for r in self._db.execute("PRAGMA integrity_check").fetchall()]
            shas = [r[0] for r in self._db.execute("SELECT DISTINCT sha FROM trace_blobs").fetchall()]
        missing, corrupt = [], []
        for sha in shas:
            path = self.blob_path(sha)
            if not path.exists():
                missing.append(sha)
            elif sha256_bytes(path.read_bytes()) != sha:
                corrupt.append(sha)
        return {
            "ok": integrity == ["ok"] and not missing and not corrupt,
            "integrity": integrity,
            "blobs_checked": len(shas),
            "missing_blobs": missing,
            "corrupt_blobs": corrupt,
        }

    # ---------------------------------------------------------------------------------------------------
    # writing
    # ---------------------------------------------------------------------------------------------------

    def copy_from(self, source: TraceStore, trace: Trace) -> str:
        """Store ``trace``, read from ``source``, with every blob it references read from there too (a store
        copied or merged trace by trace); :meth:`append`'s errors and return value."""
        return self.append(trace, {ref.blob: source.blob(ref.blob) for ref in trace.blob_refs()})

    def append(self, trace: Trace | Mapping[str, Any], blobs: Mapping[str, bytes] | None = None) -> str:
        """Store one trace and the blobs it references; returns its id once it is durable.

        Blobs are written first (temp file, fsync, rename, fsync of the folder), then the row in one
        transaction. Raises :class:`TraceValidationError` for a bad trace (nothing is written) and
        :class:`DuplicateTraceError` when the same (input_hash, sample_index, graph) is already stored.
        """
        self._writable()
        trace = _validated(trace)
        blobs = dict(blobs or {})
        for sha, data in blobs.items():
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TraceValidationError(
                    f"trace {trace.id}: blob {sha[:12]}… is {type(data).__name__}, not bytes"
                )
            if sha256_bytes(bytes(data)) != sha:
                raise TraceValidationError(f"trace {trace.id}: blob {sha[:12]}… does not hash to its name")
        refs = {ref.blob for ref in trace.blob_refs()}
        absent = sorted(sha for sha in refs if sha not in blobs and not self.blob_path(sha).exists())
        if absent:
            raise TraceValidationError(
                f"trace {trace.id}: references blob {absent[0]} (and {len(absent) - 1} more) that is neither "
                "given nor in the store"
            )
        for sha in sorted(refs):
            if sha in blobs:
                self._write_blob(sha, bytes(blobs[sha]))
            else:
                _touch(self.blob_path(sha))  # keep a reused blob out of a concurrent gc's reach
        row = (
            trace.id,
            trace.graph.name,
            trace.graph.hash,
            trace.group_id,
            trace.sample_index,
            trace.input_hash,
            trace.status,
            trace.error,
            trace.created_at,
            trace.duration_s,
            trace.schema_version,
            trace.to_json(),
        )
        self._retry(lambda: self._insert_row(trace, row, sorted(refs)))
        return trace.id

    def _insert_row(self, trace: Trace, row: tuple[Any, ...], shas: list[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(f"INSERT INTO traces VALUES ({','.join('?' * len(row))})", row)
                self._db.executemany(
                    "INSERT OR IGNORE INTO trace_blobs (trace_id, sha) VALUES (?, ?)",
                    [(trace.id, s) for s in shas],
                )
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                raise DuplicateTraceError(
                    f"trace store {self.root}: a trace for input {trace.input_hash[:12]}… sample "
                    f"{trace.sample_index} of graph {trace.graph.name} is already stored (or id {trace.id} "
                    f"is taken): {exc}"
                ) from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _write_blob(self, sha: str, data: bytes) -> None:
        path = self.blob_path(sha)
        if path.exists() and path.stat().st_size == len(data):
            _touch(path)
            return
        new_dir = not path.parent.exists()
        if new_dir:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        if new_dir:  # the new subfolder's own entry must be durable too
            _fsync_dir(path.parent.parent)

    def delete(self, trace_id: str) -> bool:
        """Remove one trace (its blobs stay until :meth:`gc`). Returns whether it existed."""
        self._writable()

        def run() -> bool:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute("DELETE FROM trace_blobs WHERE trace_id = ?", (trace_id,))
                    n = self._db.execute("DELETE FROM traces WHERE id = ?", (trace_id,)).rowcount
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return n > 0

        return bool(self._retry(run))

    def gc(self, grace_s: float = 3600.0) -> int:
        """Delete blob files no trace references. Files touched in the last ``grace_s`` seconds are kept, so
        an append running concurrently (blobs written, row not yet committed) never loses its blobs."""
        self._writable()
        with self._lock:
            used = {r[0] for r in self._db.execute("SELECT DISTINCT sha FROM trace_blobs")}
        now = time.time()
        removed = 0
        for path in self.blob_root.glob("*/*"):
            if path.name.startswith(_TMP_PREFIX) or path.name in used:
                continue
            try:
                if now - path.stat().st_mtime >= grace_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"trace store {self.root} is open read-only")
        if not (self.root / DB_NAME).exists():  # a write would go to a deleted file's inode, and be lost
            raise StoreError(f"trace store {self.root}: its database {DB_NAME} was deleted while open")

    # ---------------------------------------------------------------------------------------------------
    # reading
    # ---------------------------------------------------------------------------------------------------

    def get(self, trace_id: str) -> Trace:
        with self._lock:
            row = self._db.execute("SELECT json FROM traces WHERE id = ?", (trace_id,)).fetchone()
        if row is None:
            raise KeyError(f"trace store {self.root}: no trace with id {trace_id!r}")
        return Trace.from_json(row[0])

    def find_ids(self, prefix: str) -> list[str]:
        """Ids starting with ``prefix`` (for the CLI, which accepts short ids)."""
        with self._lock:
            return [
                r[0]
                for r in self._db.execute("SELECT id FROM traces WHERE id LIKE ? LIMIT 10", (prefix + "%",))
            ]

    def iter(
        self,
        *,
        status: str | None = None,
        graph: str | None = None,
        group_id: str | None = None,
        limit: int | None = None,
        page: int = 500,
    ) -> Iterator[Trace]:
        """Traces in the order they were stored, filtered by status, graph (name or hash) and group.

        Reads ``page`` rows at a time, so a large store never sits in memory at once."""
        for rows in self._pages("json", status, graph, group_id, limit, page):
            for (text,) in rows:
                yield Trace.from_json(text)

    def _pages(
        self,
        columns: str,
        status: str | None,
        graph: str | None,
        group_id: str | None,
        limit: int | None,
        page: int,
    ) -> Iterator[list[tuple[Any, ...]]]:
        where, params = _filters(status, graph, group_id)
        where = where + (" AND" if where else " WHERE") + " rowid > ?"
        last, left = 0, limit
        while left is None or left > 0:
            n = page if left is None else min(page, left)
            with self._lock:
                rows = self._db.execute(
                    f"SELECT rowid, {columns} FROM traces{where} ORDER BY rowid LIMIT {int(n)}",
                    [*params, last],
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            if left is not None:
                left -= len(rows)
            yield [r[1:] for r in rows]

    def rows(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The indexed columns of each trace (no JSON parsing): for listings."""
        sql = (
            "SELECT id, graph_name, group_id, sample_index, status, duration_s, created_at, error "
            "FROM traces ORDER BY rowid"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            cur = self._db.execute(sql)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def listing(
        self,
        *,
        offset: int = 0,
        limit: int = 50,
        search: str = "",
        status: str | None = None,
        group_id: str | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """One page of the stored order, for a browser: (how many match, the indexed columns and the
        question of ``limit`` traces from ``offset``). ``search`` matches a substring of the id, the group,
        the graph's name or the question; the page is read with LIMIT/OFFSET, never the whole store."""
        clauses, params = [], []
        if group_id is not None:
            clauses.append("group_id = ?")
            params.append(group_id)
        if status:
            clauses.append("status = ?")
            params.append(status)
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            like = f"%{escaped}%"
            clauses.append(
                "(id LIKE ? ESCAPE '\\' OR group_id LIKE ? ESCAPE '\\' OR graph_name LIKE ? ESCAPE '\\' "
                "OR json_extract(json, '$.inputs.question') LIKE ? ESCAPE '\\')"
            )
            params += [like] * 4
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        sql = (
            "SELECT id, graph_name, group_id, sample_index, status, duration_s, created_at, error, "
            f"json_extract(json, '$.inputs.question') AS question FROM traces{where} "
            "ORDER BY rowid LIMIT ? OFFSET ?"
        )
        with self._lock:
            total = int(self._db.execute(f"SELECT COUNT(*) FROM traces{where}", params).fetchone()[0])
            cur = self._db.execute(sql, [*params, max(0, int(limit)), max(0, int(offset))])
            names = [d[0] for d in cur.description]
            return total, [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def count(
        self, *, status: str | None = None, graph: str | None = None, group_id: str | None = None
    ) -> int:
        where, params = _filters(status, graph, group_id)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM traces{where}", params).fetchone()[0])

    def has_input(self, input_hash: str, sample_index: int = 0, *, graph_hash: str | None = None) -> bool:
        sql = "SELECT 1 FROM traces WHERE input_hash = ? AND sample_index = ?"
        params: list[Any] = [input_hash, sample_index]
        if graph_hash is not None:
            sql += " AND graph_hash = ?"
            params.append(graph_hash)
        with self._lock:
            return self._db.execute(sql + " LIMIT 1", params).fetchone() is not None

    def input_keys(self) -> set[tuple[str, str, int]]:
        """Every stored ``(graph_hash, input_hash, sample_index)``: the unique key, for resume elsewhere (a
        Ray actor asks :class:`~graphdistill.store.buffer.TraceBuffer` instead of this database)."""
        with self._lock:
            rows = self._db.execute("SELECT graph_hash, input_hash, sample_index FROM traces").fetchall()
        return {(str(g), str(h), int(i)) for g, h, i in rows}

    def groups(self) -> dict[str, list[str]]:
        """group_id -> trace ids, by sample index."""
        out: dict[str, list[str]] = {}
        with self._lock:
            rows = self._db.execute("SELECT group_id, id FROM traces ORDER BY group_id, sample_index, rowid")
            for group, tid in rows:
                out.setdefault(group, []).append(tid)
        return out

    def blob_path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.blob_root / sha[:2] / sha

    def blob(self, sha: str) -> bytes:
        """The bytes of one blob, verified against its hash."""
        path = self.blob_path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"trace store {self.root}: blob {sha} is missing") from None
        if sha256_bytes(data) != sha:
            raise StoreError(
                f"trace store {self.root}: blob {sha} is corrupt (its bytes do not hash to its name)"
            )
        return data

    def load(self, ref: BlobRef | Mapping[str, Any]) -> np.ndarray:
        """A blob reference (``BlobRef``, its dict, or an encoded ``{"__blob__": ...}`` value) -> array."""
        if not isinstance(ref, BlobRef):
            ref = BlobRef.model_validate(ref.get(BLOB_KEY, ref))
        return decode_array(ref, self.blob(ref.blob))

    def stats(self) -> dict[str, Any]:
        """Counts by status and graph, failures, per-node time, blob usage."""
        with self._lock:
            by_status = dict(
                self._db.execute("SELECT status, COUNT(*) FROM traces GROUP BY status").fetchall()
            )
            graphs = [
                {"name": n, "hash": h, "traces": c}
                for n, h, c in self._db.execute(
                    "SELECT graph_name, graph_hash, COUNT(*) FROM traces GROUP BY graph_name, graph_hash"
                )
            ]
            n_groups = self._db.execute("SELECT COUNT(DISTINCT group_id) FROM traces").fetchone()[0]
            failures = [
                {"id": i, "error": e}
                for i, e in self._db.execute(
                    "SELECT id, error FROM traces WHERE status = 'error' ORDER BY created_at LIMIT 20"
                )
            ]
            durations = self._db.execute("SELECT COALESCE(SUM(duration_s), 0) FROM traces").fetchone()[0]
            spans = self._db.execute("SELECT json_extract(json, '$.spans') FROM traces").fetchall()
        nodes: dict[str, dict[str, float]] = {}
        for (text,) in spans:
            for span in json.loads(text or "[]"):
                n = nodes.setdefault(span["node"], {"count": 0, "total_s": 0.0, "errors": 0})
                n["count"] += 1
                n["total_s"] += float(span["end"]) - float(span["start"])
                n["errors"] += 1 if span.get("error") else 0
        for n in nodes.values():
            n["mean_s"] = n["total_s"] / n["count"] if n["count"] else 0.0
        blob_files = [p for p in self.blob_root.glob("*/*") if not p.name.startswith(_TMP_PREFIX)]
        total = sum(by_status.values())
        return {
            "store": str(self.root),
            "traces": total,
            "ok": by_status.get("ok", 0),
            "error": by_status.get("error", 0),
            "groups": n_groups,
            "graphs": graphs,
            "total_duration_s": durations,
            "mean_duration_s": durations / total if total else 0.0,
            "nodes": nodes,
            "failures": failures,
            "blobs": {"count": len(blob_files), "bytes": sum(p.stat().st_size for p in blob_files)},
        }

    def raw_rows(self, batch: int = 1000) -> Iterator[list[tuple[Any, ...]]]:
        """All rows (indexed columns + JSON) in batches, in stored order: for export."""
        yield from self._pages(
            "id, graph_name, graph_hash, group_id, sample_index, input_hash, status, error, created_at, "
            "duration_s, json",
            None,
            None,
            None,
            None,
            batch,
        )


def _validated(trace: Trace | Mapping[str, Any]) -> Trace:
    try:
        if isinstance(trace, Trace):
            # re-validate: the object may have been mutated since construction
            return Trace.model_validate(trace.model_dump())
        return Trace.model_validate(dict(trace))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "trace"
        raise TraceValidationError(
            f"trace refused: field {field!r}: {first['msg']} ({exc.error_count()} problem(s) in all)"
        ) from exc


def _filters(status: str | None, graph: str | None, group_id: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if status is not None:
        clauses.append("status = ?")
        params.append(status)
    if graph is not None:
        clauses.append("(graph_name = ? OR graph_hash = ?)")
        params += [graph, graph]
    if group_id is not None:
        clauses.append("group_id = ?")
        params.append(group_id)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
