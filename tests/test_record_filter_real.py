"""The issue's chain on the real default teacher, through the real CLI: `graphdistill record --samples 3` on
two built-in photos, then `graphdistill filter --json`, and the numbers add up (kept + dropped = recorded
groups). Real models, about a minute on a 2-core CPU: marked slow."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from _fixtures import cli, isolated_weights_home
from _netguard import subprocess_env

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

PHOTOS = ("skimage/chelsea", "skimage/astronaut")


@pytest.mark.slow
def test_record_three_samples_then_filter_real_default_graph(tmp_path: Path) -> None:
    from PIL import Image

    from graphdistill.recording.photos import photo
    from graphdistill.store.trace_store import TraceStore

    home = isolated_weights_home(tmp_path)
    env = subprocess_env(GRAPHDISTILL_HOME=str(home), COLUMNS="200")  # guarded like the tests
    (tmp_path / "photos").mkdir()
    rows = []
    for pid in PHOTOS:
        path = tmp_path / "photos" / (pid.replace("/", "_") + ".png")
        Image.fromarray(photo(pid).image()).save(path)
        rows.append(
            {"image": str(path), "question": "What is in this picture?", "provenance": {"photos": [pid]}}
        )
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store_dir = tmp_path / "store"

    recorded = json.loads(
        cli(
            ["record", "--inputs", str(inputs), "--store", str(store_dir), "--samples", "3", "--json"], env
        ).stdout
    )
    assert (recorded["recorded"], recorded["failed"], recorded["skipped"]) == (6, 0, 0)
    assert (home / "kb" / "chroma").is_dir()  # the default graph's KB was built in the isolated home

    store = TraceStore(store_dir, readonly=True)
    groups = store.groups()
    assert len(groups) == 2 and sorted(len(ids) for ids in groups.values()) == [3, 3]
    traces = list(store.iter())
    assert {t.graph.name for t in traces} == {"visual_rag"}
    assert Counter(t.sample_index for t in traces) == {0: 2, 1: 2, 2: 2}
    for t in traces:
        (reason,) = [s for s in t.spans if s.node == "reason"]
        assert reason.writes["finish_reason"] in ("stop", "length")  # what the truncated check reads
        assert t.provenance.photos and t.provenance.photos[0] in PHOTOS
    store.close()

    out = tmp_path / "ds"
    summary = json.loads(cli(["filter", str(store_dir), "--out", str(out), "--json"], env).stdout)
    assert summary["kept"] + summary["dropped"] == len(groups)
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert sum(summary["splits"].values()) == summary["kept"]
    assert isinstance(summary["by_rule"], dict) and sum(summary["by_rule"].values()) == summary["dropped"]
    assert (out / "manifest.json").is_file() and (out / "report" / "report.html").is_file()
