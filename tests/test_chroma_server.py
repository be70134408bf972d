"""The knowledge base on a real Chroma server (`chroma run` on loopback) against the same KB in a folder.

One server per module (started by the installed chromadb's ``chroma`` command, stopped at the end whatever
happened): the KB is built on it through the library function `kb build` calls and once through the CLI,
the teacher graph's retrieval and a recording of the real reference graph are run against it, and every
answer is compared with the embedded folder's: the same ids, documents and sources, in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

START_TIMEOUT_S = 60.0
QUERIES = [
    "What is in this picture? cat",
    "Is it safe to touch? dog",
    "What is it used for? laptop keyboard mouse",
    "How heavy is it? elephant",
    "What is in this picture? pizza cup dining table",
]


def _chroma_command() -> str:
    found = Path(sys.executable).with_name("chroma")  # the chromadb installed next to this Python
    if found.is_file():
        return str(found)
    which = shutil.which("chroma")
    if which is None:
        pytest.fail("no `chroma` command: chromadb is not installed (pip install 'graphdistill[kb]')")
    return which


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def _heartbeat(url: str) -> bool:
    try:
        with _DIRECT.open(f"{url}/api/v2/heartbeat", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Chroma server on 127.0.0.1 and a free port, its data in a temporary folder; yields its url."""
    root = tmp_path_factory.mktemp("chroma-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                _chroma_command(),
                "run",
                "--path",
                str(root / "db"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        started = time.monotonic()
        while not _heartbeat(url):
            waited = time.monotonic() - started
            if proc.poll() is not None or waited > START_TIMEOUT_S:
                why = f"exited with code {proc.returncode}" if proc.poll() is not None else "no heartbeat"
                pytest.fail(
                    f"the Chroma server at {url} did not start ({why} after {waited:.0f}s); "
                    f"its output (stdout and stderr):\n{log.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(0.2)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def embedder() -> Any:
    import _models

    return _models.text_embedder()


@pytest.fixture(scope="module")
def folder_kb() -> Any:
    """The default KB in an embedded Chroma folder: the one the real-model tests share, built by the same
    library function (``ChromaRetriever.ingest`` of the default documents)."""
    import _models

    return _models.retriever()


@pytest.fixture(scope="module")
def server_kb(chroma_server: str, embedder: Any) -> Any:
    """The default KB on the server, built by the function `graphdistill kb build` calls."""
    from graphdistill.teachers.knowledge import default_documents, ingest_documents
    from graphdistill.teachers.retriever import ChromaRetriever

    r = ChromaRetriever(url=chroma_server, text_embedder=embedder)
    counts = ingest_documents(r, default_documents())
    assert counts["ingested"] == counts["rows"] == counts["total_documents"] > 0
    again = ingest_documents(ChromaRetriever(url=chroma_server, text_embedder=embedder), default_documents())
    assert again["ingested"] == 0 and again["skipped_already_present"] == counts["rows"]  # resumable
    return r


def _contents(retriever: Any) -> list[tuple[str, str, dict[str, Any]]]:
    return [(d.id, d.text, d.metadata) for d in retriever.get(retriever.doc_ids())]


def test_server_and_folder_hold_the_same_knowledge_base(server_kb: Any, folder_kb: Any) -> None:
    from graphdistill.teachers.knowledge import default_documents

    docs = default_documents()
    assert server_kb.doc_ids() == folder_kb.doc_ids() == sorted(d.id for d in docs)
    assert _contents(server_kb) == _contents(folder_kb)
    assert server_kb.student_offer()["knowledge_base"] == {"url": server_kb.url, "collection": "coco_facts"}


def test_retrieval_on_the_server_equals_the_folder(server_kb: Any, folder_kb: Any) -> None:
    """The graph's retrieve node asks one query at a time: same sources, same order, same distances."""
    from graphdistill.graphs.visual_rag import retrieval_query
    from graphdistill.trace import Detections

    dets = Detections(xyxy=[[0, 0, 10, 10]], class_ids=[15], names=["cat"], scores=[0.9], image_size=[20, 20])
    queries = [*QUERIES, retrieval_query("Tell me about it.", dets)]
    for q in queries:
        remote, local = server_kb.query(text=q, k=5), folder_kb.query(text=q, k=5)
        assert [d.id for d in remote] == [d.id for d in local], q
        assert [d.text for d in remote] == [d.text for d in local], q
        assert [d.distance for d in remote] == pytest.approx([d.distance for d in local], abs=1e-5), q
    batched = server_kb.query_batch(queries)
    assert [[d.id for d in ds] for ds in batched] == [
        [d.id for d in ds] for ds in folder_kb.query_batch(queries)
    ]


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process (its models already loaded)."""
    from graphdistill.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_kb_build_and_query_cli_on_the_server(
    chroma_server: str, folder_kb: Any, embedder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`graphdistill kb build --url` builds a collection of its own that `kb query --url` reads back."""
    from graphdistill.teachers.retriever import ChromaRetriever

    rc, out, err = _main(capsys, "kb", "build", "--url", chroma_server, "--collection", "cli_facts", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["location"] == chroma_server and result["collection"] == "cli_facts"
    assert result["ingested"] == result["total_documents"] == len(folder_kb.doc_ids())
    cli_kb = ChromaRetriever(url=chroma_server, collection="cli_facts", text_embedder=embedder)
    assert _contents(cli_kb) == _contents(folder_kb)

    q = QUERIES[0]
    rc, out, err = _main(
        capsys, "kb", "query", q, "--url", chroma_server, "--collection", "cli_facts", "--json"
    )
    assert rc == 0, err
    assert [d["id"] for d in json.loads(out)] == [d.id for d in folder_kb.query(text=q)]


def test_an_unreachable_or_bad_url_is_one_error_line(
    chroma_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cases = [
        (["kb", "build", "--url", dead], "cannot reach the Chroma server at " + dead),
        (["kb", "query", "cat", "--url", dead], "cannot reach the Chroma server at " + dead),
        (["kb", "query", "cat", "--url", f"{chroma_server}/chroma"], "without a path or query"),
    ]
    for args, message in cases:
        rc, _, err = _main(capsys, *args)
        assert rc == 2, (args, err)
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


class _Unused:
    """Stands in for the detector, SAM and the LLM, which load before the retriever and are never called
    when the knowledge base cannot be opened."""

    def __init__(self, **kwargs: Any) -> None:
        self.names: list[str] = []


def test_run_and_record_name_a_dead_kb_url_in_one_line(
    chroma_server: str,
    embedder: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import graphdistill.teachers.detector as detector
    import graphdistill.teachers.llm as llm
    import graphdistill.teachers.segmenter as segmenter
    import graphdistill.teachers.text_embedder as text_embedder

    for module, name in [(detector, "YoloDetector"), (segmenter, "SamSegmenter"), (llm, "HFCausalLM")]:
        monkeypatch.setattr(module, name, _Unused)
    monkeypatch.setattr(text_embedder, "SentenceEmbedder", lambda **kwargs: embedder)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 24)).save(photos / "a.png")
    dead = f"http://127.0.0.1:{_free_port()}"
    run = ["run", "--image", str(photos / "a.png"), "--question", "What is it?"]
    record = ["record", "--inputs", str(photos), "--store", str(tmp_path / "store")]
    for args, url, message in [
        (run, dead, "cannot reach the Chroma server at " + dead),
        (record, dead, "cannot reach the Chroma server at " + dead),
        (run, f"{chroma_server}/chroma", "without a path or query"),
        (record, f"{chroma_server}/chroma", "without a path or query"),
    ]:
        rc, out, err = _main(capsys, *args, "--kb-url", url)
        assert rc == 2 and out == "", (args, err)
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    for args in (run, record):  # a user's graph brings its own knowledge base
        rc, _, err = _main(capsys, *args, "--graph", "m:g", "--kb-url", chroma_server)
        assert rc == 2 and "--kb-url" in err and "brings its own" in err, err


@pytest.mark.slow
def test_recording_the_reference_graph_against_the_server_gives_the_folders_sources(
    chroma_server: str, server_kb: Any, folder_kb: Any, tmp_path: Path
) -> None:
    """The real visual_rag graph, its retriever opened from ``VisualRagConfig(kb_url=...)``, recorded on two
    photos (greedy): the traces' sources, retrieved documents and answers equal a recording against the
    embedded folder, and the server's traces name it as their knowledge base."""
    import _models
    from graphdistill import record
    from graphdistill.graphs.visual_rag import VisualRagConfig, visual_rag
    from graphdistill.store.trace_store import TraceStore
    from graphdistill.teachers.retriever import read_knowledge_base

    models = {"detector": _models.detector(), "segmenter": _models.segmenter(), "llm": _models.llm()}
    inputs = [
        {"image": _models.builtin_image(p), "question": "What is in this picture?"}
        for p in ("skimage/chelsea", "skimage/coffee")
    ]
    recorded: dict[str, list[Any]] = {}
    for where, config, teachers in [
        ("server", VisualRagConfig(kb_url=chroma_server), models),  # the graph opens the server itself
        ("folder", VisualRagConfig(), {**models, "retriever": folder_kb}),
    ]:
        store = TraceStore(tmp_path / where)
        graph = record(visual_rag(config, teachers=teachers), store)
        for x in inputs:
            graph.invoke(x)
        recorded[where] = sorted(store.iter(), key=lambda t: t.input_hash)
        store.close()

    server, folder = recorded["server"], recorded["folder"]
    assert len(server) == len(folder) == len(inputs)
    for s, f in zip(server, folder, strict=True):
        assert s.status == f.status == "ok", (s.error, f.error)
        assert s.input_hash == f.input_hash
        assert s.output["sources"] and s.output["sources"] == f.output["sources"]
        assert s.output["answer"] == f.output["answer"]  # same facts in the prompt, greedy: same answer
        (retrieve,) = [span for span in s.spans if span.node == "retrieve"]
        assert retrieve.model_id == f"{_models.text_embedder().model_id} + chroma:coco_facts"
    # what the filter reads the student's candidate documents from: the server's whole collection
    offer = server[0].metadata["graph_schema"]["offers"]["retrieve"]
    assert offer["knowledge_base"] == {"url": chroma_server, "collection": "coco_facts"}
    assert [d.id for d in read_knowledge_base(offer)] == folder_kb.doc_ids()
