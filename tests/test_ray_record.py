"""Recording on Ray (`record_inputs(engine="ray")`, `graphdistill record --engine ray`) on a local 2-CPU cluster.

A toy graph (no models) recorded through the actor pool gives the same store as the local path; an actor
killed in the middle of a batch loses nothing and every input is recorded exactly once; resume runs only
what the store lacks; the command runs end to end and refuses bad flags in one line. Every cluster started
here is shut down (the module fixture, and the command's own ``finally``).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _netguard import subprocess_env
from graphdistill.cli import main
from graphdistill.recording.batch import record_inputs
from graphdistill.recording.ray_engine import connect
from graphdistill.store.trace_store import TraceStore
from test_record_cli import make_jsonl

# the toy graph of test_record_cli plus two test hooks baked into the file (Ray workers do not see the
# test's environment): every run appends its question to RUN_LOG, and the first run that is asked
# KILL_QUESTION kills its process (its actor) in the middle of the batch, leaving MARKER behind
GRAPH_SRC = textwrap.dedent(
    """
    import os
    from typing import Any, TypedDict

    from langchain_core.runnables import RunnableConfig
    from langgraph.graph import END, START, StateGraph

    RUN_LOG = {run_log!r}
    KILL_QUESTION = {kill_question!r}
    MARKER = {marker!r}


    class State(TypedDict, total=False):
        image: Any
        question: str
        mask: Any
        answer: str


    def seg(state: State, config: RunnableConfig) -> dict:
        conf = config.get("configurable", {{}})
        with open(RUN_LOG, "a") as fh:
            fh.write(f"{{state['question']}}|{{conf.get('gd_sample_index')}}\\n")
        if state["question"] == KILL_QUESTION and not os.path.exists(MARKER):
            open(MARKER, "w").close()
            os._exit(1)
        return {{"mask": state["image"][..., 0] > 100}}


    def answer(state: State, config: RunnableConfig) -> dict:
        conf = config.get("configurable", {{}})
        shape = "x".join(map(str, state["image"].shape[:2]))
        return {{"answer": f"{{state['question']}} {{shape}} s{{conf.get('gd_sample_index')}} seed{{conf.get('gd_seed')}}"}}


    def build():
        g = StateGraph(State)
        g.add_node("seg", seg, metadata={{"graphdistill_model_id": "toy-seg"}})
        g.add_node("answer", answer)
        g.add_edge(START, "seg")
        g.add_edge("seg", "answer")
        g.add_edge("answer", END)
        return g.compile()
    """
)


def toy_graph(tmp_path: Path, kill_question: str = "") -> str:
    path = tmp_path / "ray_toy_graph.py"
    path.write_text(
        GRAPH_SRC.format(
            run_log=str(tmp_path / "runs.log"), kill_question=kill_question, marker=str(tmp_path / "killed")
        )
    )
    return f"{path}:build"


def runs(tmp_path: Path) -> list[str]:
    log = tmp_path / "runs.log"
    return log.read_text().splitlines() if log.exists() else []


def store_view(root: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(input hash, sample) -> what a trace says about it, for comparing two stores."""
    with TraceStore(root, readonly=True) as store:
        return {
            (t.input_hash, t.sample_index): {
                "group": t.group_id,
                "status": t.status,
                "output": t.output,
                "inputs": t.inputs,
                "metadata": {k: v for k, v in t.metadata.items() if k != "source"},
                "provenance": t.provenance.model_dump(),
            }
            for t in store.iter()
        }


# --- the command, first: it starts (and must stop) its own cluster, before the module's one is up --------


def test_cli_records_on_ray_end_to_end_with_progress_on_stderr(tmp_path: Path) -> None:
    jsonl = make_jsonl(tmp_path, 3)
    store = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "graphdistill.cli", "record", "--engine", "ray", "--actors", "1",
         "--graph", toy_graph(tmp_path), "--inputs", str(jsonl), "--store", str(store),
         "--samples", "2", "--batch-size", "2"],
        capture_output=True, text=True, timeout=240, env=subprocess_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recording" in proc.stderr and "6/6" in proc.stderr  # the progress bar, at its end
    assert "recorded 6, failed 0, skipped 0" in proc.stdout + proc.stderr
    with TraceStore(store, readonly=True) as s:
        assert s.count(status="ok") == 6 and len(s.groups()) == 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--engine", "ray", "--actors", "0"], "--actors must be >= 1, got 0"),
        (["--engine", "ray", "--gpus-per-actor", "-1"], "--gpus-per-actor must be >= 0"),
        (["--actors", "2"], "--actors needs --engine ray"),
        (["--engine", "ray", "--address", "127.0.0.1:{port}"], "ray address 127.0.0.1:{port}: unreachable"),
        (["--engine", "ray", "--address", "nowhere"], "expected HOST:PORT"),
    ],
)
def test_cli_refuses_bad_ray_flags_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    jsonl = make_jsonl(tmp_path, 1)
    port = str(_closed_port())
    flags = [f.replace("{port}", port) for f in flags]
    rc = main(["record", "--inputs", str(jsonl), "--store", str(tmp_path / "s"), *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert message.replace("{port}", port) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s" / "traces.sqlite").exists()


def test_without_ray_the_command_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    jsonl = make_jsonl(tmp_path, 1)
    rc = main(["record", "--engine", "ray", "--inputs", str(jsonl), "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'graphdistill[ray]'" in err and len(err.strip().splitlines()) == 1


# --- the library, on one local cluster for the module ------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """The ray module, initialised on a local 2-CPU cluster: loopback only, no dashboard, no usage report,
    workers import this tree (``connect`` imports ray: imported earlier, Ray would bind every interface)."""
    connect(num_cpus=2)
    import ray

    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_path_records_what_the_local_path_records(tmp_path: Path, cluster: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = toy_graph(tmp_path)
    jsonl = make_jsonl(tmp_path, 4)
    table = tmp_path / "data" / "inputs.parquet"  # the same rows as a Parquet table
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in jsonl.read_text().splitlines()]), table)
    kw: dict[str, Any] = {"graph": spec, "samples": 3, "tta": ["flip"]}
    local = record_inputs(jsonl, tmp_path / "local", batch_size=2, **kw)
    on_ray = record_inputs(table, tmp_path / "ray", engine="ray", actors=2, batch_size=2, **kw)
    assert (local["recorded"], local["failed"]) == (on_ray["recorded"], on_ray["failed"]) == (12, 0)
    want, got = store_view(tmp_path / "local"), store_view(tmp_path / "ray")
    assert len(got) == 12 and got == want  # same groups, input hashes, TTA records and final outputs
    assert len({v["group"] for v in got.values()}) == 4
    with TraceStore(tmp_path / "ray", readonly=True) as s:
        assert s.check()["ok"]
    where = cluster.get(cluster.remote(lambda: __import__("graphdistill").__file__).remote())
    assert Path(where).resolve() == Path(__import__("graphdistill").__file__).resolve()  # this tree's


@pytest.mark.usefixtures("cluster")
def test_an_actor_killed_mid_batch_loses_nothing_and_each_input_is_recorded_once(tmp_path: Path) -> None:
    spec = toy_graph(tmp_path, kill_question="what 1?")
    jsonl = make_jsonl(tmp_path, 5)  # batches of 4 runs: "what 1?" is in the middle of the first
    seen: list[int] = []
    summary = record_inputs(
        jsonl, tmp_path / "store", engine="ray", graph=spec, samples=2, actors=2, batch_size=4,
        progress=lambda n, totals: seen.append(n),
    )  # fmt: skip
    assert (tmp_path / "killed").exists()  # an actor did die in the middle of its batch
    assert (summary["recorded"], summary["failed"]) == (10, 0) and sum(seen) == 10
    with TraceStore(tmp_path / "store", readonly=True) as s:
        traces = list(s.iter())
    keys = [(t.input_hash, t.sample_index) for t in traces]
    assert len(keys) == 10 and len(set(keys)) == 10
    assert sorted(t.inputs["question"] for t in traces) == sorted(
        f"what {i}?" for i in range(5) for _ in "ab"
    )
    # the killed run, then both samples again on the new actor. A batch runs on threads, so the other sample
    # of "what 1?" may have started too before the process died (seen in a full CI run): 3 or 4 runs
    assert sum(r.startswith("what 1?|") for r in runs(tmp_path)) in (3, 4), runs(tmp_path)


@pytest.mark.usefixtures("cluster")
def test_resume_across_ray_runs_records_only_what_the_store_lacks(tmp_path: Path) -> None:
    spec = toy_graph(tmp_path)
    jsonl = make_jsonl(tmp_path, 3)
    store = tmp_path / "store"
    first = record_inputs(
        jsonl, store, engine="ray", graph=spec, samples=2, actors=2, batch_size=2, resume=True
    )
    assert (first["recorded"], first["skipped"]) == (6, 0) and len(runs(tmp_path)) == 6
    again = record_inputs(
        jsonl, store, engine="ray", graph=spec, samples=2, actors=2, batch_size=2, resume=True
    )
    assert (again["recorded"], again["skipped"]) == (0, 6) and len(runs(tmp_path)) == 6  # nothing ran
    more = make_jsonl(tmp_path, 5)  # the same 3 rows and 2 new ones
    grown = record_inputs(
        more, store, engine="ray", graph=spec, samples=2, actors=2, batch_size=2, resume=True
    )
    assert (grown["recorded"], grown["skipped"]) == (4, 6)
    assert sorted(runs(tmp_path)[6:]) == sorted(f"what {i}?|{k}" for i in (3, 4) for k in (0, 1))
    with TraceStore(store, readonly=True) as s:
        assert s.count() == 10 and len(s.groups()) == 5


def test_cli_joins_a_running_cluster_by_its_address(tmp_path: Path, cluster: Any) -> None:
    address = cluster.get_runtime_context().gcs_address  # what `ray start --head` prints, here 127.0.0.1:PORT
    assert address.startswith("127.0.0.1:")  # the module's cluster listens on the loopback only
    jsonl = make_jsonl(tmp_path, 2)
    proc = subprocess.run(
        [sys.executable, "-m", "graphdistill.cli", "record", "--engine", "ray", "--address", address,
         "--actors", "1", "--graph", toy_graph(tmp_path), "--inputs", str(jsonl),
         "--store", str(tmp_path / "store"), "--json"],
        capture_output=True, text=True, timeout=240, env=subprocess_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["recorded"] == 2
    assert cluster.is_initialized() and cluster.cluster_resources()["CPU"] == 2  # the command left it running


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize(("kw", "message"), [
    ({"actors": 3}, "--actors 3 × cpus per actor 1 needs 3 CPUs; the cluster has 2"),
    ({"gpus_per_actor": 1000}, "--actors 1 × --gpus-per-actor 1000 needs 1000 GPUs; the cluster has "),
])  # fmt: skip
def test_a_pool_the_cluster_cannot_hold_is_refused_not_waited_for(
    tmp_path: Path, kw: dict[str, Any], message: str
) -> None:
    from graphdistill.recording.ray_engine import ClusterError

    with pytest.raises(ClusterError, match=re.escape(message)):
        record_inputs(make_jsonl(tmp_path, 1), tmp_path / "s", engine="ray", graph=toy_graph(tmp_path), **kw)


@pytest.mark.usefixtures("cluster")
def test_a_graph_that_does_not_load_on_the_actors_is_one_error(tmp_path: Path) -> None:
    from graphdistill.recording.ray_engine import ClusterError

    bad = tmp_path / "bad_graph.py"
    bad.write_text("def build():\n    raise RuntimeError('no such model here')\n")
    with pytest.raises(ClusterError, match="cannot load it.*no such model here"):
        record_inputs(make_jsonl(tmp_path, 2), tmp_path / "s", engine="ray", graph=f"{bad}:build")


# --- the real default graph (models load in the actor): slow -----------------------------------------------


@pytest.mark.slow
def test_cli_records_the_real_default_graph_on_ray(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("ultralytics")
    from PIL import Image

    from _fixtures import isolated_weights_home
    from graphdistill.recording.photos import photo

    home = isolated_weights_home(tmp_path)
    image = tmp_path / "chelsea.png"
    Image.fromarray(photo("skimage/chelsea").image()).save(image)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"image": str(image), "provenance": {"photos": ["skimage/chelsea"]}}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "graphdistill.cli", "record", "--engine", "ray", "--actors", "1",
         "--inputs", str(inputs), "--store", str(tmp_path / "store"), "--samples", "2", "--json"],
        capture_output=True, text=True, timeout=600, env=subprocess_env(GRAPHDISTILL_HOME=str(home)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert (summary["recorded"], summary["failed"], summary["skipped"]) == (2, 0, 0)
    with TraceStore(tmp_path / "store", readonly=True) as s:
        traces = list(s.iter())
        assert s.check()["ok"]
    assert {t.graph.name for t in traces} == {"visual_rag"} and len({t.group_id for t in traces}) == 1
    assert sorted(t.sample_index for t in traces) == [0, 1]
    for t in traces:
        assert {"detect", "reason"} <= {sp.node for sp in t.spans}
        assert t.provenance.photos == ["skimage/chelsea"] and t.output
