"""``graphdistill ui`` in a real browser: Debian's headless Chromium driven by Playwright (never a browser
Playwright downloads). Each page on a toy store and on traces the real default graph recorded; "Try it" runs
a real exported int8 ONNX student in the page with onnxruntime-web and must give what ``run-bundle`` gives on
the same photos. Screenshots go to ``test-artifacts/ui/`` (or ``$GRAPHDISTILL_TEST_ARTIFACTS/ui``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import (
    EXPORT_WARNINGS,
    TINY_RUN,
    cli,
    isolated_weights_home,
    tiny_train_config,
    toy_store,
    train_tiny_run,
)
from _netguard import subprocess_env

pytest.importorskip("fastapi")
pytest.importorskip("playwright")

ARTIFACTS = (
    Path(os.environ.get("GRAPHDISTILL_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
    / "ui"
)
BOX_TOLERANCE_PX = 0.5
TRY_PHOTOS = ("skimage/astronaut", "skimage/chelsea", "skimage/coffee")  # 512², 300×451, 400×600: resized

pytestmark = [pytest.mark.filterwarnings(w) for w in EXPORT_WARNINGS]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make setup installs Debian's package)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield b
        b.close()


@contextmanager
def served(src: Any) -> Iterator[str]:
    """The app of ``src`` on a free loopback port, in a thread; yields its base URL."""
    from graphdistill.ui.serve import make_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server(src, port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the UI server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def page_of(browser: Any) -> Iterator[tuple[Any, list[str]]]:
    """A fresh page and the errors it logs (console errors, uncaught exceptions, failed requests)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
    try:
        yield page, errors
    finally:
        ctx.close()


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _loaded(page: Any, selector: str) -> None:
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }",
        arg=selector,
        timeout=60_000,
    )


def _click_through_a_trace(page: Any, base: str, name: str, nodes: list[str]) -> dict[str, Any]:
    """Traces -> the first trace -> each node's picture -> the output; returns what the page showed."""
    page.goto(f"{base}/traces")
    page.wait_for_selector("#rows tr")
    _shot(page, f"{name}-traces")
    page.click("#rows tr >> nth=0")
    page.wait_for_selector("#node-output")
    seen: dict[str, Any] = {"url": page.url, "nodes": page.locator(".node b").all_inner_texts()}
    for node in nodes:
        page.click(f"#node-{node}")
        page.wait_for_selector(f"#node-title:has-text('Node {node}')")
        _loaded(page, "#node-picture")
        seen[node] = page.inner_text("#node-writes")
    _shot(page, f"{name}-trace-node")
    page.click("#node-output")
    _loaded(page, "#node-picture")
    seen["answer"] = page.inner_text("#answer")
    seen["sources"] = page.locator("#sources li").all_inner_texts()
    seen["samples"] = page.locator("#samples .card").count()
    _shot(page, f"{name}-trace-output")
    return seen


def test_traces_and_filter_pages_on_a_toy_store(browser: Any, tmp_path: Path) -> None:
    from graphdistill.ui import open_sources

    store, ds = toy_store(tmp_path)
    src = open_sources(store, dataset=ds)
    with served(src) as base, page_of(browser) as (page, errors):
        seen = _click_through_a_trace(page, base, "toy", ["detect", "retrieve"])
        assert seen["nodes"] == ["detect", "retrieve", "answer", "output"]
        assert '"names"' in seen["detect"] and '"cat"' in seen["detect"] and "doc-cat" in seen["retrieve"]
        assert seen["answer"] == "There is a cat."
        assert seen["sources"] == ["doc-cat A cat is a small furry animal."]
        assert seen["samples"] == 3  # the K samples of the input, side by side

        page.goto(f"{base}/traces")
        page.wait_for_selector("#rows tr")
        assert page.inner_text("#count") == "1–24 of 24"
        page.fill("#q", "picture 5?")
        page.wait_for_function("document.querySelector('#count').textContent === '1–3 of 3'")
        assert set(page.locator("#rows tr td:nth-child(7)").all_inner_texts()) == {"What is in picture 5?"}

        page.goto(f"{base}/filter")
        page.wait_for_selector("#rows tr")
        assert (page.inner_text("#n-kept"), page.inner_text("#n-dropped")) == ("6", "2")
        reasons = page.locator("#rows td.reason").all_inner_texts()
        assert reasons == ["the answer names dog but the detector found none"] * 2
        _shot(page, "toy-filter")
        page.click("#rows tr >> nth=0")  # a dropped group -> one of its traces
        page.wait_for_selector("#node-output")
        assert "There is a dog." in page.inner_text("#answer")
        assert errors == []
    src.close()


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(run, its dataset, its int8 ONNX bundle): the tiny student trained for one short epoch, evaluated and
    exported as test_export and test_report do (its float bundle next to it, ``bundle-onnx-none``)."""
    from graphdistill.eval.evaluate import evaluate_run
    from graphdistill.eval.result import write_eval
    from graphdistill.export.bundle import export_run

    run = train_tiny_run(tmp_path_factory.mktemp("ui-student"))
    ds = run.parent / "ds"
    write_eval(run, evaluate_run(run, ds, teacher_timing=False, semantic=False, student_repeats=1))
    bundle = run.parent / "bundle-onnx-int8"
    export_run(run, "onnx", bundle, quantize="int8", n_calibration=2, n_heldout=2)
    export_run(run, "onnx", run.parent / "bundle-onnx-none", n_calibration=2, n_heldout=2)
    return run, ds, bundle


def _photo(tmp_path: Path, pid: str) -> Path:
    from PIL import Image

    from graphdistill.recording.photos import photo

    path = tmp_path / (pid.replace("/", "_") + ".png")
    Image.fromarray(photo(pid).image()).save(path)
    return path


def _run_in_page(page: Any, photo: Path, question: str, n: int) -> dict[str, Any]:
    page.set_input_files("#photo", str(photo))
    page.fill("#question", question)
    page.click("#run")
    page.wait_for_selector(f"body[data-ran='{n}']", state="attached", timeout=300_000)
    _loaded(page, "#picture")
    return dict(page.evaluate("window.graphdistillResult"))


def _same_objects(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    from graphdistill.trace import RLE

    assert [o["label"] for o in got] == [o["label"] for o in want]
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.subtract(g["box"], w["box"])).max() <= BOX_TOLERANCE_PX, (g["box"], w["box"])
        assert g["score"] == pytest.approx(w["score"], abs=1e-3)
        if w["mask"] is not None:
            a, b = RLE(**g["mask"]).decode(), RLE(**w["mask"]).decode()
            assert (a & b).sum() >= 0.99 * max((a | b).sum(), 1)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "none"])
def test_try_it_runs_the_student_in_the_browser_as_run_bundle_does(
    browser: Any, student: tuple[Path, Path, Path], tmp_path: Path, quantize: str
) -> None:
    from graphdistill.dataset import open_dataset
    from graphdistill.runner import BundleRunner
    from graphdistill.ui import open_sources

    run, ds, _ = student
    bundle = run.parent / f"bundle-onnx-{quantize}"
    store, _ = toy_store(tmp_path / "toy", groups=2, k=1)
    dataset = open_dataset(ds)
    photos = [_photo(tmp_path, pid) for pid in TRY_PHOTOS]
    for i, row in enumerate(dataset.rows("test")[:2]):  # held-out photos of the dataset too
        photos.append(tmp_path / f"heldout-{i}.png")
        photos[-1].write_bytes(dataset.image_bytes(row))
    reference = BundleRunner(bundle)
    src = open_sources(store, run=run, dataset=ds, bundle=bundle)
    with served(src) as base, page_of(browser) as (page, errors):
        page.goto(f"{base}/try")
        page.wait_for_selector("body[data-ready='1']", state="attached", timeout=120_000)
        questions = ["What is in the picture?", "How many circles are there?"]
        for n, path in enumerate(photos, start=1):
            question = questions[n % 2]
            got = _run_in_page(page, path, question, n)
            want = reference.predict(path, question)
            assert got["result"]["answer"] == want["answer"], path.name
            assert got["result"]["sources"] == want["sources"], path.name
            _same_objects(got["result"]["objects"], want["objects"])
            # the page shows the query's time as JavaScript's toFixed(0) rounds it (half away from zero,
            # where Python's format rounds half to even): compare the number, not one rounding's digits
            assert got["ms"] > 0 and abs(float(page.inner_text("#ms")) - got["ms"]) <= 0.5
            assert page.text_content("#answer") == want["answer"]
        _shot(page, f"try-it-{quantize}")
        assert errors == []
    src.close()


@pytest.mark.slow
def test_try_it_runs_a_recurrent_depth_bundle_at_the_depth_the_page_picks(
    browser: Any, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A bundle exported with ``--depth 2`` (and test-time views in its manifest): the page answers at the
    bundle's default depth, then at the depth picked, as run-bundle does at each; it says it skips the views."""
    from graphdistill.dataset import make_synthetic_dataset
    from graphdistill.export.bundle import export_run
    from graphdistill.runner import BundleRunner
    from graphdistill.student.train import train
    from graphdistill.ui import open_sources

    root = tmp_path_factory.mktemp("ui-depth")
    make_synthetic_dataset(root / "ds", n=12, seed=0, size=64)
    train(tiny_train_config(root / "ds", root / "run", overrides={**TINY_RUN, "max_depth": 2}))
    bundle = root / "bundle"
    export_run(root / "run", "onnx", bundle, n_calibration=2, n_heldout=2, depth=2, tta="flip")
    reference = BundleRunner(bundle)
    store, _ = toy_store(tmp_path / "toy", groups=2, k=1)
    src = open_sources(store, dataset=root / "ds", bundle=bundle)
    photos = [_photo(tmp_path, pid) for pid in TRY_PHOTOS]
    question = "What is in the picture?"
    want = {r: [reference.predict(p, question, tta=(), depth=r) for p in photos] for r in (1, 2)}
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x, _ = reference.preprocess(rgb, reference.programs.buffers["encode"][0].copy())
    # what the decoder reads at each depth, by the Python runner: deepen moves it (a page ignoring depth fails)
    cross = {r: reference.run_models(x.copy(), question, r).outputs["cross_kv"].ravel() for r in (1, 2)}
    assert np.abs(cross[1] - cross[2]).max() > 1e-3
    with served(src) as base, page_of(browser) as (page, errors):
        page.goto(f"{base}/try")
        page.wait_for_selector("body[data-ready='1']", state="attached", timeout=120_000)
        assert page.input_value("#depth") == "2"  # the bundle's default
        assert page.locator("#depth option").all_inner_texts() == ["1", "2"]
        assert "test-time views (flip)" in page.inner_text("#tta-note")
        for r in (1, 2):  # the page's runner, on the same encoder input, at each depth
            got_kv = page.evaluate(
                "async ([x, q, r]) => Array.from((await runner.runModels(Float32Array.from(x), q, r))"
                ".outputs.cross_kv.data)",
                [x.ravel().tolist(), question, r],
            )
            assert np.abs(np.asarray(got_kv) - cross[r]).max() <= 1e-4, r
        with pytest.raises(Exception, match="depth 3: this bundle takes depths 1..2"):
            page.evaluate(
                "async ([x, q]) => runner.runModels(Float32Array.from(x), q, 3)",
                [x.ravel().tolist(), question],
            )
        n = 0
        for depth in (2, 1):
            page.select_option("#depth", str(depth))
            for path, w in zip(photos, want[depth], strict=True):
                n += 1
                got = _run_in_page(page, path, question, n)
                assert got["depth"] == depth
                assert got["result"]["answer"] == w["answer"], (path.name, depth)
                assert got["result"]["sources"] == w["sources"], path.name
                _same_objects(got["result"]["objects"], w["objects"])
        _shot(page, "try-it-depth")
        assert errors == []
    src.close()


@pytest.mark.slow
def test_fidelity_page_shows_teacher_and_student_sorted_by_disagreement(
    browser: Any, student: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from graphdistill.dataset import open_dataset
    from graphdistill.eval.result import read_eval
    from graphdistill.runner import BundleRunner
    from graphdistill.ui import open_sources

    run, ds, bundle = student
    store, _ = toy_store(tmp_path / "toy", groups=2, k=1)
    rows = read_eval(run)["rows"]
    src = open_sources(store, run=run, dataset=ds, bundle=bundle)
    assert src.eval is not None
    for r in src.eval["rows"]:  # what eval.json says of the PyTorch student must not stand in for the bundle
        r["student_answer"] = "(the PyTorch student's answer)"
    with served(src) as base, page_of(browser) as (page, errors):
        page.goto(f"{base}/fidelity")
        page.wait_for_selector("#rows tr")
        shown = [float(v) for v in page.locator("#rows td.disagreement").all_inner_texts()]
        assert len(shown) == len(rows) and shown == sorted(shown, reverse=True)
        page.click("#sort-answer_f1")
        page.wait_for_selector("#sort-answer_f1:has-text('▼')")
        f1 = [float(v) for v in page.locator("#rows td.answer_f1").all_inner_texts()]
        assert f1 == sorted(f1, reverse=True)
        page.click("#sort-answer_f1")
        page.wait_for_selector("#sort-answer_f1:has-text('▲')")
        assert [float(v) for v in page.locator("#rows td.answer_f1").all_inner_texts()] == sorted(f1)
        first = page.locator("#rows tr >> nth=0")
        question, teacher_in_table, student_in_table = (
            first.locator("td >> nth=0").inner_text(),
            first.locator("td >> nth=1").text_content(),
            first.locator("td >> nth=2").text_content(),
        )
        assert f"student: bundle {bundle}" in page.inner_text("#head")  # its figures, not the PyTorch run's
        first.click()
        _loaded(page, "#pair-picture")
        _shot(page, "fidelity")
        # the teacher's recorded answer; the student's, run now by the bundle the page was started with
        assert page.text_content(".answer-teacher") == teacher_in_table
        row = next(
            r
            for r in open_dataset(ds).rows("test")
            if r.question == question and r.answer == teacher_in_table
        )
        want = BundleRunner(bundle).predict(open_dataset(ds).image(row), question)["answer"]
        # the table's answer and scores are the bundle's too, as the picture is
        assert page.text_content(".answer-student") == want == student_in_table
        assert errors == []
    src.close()


@pytest.mark.slow
def test_pages_on_traces_the_real_default_graph_recorded(browser: Any, tmp_path: Path) -> None:
    from graphdistill.ui import open_sources

    home = isolated_weights_home(tmp_path)
    env = subprocess_env(GRAPHDISTILL_HOME=str(home), COLUMNS="200")
    path = _photo(tmp_path, "skimage/coffee")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"image": str(path), "question": "What is on the table?"}) + "\n")
    cli(["record", "--inputs", str(inputs), "--store", str(tmp_path / "store"), "--samples", "2"], env)
    cli(["filter", str(tmp_path / "store"), "--out", str(tmp_path / "ds")], env)
    src = open_sources(tmp_path / "store", dataset=tmp_path / "ds")
    with served(src) as base, page_of(browser) as (page, errors):
        seen = _click_through_a_trace(page, base, "real", ["detect", "segment", "retrieve", "reason"])
        assert seen["nodes"][:-1] == [s.node for s in src.store.get(seen["url"].split("id=")[1]).spans]
        assert '"names"' in seen["detect"] and '"rles"' in seen["segment"] and '"text"' in seen["retrieve"]
        assert seen["answer"] and seen["samples"] == 2
        assert all(len(s.split(" ", 1)) == 2 for s in seen["sources"])  # each source with its text
        page.goto(f"{base}/filter")
        page.wait_for_selector("#n-kept")
        assert int(page.inner_text("#n-kept")) + int(page.inner_text("#n-dropped")) == 1
        assert errors == []
    src.close()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("GRAPHDISTILL_UI_DEMO_OUT"),
    reason="set GRAPHDISTILL_UI_DEMO_OUT to a demo's output folder",
)
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_try_it_matches_run_bundle_on_every_held_out_photo_of_a_demo(
    browser: Any, tmp_path: Path, quantize: str
) -> None:
    """The issue's done-when on a real demo (opt-in: CI has none): every held-out row of the demo's test split,
    its photo and question through the page's student and through run-bundle's. Objects and sources must
    match on every row, and so must the float bundle's answers. The int8 bundle's answers may part late on a
    few rows: its dynamic int8 kernels (DynamicQuantizeLinear, MatMulInteger) in WebAssembly and in the
    native CPU build round differently by a quantisation step (cross_kv apart by up to 0.02 where the vision
    outputs agree to 1e-7), which flips a near-tie; on the demo measured here 22 of 24 answers were equal, the
    other two equal for their first 31 and 32 tokens."""
    from graphdistill.runner import BundleRunner
    from graphdistill.ui import open_sources

    root = Path(os.environ["GRAPHDISTILL_UI_DEMO_OUT"])
    src = open_sources(root, bundle=root / "bundles" / f"onnx-{quantize}")
    assert src.dataset is not None and src.bundle is not None
    reference = BundleRunner(src.bundle)
    rows = src.dataset.rows("test")
    equal = 0
    with served(src) as base, page_of(browser) as (page, errors):
        page.goto(f"{base}/try")
        page.wait_for_selector("body[data-ready='1']", state="attached", timeout=120_000)
        for n, row in enumerate(rows, start=1):
            path = tmp_path / f"{row.id}.png"
            path.write_bytes(src.dataset.image_bytes(row))
            got = _run_in_page(page, path, row.question, n)
            want = reference.predict(path, row.question)
            equal += got["result"]["answer"] == want["answer"]
            assert got["result"]["sources"] == want["sources"], row.question
            _same_objects(got["result"]["objects"], want["objects"])
        assert errors == []
    src.close()
    assert equal == len(rows) if quantize == "none" else equal >= 0.9 * len(rows), (equal, len(rows))
