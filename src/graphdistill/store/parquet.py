"""Export a trace store to Parquet shards: one row per trace (failed ones too, with their error).

The nested parts of a trace (inputs, output, spans, provenance, metadata) are JSON strings, so the files are
readable by pyarrow, pandas and Hugging Face ``datasets``' parquet loader without a custom schema; blob
references inside them name files under the store's ``blobs/`` folder. The folder is a local path or an fsspec
URL (``file://``, ``memory://``, ``s3://...`` with the user's own credentials; see :mod:`graphdistill._fs`).
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from graphdistill._fs import Location, resolve

if TYPE_CHECKING:
    from graphdistill.store.trace_store import TraceStore

log = logging.getLogger(__name__)

COLUMNS: list[tuple[str, str]] = [
    ("id", "string"),
    ("graph_name", "string"),
    ("graph_hash", "string"),
    ("group_id", "string"),
    ("sample_index", "int64"),
    ("input_hash", "string"),
    ("status", "string"),
    ("error", "string"),
    ("created_at", "float64"),
    ("duration_s", "float64"),
    ("inputs_json", "string"),
    ("output_json", "string"),
    ("spans_json", "string"),
    ("provenance_json", "string"),
    ("metadata_json", "string"),
]


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])


def export_parquet(
    store: TraceStore, out_dir: str | os.PathLike[str], *, shard_rows: int = 1000
) -> list[str]:
    """Write ``out_dir/traces-00000.parquet``, ... (``shard_rows`` rows each); returns the shards' paths (or
    URLs, when ``out_dir`` is one).

    Locally each shard is written to a temp name and renamed, so a crash never leaves a truncated shard
    behind; on an object store each shard is one whole put (a reader sees it whole or not at all). An empty
    store gives one empty shard (a valid table with the columns).
    """
    import pyarrow as pa

    from graphdistill.store.trace_store import StoreError

    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    out = resolve(out_dir, "export folder", StoreError)
    if out.local:
        out.makedirs()
    for old in out.glob("traces-*.parquet"):  # a re-export replaces the previous one, not mixes with it
        out.remove(old)
    schema = _schema()
    paths: list[str] = []
    for batch in store.raw_rows(batch=shard_rows):
        cols: dict[str, list[Any]] = {name: [] for name, _ in COLUMNS}
        for gid, gname, ghash, group, sample, ihash, status, error, created, duration, text in batch:
            doc = json.loads(text)
            for name, value in (
                ("id", gid),
                ("graph_name", gname),
                ("graph_hash", ghash),
                ("group_id", group),
                ("sample_index", sample),
                ("input_hash", ihash),
                ("status", status),
                ("error", error),
                ("created_at", created),
                ("duration_s", duration),
                ("inputs_json", _dumps(doc.get("inputs", {}))),
                ("output_json", _dumps(doc.get("output", {}))),
                ("spans_json", _dumps(doc.get("spans", []))),
                ("provenance_json", _dumps(doc.get("provenance", {}))),
                ("metadata_json", _dumps(doc.get("metadata", {}))),
            ):
                cols[name].append(value)
        paths.append(_write(pa.table(cols, schema=schema), out, len(paths)))
    if not paths:
        paths.append(_write(schema.empty_table(), out, 0))
    log.info("exported %s to %d parquet shard(s) in %s", store.root, len(paths), out.url)
    return paths


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _write(table: Any, out: Location, index: int) -> str:
    """One shard, written whole (renamed into place locally, one put on an object store); its path or URL."""
    import pyarrow.parquet as pq

    name = f"traces-{index:05d}.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.write_bytes(name, data=buf.getvalue())
    return out.name(name)
