"""Export a trace store to Parquet shards: one row per trace (failed ones too, with their error).

The nested parts of a trace (inputs, output, spans, provenance, metadata) are JSON strings, so the files are
readable by pyarrow, pandas and Hugging Face ``datasets``' parquet loader without a custom schema; blob
references inside them name files under the store's ``blobs/`` folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
) -> list[Path]:
    """Write ``out_dir/traces-00000.parquet``, ... (``shard_rows`` rows each); returns the shard paths.

    Each shard is written to a temp name and renamed, so a crash never leaves a truncated shard behind.
    An empty store gives one empty shard (a valid table with the columns).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("traces-*.parquet"):  # a re-export replaces the previous one, not mixes with it
        old.unlink()
    schema = _schema()
    paths: list[Path] = []
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
        paths.append(_write(pa.table(cols, schema=schema), out, len(paths), pq))
    if not paths:
        paths.append(_write(schema.empty_table(), out, 0, pq))
    log.info("exported %s to %d parquet shard(s) in %s", store.root, len(paths), out)
    return paths


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _write(table: Any, out: Path, index: int, pq: Any) -> Path:
    path = out / f"traces-{index:05d}.parquet"
    tmp = out / f".{path.name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
