"""The trace store's promises: durable appends, no half-written traces, concurrent writers, crash recovery,
refusal of bad traces, no duplicates, Parquet export."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _fixtures import noise
from _netguard import subprocess_env
from graphdistill.store.parquet import export_parquet
from graphdistill.store.trace_store import (
    DuplicateTraceError,
    StoreError,
    TraceStore,
    TraceValidationError,
)
from graphdistill.trace import GraphId, NodeSpan, Trace, content_hash, encode_value

GRAPH = GraphId(name="toy", hash="h" * 8)


def seeded_trace(seed: int, sample_index: int = 0, *, status: str = "ok") -> tuple[Trace, dict[str, bytes]]:
    """A one-span toy trace and its blobs: a 12 x 16 picture of noise from ``seed`` and its mask (two blobs
    per seed), or a failed run. Not the visual_rag-shaped ``_fixtures.make_trace``: the store's promises are
    about bytes, blobs and rows, whatever the graph."""
    blobs: dict[str, bytes] = {}
    image = noise(seed, 12, 16)
    inputs = encode_value({"image": image, "question": f"q{seed}"}, blobs)
    ih = content_hash(inputs)
    mask = encode_value({"mask": image[..., 0] > 128}, blobs)
    trace = Trace(
        graph=GRAPH,
        inputs=inputs,
        spans=[NodeSpan(node="seg", start=1.0, end=1.5, reads=inputs, writes=mask, model_id="m")],
        output={"answer": f"a{seed}", **mask} if status == "ok" else {},
        status=status,  # type: ignore[arg-type]
        error=None if status == "ok" else "ValueError: boom",
        group_id=ih,
        sample_index=sample_index,
        input_hash=ih,
        duration_s=0.5,
    )
    return trace, blobs


def blob_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "blobs").rglob("*") if p.is_file())


def test_append_get_roundtrip_and_queries(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "s")
    t0, b0 = seeded_trace(0)
    t1, b1 = seeded_trace(0, sample_index=1)
    t2, b2 = seeded_trace(2, status="error")
    ids = [store.append(t, b) for t, b in ((t0, b0), (t1, b1), (t2, b2))]
    assert ids == [t0.id, t1.id, t2.id]
    got = store.get(t0.id)
    assert got == t0
    image = store.load(got.inputs["image"])
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, noise(0, 12, 16))
    assert store.load(got.output["mask"]).dtype == bool
    assert store.count() == 3
    assert store.count(status="error") == 1
    assert [t.id for t in store.iter(status="ok")] == [t0.id, t1.id]
    assert [t.id for t in store.iter(group_id=t0.group_id)] == [t0.id, t1.id]
    assert [t.id for t in store.iter(graph="toy", limit=1)] == [t0.id]
    assert store.count(graph="other") == 0
    assert store.has_input(t0.input_hash, 1) and not store.has_input(t0.input_hash, 2)
    assert store.groups() == {t0.group_id: [t0.id, t1.id], t2.group_id: [t2.id]}
    stats = store.stats()
    assert (stats["traces"], stats["ok"], stats["error"], stats["groups"]) == (3, 2, 1, 2)
    assert stats["nodes"]["seg"]["count"] == 3 and stats["nodes"]["seg"]["mean_s"] == pytest.approx(0.5)
    assert stats["failures"] == [{"id": t2.id, "error": "ValueError: boom"}]
    # blobs stored once however many traces use them; sqlite3 shell can read the table
    assert len(blob_files(tmp_path / "s")) == 4
    with sqlite3.connect(tmp_path / "s" / "traces.sqlite") as db:
        assert db.execute("select count(*) from traces where status='ok'").fetchone()[0] == 2
    assert store.check()["ok"]


def test_delete_then_gc_removes_only_unreferenced_blobs(tmp_path: Path) -> None:
    store = TraceStore(tmp_path)
    t0, b0 = seeded_trace(0)
    t1, b1 = seeded_trace(0, sample_index=1)  # same blobs as t0
    t2, b2 = seeded_trace(2)
    for t, b in ((t0, b0), (t1, b1), (t2, b2)):
        store.append(t, b)
    assert store.delete(t0.id) and not store.delete(t0.id)
    with pytest.raises(KeyError, match=t0.id):
        store.get(t0.id)
    assert store.gc(grace_s=0) == 0  # t1 still uses t0's blobs
    store.delete(t1.id)
    assert store.gc(grace_s=3600) == 0  # recently written blobs are kept (a concurrent append may need them)
    assert store.gc(grace_s=0) == 2
    assert store.load(store.get(t2.id).inputs["image"]).shape == (12, 16, 3)
    assert store.check()["ok"]


def test_bad_traces_are_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    store = TraceStore(tmp_path)
    good, gb = seeded_trace(0)
    store.append(good, gb)
    before_files = blob_files(tmp_path)

    bad = json.loads(seeded_trace(1)[0].to_json())
    del bad["group_id"]
    with pytest.raises(TraceValidationError, match="group_id"):
        store.append(bad, seeded_trace(1)[1])
    bad2 = json.loads(seeded_trace(1)[0].to_json())
    bad2["sample_index"] = -1
    with pytest.raises(TraceValidationError, match="sample_index"):
        store.append(bad2, seeded_trace(1)[1])
    t3, b3 = seeded_trace(3)
    with pytest.raises(TraceValidationError, match="neither given nor in the store"):
        store.append(t3, {})  # references blobs nobody has
    with pytest.raises(TraceValidationError, match="does not hash"):
        store.append(t3, {k: v + b"x" for k, v in b3.items()})
    with pytest.raises(DuplicateTraceError, match="already stored"):
        store.append(seeded_trace(0)[0], gb)  # same input, sample and graph as `good`
    assert store.count() == 1 and store.get(good.id) == good
    assert blob_files(tmp_path) == before_files
    store.close()
    assert TraceStore(tmp_path).count() == 1


def test_blob_reuse_without_bytes_and_corruption_detected(tmp_path: Path) -> None:
    store = TraceStore(tmp_path)
    t0, b0 = seeded_trace(0)
    store.append(t0, b0)
    t1, _ = seeded_trace(0, sample_index=1)
    store.append(t1, {})  # its blobs are already in the store
    sha = next(iter(b0))
    store.blob_path(sha).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="corrupt"):
        store.blob(sha)
    assert store.check()["corrupt_blobs"] == [sha]


def test_readonly_store_reads_and_refuses_writes(tmp_path: Path) -> None:
    t0, b0 = seeded_trace(0)
    TraceStore(tmp_path).append(t0, b0)
    ro = TraceStore(tmp_path, readonly=True)
    assert ro.get(t0.id) == t0
    with pytest.raises(StoreError, match="read-only"):
        ro.append(*seeded_trace(1))
    with pytest.raises(StoreError, match="not a trace store"):
        TraceStore(tmp_path / "nothing", readonly=True)


def test_export_parquet_one_row_per_trace_in_shards(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    store = TraceStore(tmp_path / "s")
    traces = [seeded_trace(i)[0] for i in range(4)] + [seeded_trace(9, status="error")[0]]
    for i, t in enumerate(traces):
        store.append(t, seeded_trace(i if i < 4 else 9, status=t.status)[1])
    paths = export_parquet(store, tmp_path / "pq", shard_rows=2)
    assert [Path(p).name for p in paths] == [f"traces-0000{i}.parquet" for i in range(3)]
    table = pq.read_table(tmp_path / "pq")  # a folder of shards reads as one table
    assert table.num_rows == 5
    assert set(table.column_names) >= {
        "id",
        "status",
        "error",
        "inputs_json",
        "spans_json",
        "provenance_json",
    }
    rows = {r["id"]: r for r in table.to_pylist()}
    failed = rows[traces[-1].id]
    assert failed["status"] == "error" and failed["error"] == "ValueError: boom"
    ok = rows[traces[0].id]
    assert json.loads(ok["output_json"])["answer"] == "a0"
    assert json.loads(ok["spans_json"])[0]["node"] == "seg"
    assert ok["input_hash"] == traces[0].input_hash
    # an empty store still exports a readable (empty) table
    empty = export_parquet(TraceStore(tmp_path / "e"), tmp_path / "epq")
    assert pq.read_table(empty[0]).num_rows == 0


# --- crashes and concurrency (real subprocesses, real SIGKILL) ------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, os
    sys.path.insert(0, {tests!r})
    from test_store import seeded_trace
    from graphdistill.store.trace_store import TraceStore
    store = TraceStore(sys.argv[1])
    start, n = int(sys.argv[2]), int(sys.argv[3])
    crash = sys.argv[4] if len(sys.argv) > 4 else ""
    if crash == "before-row":
        TraceStore._insert_row = lambda *a, **k: os._exit(9)  # blobs written, row never committed
    if crash == "mid-blobs":
        real_write, calls = TraceStore._write_blob, []
        def write_then_die(self, sha, data):
            calls.append(sha)
            if len(calls) == 2:
                os._exit(9)  # first blob written, second not
            real_write(self, sha, data)
        TraceStore._write_blob = write_then_die
    for i in range(start, start + n):
        t, b = seeded_trace(i)
        store.append(t, b)
        print(t.id, flush=True)  # acknowledged
    """
)


def _writer(tmp_path: Path) -> Path:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent)))
    return script


@pytest.mark.slow  # real subprocesses
def test_acknowledged_appends_survive_kill_9(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(_writer(tmp_path)), str(tmp_path / "s"), "0", "100000"],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    assert proc.stdout is not None
    acked = [proc.stdout.readline().strip() for _ in range(5)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = TraceStore(tmp_path / "s")  # reopening after the crash: cleaned and checked
    for tid in acked:
        t = store.get(tid)
        assert store.load(t.inputs["image"]).shape == (12, 16, 3)
    assert store.count() >= len(acked)
    assert store.check()["ok"]
    assert not list((tmp_path / "s" / "blobs").rglob(".tmp-*"))
    t, b = seeded_trace(10**6)
    store.append(t, b)  # usable
    assert store.get(t.id) == t


@pytest.mark.slow  # real subprocesses
@pytest.mark.parametrize(("crash", "blobs_left"), [("before-row", 2), ("mid-blobs", 1)])
def test_crash_during_append_shows_no_trace(tmp_path: Path, crash: str, blobs_left: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(_writer(tmp_path)), str(tmp_path / "s"), "0", "1", crash],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert proc.returncode == 9 and proc.stdout == ""
    assert len(blob_files(tmp_path / "s")) == blobs_left  # the row never made it
    # a temp file left by a writer that died mid-blob
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = dead.stdout.strip()
    stray = tmp_path / "s" / "blobs" / "ab" / f".tmp-{dead_pid}-deadbeef"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half a blob")
    store = TraceStore(tmp_path / "s")
    assert store.count() == 0 and list(store.iter()) == []
    assert not stray.exists()
    assert store.check()["ok"]
    assert store.gc(grace_s=0) == blobs_left  # orphans of the crashed append
    t, b = seeded_trace(0)
    store.append(t, b)  # the same trace can now be stored
    assert store.load(store.get(t.id).inputs["image"]).shape == (12, 16, 3)


@pytest.mark.slow  # real subprocesses
def test_several_processes_append_at_once(tmp_path: Path) -> None:
    script = _writer(tmp_path)
    TraceStore(tmp_path / "s").close()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "s"), str(k * 100), "15"],
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for k in range(3)
    ]
    acked: list[str] = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        acked += out.split()
    store = TraceStore(tmp_path / "s")
    assert len(acked) == 45 and store.count() == 45
    assert sorted(t.id for t in store.iter()) == sorted(acked)
    assert store.check()["ok"]


def test_iter_pages_through_the_store_in_order(tmp_path: Path) -> None:
    store = TraceStore(tmp_path)
    ids = [store.append(*seeded_trace(i)) for i in range(5)]
    assert [t.id for t in store.iter(page=2)] == ids
    assert [t.id for t in store.iter(page=2, limit=3)] == ids[:3]
    assert [r["id"] for r in store.rows(limit=2)] == ids[:2]
    assert [row[0] for batch in store.raw_rows(batch=2) for row in batch] == ids


def test_copy_from_brings_a_trace_and_every_blob_it_references(tmp_path: Path) -> None:
    trace, blobs = seeded_trace(7)
    with TraceStore(tmp_path / "a") as a:
        a.append(trace, blobs)
        with TraceStore(tmp_path / "b") as b:
            assert b.copy_from(a, a.get(trace.id)) == trace.id
            assert b.get(trace.id) == a.get(trace.id)
            assert {sha: b.blob(sha) for sha in blobs} == blobs
            with pytest.raises(DuplicateTraceError):
                b.copy_from(a, a.get(trace.id))
