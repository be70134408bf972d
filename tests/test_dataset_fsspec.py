"""Datasets and trace exports at fsspec URLs: a dataset written to ``memory://`` (by the filter and by the writer)
reads back with the same rows and images as the same dataset on disk, ``file://`` is the plain path, ``traces
export`` writes its shards to a URL, the reader streams a split a row group at a time, a bad URL gives one clear
error (exit 2 from the command line), and a tiny student trains from a ``memory://`` dataset. No network: the
in-memory filesystem stands in for an object store."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import count_row_group_reads, ellipse_mask, make_trace, noise, obj, train_tiny
from graphdistill.cli import main
from graphdistill.dataset import (
    DatasetError,
    DatasetWriter,
    make_synthetic_dataset,
    open_dataset,
)
from graphdistill.filter.filtering import FilterConfig, filter_store
from graphdistill.store.trace_store import TraceStore
from graphdistill.trace import Document


def _store(root: Path, groups: int = 6) -> TraceStore:
    """A trace store of ``groups`` inputs, three agreeing samples each, every input its own photo."""
    store = TraceStore(root)
    blobs: dict[str, bytes] = {}
    box = (10, 10, 30, 30)
    for g in range(groups):
        for i in range(3):
            t = make_trace(
                f"g{g}",
                i,
                "There is a cat.",
                [obj("cat", box, 0.9, ellipse_mask(box))],
                ["doc-cat"],
                image=noise(g),
                photos=[f"p/{g}"],
                blobs=blobs,
                documents=[Document(id="doc-cat", text="A cat.")],
            )
            store.append(t, blobs)
    return store


def _same(a: Any, b: Any) -> None:
    """Two opened datasets hold the same manifest, rows (in order) and images."""
    assert a.manifest == b.manifest
    for split in ("train", "val", "test"):
        assert a.rows(split) == b.rows(split), split
    assert a.all_rows(), "the datasets are not empty"
    for row in a.all_rows():
        assert a.image_bytes(row) == b.image_bytes(row)
        assert np.array_equal(a.image(row), b.image(row))


def test_the_filter_writes_to_memory_what_it_writes_to_disk(tmp_path: Path, mem: Any) -> None:
    store = _store(tmp_path / "store")
    config = FilterConfig(fractions=(0.6, 0.2, 0.2))
    local = filter_store(store, tmp_path / "ds", config, report=False)
    remote = filter_store(store, "memory://sets/ds", config)  # its report too: drawn locally, copied up
    assert remote.dataset == "memory://sets/ds" and local.dataset == tmp_path / "ds"
    assert remote.summary() == local.summary() and remote.summary()["kept"] == 6
    _same(open_dataset("memory://sets/ds"), open_dataset(tmp_path / "ds"))
    files = set(mem.find("/sets/ds"))
    assert {"/sets/ds/manifest.json", "/sets/ds/train.parquet", "/sets/ds/report/report.html"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    assert not list(tmp_path.glob(".graphdistill-filter-*")), "the spool is gone"
    with pytest.raises(DatasetError, match=r"memory://sets/ds: already holds a dataset"):
        DatasetWriter("memory://sets/ds")


def test_the_writer_at_a_url_and_file_url_match_the_plain_path(tmp_path: Path, mem: Any) -> None:
    disk = make_synthetic_dataset(tmp_path / "ds", n=9, seed=2, size=48)
    memory = make_synthetic_dataset("memory://shapes", n=9, seed=2, size=48)
    assert memory.root == "memory://shapes" and disk.root == tmp_path / "ds"
    _same(memory, disk)
    on_disk = sorted(str(p.relative_to(tmp_path / "ds")) for p in (tmp_path / "ds").rglob("*") if p.is_file())
    assert sorted(p.removeprefix("/shapes/") for p in mem.find("/shapes")) == on_disk
    as_url = open_dataset(f"file://{tmp_path / 'ds'}")
    _same(as_url, disk)
    assert as_url.root == f"file://{tmp_path / 'ds'}"


def test_a_split_streams_one_row_group_at_a_time(
    tmp_path: Path, mem: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    import graphdistill.dataset as dataset

    monkeypatch.setattr(dataset, "ROW_GROUP", 4)  # the writer's row groups: 4 rows, so 14 rows make several
    make_synthetic_dataset("memory://many", n=20, seed=1, size=32, fractions=(1.0, 0.0, 0.0))
    with mem.open("/many/train.parquet", "rb") as f:
        assert pq.ParquetFile(f).num_row_groups == 5
    read = count_row_group_reads(monkeypatch)
    ds = open_dataset("memory://many")
    stream = ds.iter_rows("train")
    first = next(stream)
    assert read == [0], "one row group read for the first row"
    streamed = [first, *stream]
    assert read == [0, 1, 2, 3, 4]
    assert streamed == ds.rows("train") and len(streamed) == 20  # the same rows, in the same order
    read.clear()
    assert list(ds.iter_rows("train")) == streamed and read == [], "rows() already holds them: no re-read"
    assert list(dataset.iter_rows(ds)) == ds.all_rows()


def test_traces_export_writes_its_shards_to_a_url(
    tmp_path: Path, mem: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    store = _store(tmp_path / "store", groups=2)
    store.close()
    args = ["traces", "export", str(tmp_path / "store"), "--shard-rows", "4", "--json"]
    assert main([*args, "--out", "memory://exports/pq"]) == 0
    shards = json.loads(capsys.readouterr().out)["shards"]
    assert shards == [f"memory://exports/pq/traces-0000{i}.parquet" for i in range(2)]
    assert main([*args, "--out", str(tmp_path / "pq")]) == 0
    capsys.readouterr()
    remote = [
        pq.read_table(io.BytesIO(mem.cat_file(f"/exports/pq/traces-0000{i}.parquet"))) for i in range(2)
    ]
    local = [pq.read_table(tmp_path / "pq" / f"traces-0000{i}.parquet") for i in range(2)]
    assert [t.to_pylist() for t in remote] == [t.to_pylist() for t in local]
    assert sum(t.num_rows for t in remote) == 6


def test_a_bad_url_is_one_clear_error_and_exit_2(
    tmp_path: Path, mem: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(DatasetError, match=r"dataset nope://x: unknown filesystem protocol 'nope'"):
        open_dataset("nope://x")
    with pytest.raises(DatasetError, match=r"dataset memory://absent: no such folder"):
        open_dataset("memory://absent")
    with pytest.raises(DatasetError, match=r"nope://x: unknown filesystem protocol"):
        DatasetWriter("nope://x")
    store = _store(tmp_path / "store", groups=1)
    store.close()
    for argv, url in (
        (["traces", "export", str(tmp_path / "store"), "--out", "nope://pq"], "nope://pq"),
        (["filter", str(tmp_path / "store"), "--out", "nope://ds", "--no-embedder"], "nope://ds"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert (
            url in err and "unknown filesystem protocol 'nope'" in err and len(err.strip().splitlines()) == 1
        )


def test_an_s3_url_without_s3fs_names_the_package_to_install() -> None:
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed: an s3 URL would reach for the network")
    from graphdistill._lazy import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"dataset s3://bucket/ds: .*pip install s3fs"):
        open_dataset("s3://bucket/ds")


def test_a_student_trains_from_a_memory_dataset(
    tmp_path: Path, mem: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.student.predict import load_student

    make_synthetic_dataset("memory://train/ds", n=12, seed=0, size=64)
    run = train_tiny("memory://train/ds", tmp_path / "run")  # type: ignore[arg-type]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["dataset"] == "memory://train/ds"  # a URL is recorded as given, not made a local path
    predictor = load_student(run)
    assert predictor is not None and (run / "model.safetensors").exists()
    from graphdistill.eval.evaluate import evaluate_run

    result = evaluate_run(run, "memory://train/ds", split="val", teacher_timing=False, student_repeats=1)
    assert result["dataset"] == "memory://train/ds" and result["n"] == len(
        open_dataset("memory://train/ds").rows("val")
    )
    assert main(["train", "memory://absent", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "dataset memory://absent: no such folder" in err
