"""`graphdistill record` and `graphdistill traces` on a synthetic graph spec file (no real models)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from _netguard import subprocess_env
from graphdistill.cli import main
from graphdistill.store.trace_store import TraceStore

GRAPH_SRC = textwrap.dedent(
    """
    import os
    import time
    from typing import Any, TypedDict

    from langchain_core.runnables import RunnableConfig
    from langgraph.graph import END, START, StateGraph


    class State(TypedDict, total=False):
        image: Any
        question: str
        mask: Any
        answer: str


    def seg(state: State) -> dict:
        time.sleep(float(os.environ.get("GD_TEST_SLEEP", "0")))
        return {"mask": state["image"][..., 0] > 100}


    def answer(state: State, config: RunnableConfig) -> dict:
        conf = config.get("configurable", {})
        shape = "x".join(map(str, state["image"].shape[:2]))
        return {"answer": f"{state['question']} {shape} s{conf.get('gd_sample_index')} seed{conf.get('gd_seed')}"}


    def build():
        g = StateGraph(State)
        g.add_node("seg", seg, metadata={"graphdistill_model_id": "toy-seg"})
        g.add_node("answer", answer)
        g.add_edge(START, "seg")
        g.add_edge("seg", "answer")
        g.add_edge("answer", END)
        return g.compile()
    """
)


@pytest.fixture
def graph_spec(tmp_path: Path) -> str:
    path = tmp_path / "toy_graph.py"
    path.write_text(GRAPH_SRC)
    return f"{path}:build"


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def make_jsonl(tmp_path: Path, n: int) -> Path:
    make_images(tmp_path / "data" / "imgs", n)
    rows = [
        {"image": f"imgs/img{i:02d}.png", "question": f"what {i}?", "provenance": {"photos": [f"p{i}"]}}
        for i in range(n)
    ]
    path = tmp_path / "data" / "inputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_record_jsonl_fills_store_with_samples_and_tta(
    tmp_path: Path, graph_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl = make_jsonl(tmp_path, 3)
    with jsonl.open("a") as fh:
        fh.write(json.dumps({"image": "imgs/missing.png", "question": "gone?"}) + "\n")
        fh.write("{not json\n")
    store_dir = tmp_path / "store"
    rc, out, _ = run_cli(
        ["record", "--graph", graph_spec, "--inputs", str(jsonl), "--store", str(store_dir), "--samples", "3",
         "--tta", "flip,scale", "--batch-size", "2", "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0
    summary = json.loads(out)
    assert (summary["recorded"], summary["failed"], summary["skipped"]) == (9, 3, 1)
    store = TraceStore(store_dir)
    assert store.count(status="ok") == 9 and store.count(status="error") == 3
    groups = store.groups()
    assert len(groups) == 4 and all(len(ids) == 3 for ids in groups.values())
    for ids in groups.values():
        traces = [store.get(i) for i in ids]
        if traces[0].status == "error":
            assert all("missing.png" in (t.error or "") for t in traces)
            continue
        assert [t.sample_index for t in traces] == [0, 1, 2]
        assert len({t.group_id for t in traces}) == 1
        assert traces[0].provenance.photos and traces[0].provenance.photos[0].startswith("p")
        orig = store.load(traces[0].inputs["image"])
        assert traces[0].metadata["tta"] == {"flip": False, "scale": 1.0, "orig_size": [20, 30]}
        assert traces[1].metadata["tta"] == {"flip": True, "scale": 1.0, "orig_size": [20, 30]}
        np.testing.assert_array_equal(store.load(traces[1].inputs["image"]), orig[:, ::-1])
        assert traces[2].metadata["tta"]["scale"] == 0.8
        assert store.load(traces[2].inputs["image"]).shape == (16, 24, 3)
        # the graph saw the sample index and a stable seed through config["configurable"]
        answers = [t.output["answer"] for t in traces]
        assert answers[0].endswith(f"s0 seed{int(traces[0].group_id[:8], 16) & 0x7FFFFFFF}")
        assert " 16x24 s2 " in answers[2]
        assert [s.node for s in traces[0].spans] == ["seg", "answer"]
    # the same run again with --resume records nothing new
    rc, out, _ = run_cli(
        ["record", "--graph", graph_spec, "--inputs", str(jsonl), "--store", str(store_dir), "--samples", "3",
         "--tta", "flip,scale", "--resume", "--json"],
        capsys,
    )  # fmt: skip
    assert json.loads(out)["recorded"] == 0 and TraceStore(store_dir).count() == 12


@pytest.mark.slow  # real subprocesses
def test_record_folder_with_two_workers(
    tmp_path: Path, graph_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    rc, out, _ = run_cli(
        ["record", "--graph", graph_spec, "--inputs", str(tmp_path / "imgs"), "--store", str(tmp_path / "s"),
         "--workers", "2", "--question", "count?", "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0 and json.loads(out)["recorded"] == 4 and json.loads(out)["failed"] == 1
    store = TraceStore(tmp_path / "s")
    assert {t.inputs["question"] for t in store.iter(status="ok")} == {"count?"}
    (bad,) = list(store.iter(status="error"))
    assert "broken.jpg" in (bad.error or "") and "not a readable image" in (bad.error or "")


def test_record_bad_arguments_are_one_line_errors(
    tmp_path: Path, graph_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run_cli(
        ["record", "--graph", graph_spec, "--inputs", str(tmp_path / "nope"), "--store", "s"], capsys
    )
    assert rc == 2 and "--inputs" in err and "nope" in err
    make_images(tmp_path / "imgs", 1)
    rc, _, err = run_cli(
        [
            "record",
            "--graph",
            graph_spec,
            "--inputs",
            str(tmp_path / "imgs"),
            "--store",
            "s",
            "--tta",
            "rotate",
        ],
        capsys,
    )
    assert rc == 2 and "rotate" in err
    rc, _, err = run_cli(
        ["record", "--graph", str(tmp_path / "no.py") + ":x", "--inputs", str(tmp_path / "imgs"), "--store",
         str(tmp_path / "s")],
        capsys,
    )  # fmt: skip
    assert rc == 2 and "no.py" in err


def _cli(*args: str, env_sleep: str = "0") -> subprocess.Popen[str]:
    env = subprocess_env(GD_TEST_SLEEP=env_sleep)  # the test network guard holds in the CLI process too
    return subprocess.Popen(
        [sys.executable, "-m", "graphdistill.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _count(store_dir: Path) -> int:
    db = store_dir / "traces.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5) as con:
            return int(con.execute("select count(*) from traces").fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _assert_each_once(store_dir: Path, n_inputs: int, samples: int, jsonl: Path | None = None) -> None:
    """Every input recorded exactly once per sample; with ``jsonl``, the stored images and provenance are
    exactly the rows' (each row's image once per sample)."""
    store = TraceStore(store_dir)
    keys = Counter((t.group_id, t.sample_index) for t in store.iter())
    assert len(keys) == n_inputs * samples and set(keys.values()) == {1}
    assert store.count(status="ok") == n_inputs * samples
    if jsonl is None:
        for t in store.iter():
            assert store.load(t.inputs["image"]).shape == (20, 30, 3)
    else:
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        expected = Counter(
            (np.asarray(Image.open(jsonl.parent / r["image"]).convert("RGB")).tobytes(), r["question"],
             tuple(r["provenance"]["photos"]))
            for r in rows for _ in range(samples)
        )  # fmt: skip
        seen = Counter(
            (store.load(t.inputs["image"]).tobytes(), t.inputs["question"], tuple(t.provenance.photos))
            for t in store.iter()
        )
        assert seen == expected
    assert store.check()["ok"]


@pytest.mark.slow  # real subprocesses
def test_sigkill_mid_run_then_resume_records_every_input_once(
    tmp_path: Path, graph_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # the Done-when chain: `inputs make --from DIR` -> `record` (SIGKILL mid-run) -> `record --resume`
    make_images(tmp_path / "photos", 3)
    jsonl = tmp_path / "made" / "inputs.jsonl"
    rc, out, err = run_cli(
        ["inputs", "make", "--from", str(tmp_path / "photos"), "--n", "8", "--seed", "0",
         "--no-composites", "--out", str(jsonl), "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)["rows"] == 8
    store_dir = tmp_path / "store"
    args = [
        "record",
        "--graph",
        graph_spec,
        "--inputs",
        str(jsonl),
        "--store",
        str(store_dir),
        "--samples",
        "2",
    ]
    proc = _cli(*args, env_sleep="0.15")
    deadline = time.monotonic() + 60
    while _count(store_dir) < 3:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the record run made no progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = _count(store_dir)
    assert 3 <= killed_at < 16
    resumed = _cli(*args, "--resume", "--json")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    summary = json.loads(out)
    assert summary["skipped"] == killed_at and summary["recorded"] == 16 - killed_at
    _assert_each_once(store_dir, 8, 2, jsonl)


@pytest.mark.slow  # real subprocesses
def test_two_record_processes_on_one_store(tmp_path: Path, graph_spec: str) -> None:
    jsonl = make_jsonl(tmp_path, 6)
    store_dir = tmp_path / "store"
    TraceStore(store_dir).close()
    base = ["record", "--graph", graph_spec, "--inputs", str(jsonl), "--store", str(store_dir), "--resume"]
    procs = [_cli(*base, "--json", env_sleep="0.02") for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    # between them every input is recorded once; a race on the same input is refused, never duplicated
    assert sum(r["recorded"] for r in results) == 6
    _assert_each_once(store_dir, 6, 1)


@pytest.mark.slow  # real subprocesses, bounded: 40 inputs, 12 kills, at most 90 s of killing
def test_soak_four_recorders_killed_and_restarted_at_random_store_every_input_once(
    tmp_path: Path, graph_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import random

    jsonl = make_jsonl(tmp_path, 40)
    store_dir = tmp_path / "store"
    TraceStore(store_dir).close()
    base = ["record", "--graph", graph_spec, "--inputs", str(jsonl), "--store", str(store_dir)]
    base += ["--samples", "2", "--resume", "--batch-size", "2", "--json"]
    rng = random.Random(0)
    procs = [_cli(*base, env_sleep="0.1") for _ in range(4)]
    kills = 0
    deadline = time.monotonic() + 90
    while kills < 12 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.2, 0.8))
        running = [i for i, p in enumerate(procs) if p.poll() is None]
        if not running:
            break
        i = rng.choice(running)
        os.kill(procs[i].pid, signal.SIGKILL)  # mid-batch, mid-write: wherever it happens to be
        procs[i].wait(timeout=30)
        kills += 1
        procs[i] = _cli(*base, env_sleep="0.1")  # and restarted, resuming by input hash
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert kills >= 8, "the recorders finished before the soak could kill them"
    _assert_each_once(store_dir, 40, 2, jsonl)
    assert TraceStore(store_dir).check()["ok"]
    rc, out, _ = run_cli(["traces", "ls", str(store_dir), "--json"], capsys)
    assert rc == 0 and len(json.loads(out)) == 80
    rc, out, err = run_cli(
        ["filter", str(store_dir), "--out", str(tmp_path / "ds"), "--no-embedder", "--json"], capsys
    )
    assert rc == 0 and json.loads(out)["kept"] + json.loads(out)["dropped"] == 40, err


def test_traces_ls_show_stats_export(
    tmp_path: Path, graph_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    jsonl = make_jsonl(tmp_path, 2)
    store_dir = str(tmp_path / "store")
    assert (
        run_cli(["record", "--graph", graph_spec, "--inputs", str(jsonl), "--store", store_dir], capsys)[0]
        == 0
    )
    rc, out, _ = run_cli(["traces", "ls", store_dir, "--json"], capsys)
    rows = json.loads(out)
    assert rc == 0 and len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    tid = rows[0]["id"]
    rc, out, _ = run_cli(["traces", "show", store_dir, tid[:10], "--image", str(tmp_path / "t.png")], capsys)
    assert rc == 0 and json.loads(out)["id"] == tid
    drawn = Image.open(tmp_path / "t.png")
    assert drawn.width >= 30 and drawn.height >= 20  # the input image, maybe with a caption panel
    rc, out, _ = run_cli(["traces", "stats", store_dir, "--json"], capsys)
    stats = json.loads(out)
    assert stats["traces"] == 2 and set(stats["nodes"]) == {"seg", "answer"}
    rc, out, _ = run_cli(["traces", "export", store_dir, "--out", str(tmp_path / "pq"), "--json"], capsys)
    table = pq.read_table(tmp_path / "pq")
    assert table.num_rows == 2 and sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert all(json.loads(s)["answer"].startswith("what") for s in table.column("output_json").to_pylist())
    rc, out, _ = run_cli(["traces", "ls", store_dir], capsys)
    assert rc == 0 and tid[:8] in out
    rc, _, err = run_cli(["traces", "show", store_dir, "zzzz"], capsys)
    assert rc == 2 and "zzzz" in err
    rc, _, err = run_cli(["traces", "ls", str(tmp_path / "nostore")], capsys)
    assert rc == 2 and "not a trace store" in err


RULE_SRC = textwrap.dedent(
    """
    def even_inputs(trace):
        # keep 'what 0?' and 'what 2?', drop 'what 1?' and 'what 3?'
        return int(trace.inputs["question"].split()[1].rstrip("?")) % 2 == 0
    """
)


@pytest.fixture
def recorded_store(tmp_path: Path, graph_spec: str, capsys: pytest.CaptureFixture[str]) -> Path:
    jsonl = make_jsonl(tmp_path, 4)
    store_dir = tmp_path / "store"
    rc, _, err = run_cli(
        ["record", "--graph", graph_spec, "--inputs", str(jsonl), "--store", str(store_dir)], capsys
    )
    assert rc == 0, err
    (tmp_path / "my_rules.py").write_text(RULE_SRC)
    return store_dir


def _filter(store_dir: Path, out: Path, capsys: pytest.CaptureFixture[str], *rule: str) -> dict[str, Any]:
    # the toy answers end without a full stop: the truncated check would drop every input before any rule
    rc, out_text, err = run_cli(
        ["filter", str(store_dir), "--out", str(out), "--no-embedder", "--disable-check", "truncated_answer",
         "--split", "1,0,0", "--json", *rule],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    return dict(json.loads(out_text))


def test_filter_rule_from_a_file_drops_what_it_fails(
    tmp_path: Path, recorded_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _filter(recorded_store, tmp_path / "ds0", capsys)
    assert (base["kept"], base["dropped"], base["by_rule"]) == (4, 0, {})
    spec = f"{tmp_path / 'my_rules.py'}:even_inputs"
    summary = _filter(recorded_store, tmp_path / "ds1", capsys, "--rule", spec)
    assert (summary["kept"], summary["dropped"]) == (2, 2)
    assert summary["by_rule"] == {spec: 2} and summary["splits"]["train"] == 2


def test_filter_rule_by_plain_name_from_graphdistill_rules(
    tmp_path: Path, recorded_store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAPHDISTILL_RULES", f"json, {tmp_path / 'my_rules.py'}")  # modules and files
    summary = _filter(recorded_store, tmp_path / "ds", capsys, "--rule", "even_inputs")
    assert (summary["kept"], summary["by_rule"]) == (2, {"even_inputs": 2})


def test_filter_rule_by_plain_name_from_an_entry_point(
    tmp_path: Path, recorded_store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # an installed package's entry point: a real dist-info folder on sys.path, found by importlib.metadata
    site = tmp_path / "site"
    (site / "gd_rules_pkg").mkdir(parents=True)
    (site / "gd_rules_pkg" / "__init__.py").write_text(RULE_SRC)
    info = site / "gd_rules_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gd-rules-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[graphdistill.rules]\neven = gd_rules_pkg:even_inputs\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("GRAPHDISTILL_RULES", raising=False)
    summary = _filter(recorded_store, tmp_path / "ds", capsys, "--rule", "even")
    assert (summary["kept"], summary["by_rule"]) == (2, {"even": 2})


def test_filter_unknown_rule_says_which_forms_are_accepted(
    tmp_path: Path, recorded_store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRAPHDISTILL_RULES", raising=False)
    for name in ("even_inputs", "truncated_answer"):
        rc, _, err = run_cli(
            ["filter", str(recorded_store), "--out", str(tmp_path / "ds"), "--rule", name], capsys
        )
        assert rc == 2 and name in err
        flat = " ".join(err.split())
        assert "graphdistill.rules" in flat and "GRAPHDISTILL_RULES" in flat
        assert "package.module:function" in flat and "path/to/file.py:function" in flat
    assert "built-in check" in flat and "--disable-check truncated_answer" in flat


def test_record_carries_ground_truth_and_the_graph_schema_into_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Human labels on a JSONL row reach the trace (the filter turns them into the dataset's ground_truth
    column), and every trace carries its graph's schema so outputs are found by kind."""
    teacher = tmp_path / "toy_teacher.py"
    teacher.write_text(
        GRAPH_SRC
        + "\n\ndef teacher():\n    from graphdistill.graphs import as_teacher\n\n"
        + "    return as_teacher(build(), name='toy', inputs={'image': 'image', 'question': 'text'},"
        + " outputs={'answer': 'text'})\n"
    )
    graph_spec = f"{teacher}:teacher"
    jsonl = make_jsonl(tmp_path, 2)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows[0]["ground_truth"] = {"answer": "a labelled answer"}
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store_dir = tmp_path / "store"
    rc, _, _ = run_cli(
        ["record", "--graph", graph_spec, "--inputs", str(jsonl), "--store", str(store_dir), "--json"], capsys
    )
    assert rc == 0
    traces = [t for t in TraceStore(store_dir).iter()]
    assert len(traces) == 2
    labelled = [t for t in traces if t.metadata.get("ground_truth")]
    assert [t.metadata["ground_truth"] for t in labelled] == [{"answer": "a labelled answer"}]
    for t in traces:
        outputs = {o["name"]: o["kind"] for o in t.metadata["graph_schema"]["outputs"]}
        assert outputs["answer"] == "text"
