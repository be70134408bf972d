"""``graphdistill ui`` without a browser: the JSON API and pictures over a toy store (FastAPI's test client),
the inputs it refuses, the host it binds, that it never writes to the store, and the in-browser runner's pure
functions (runner.js, run by Node) against the Python reference runner on the same inputs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import H, W, noise, toy_store

pytest.importorskip("fastapi")

RUNNER_JS = Path(__file__).parent.parent / "src" / "graphdistill" / "ui" / "static" / "runner.js"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return toy_store(tmp_path_factory.mktemp("ui"))


@pytest.fixture
def client(toy: tuple[Path, Path]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from graphdistill.ui import open_sources
    from graphdistill.ui.app import create_app

    store, ds = toy
    src = open_sources(store, dataset=ds)
    with TestClient(create_app(src)) as c:
        yield c
    src.close()


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_traces_page_from_sqlite_with_search_and_status(client: Any) -> None:
    first = client.get("/api/traces", params={"limit": 5}).json()
    assert first["total"] == 24 and len(first["rows"]) == 5
    second = client.get("/api/traces", params={"limit": 5, "offset": 5}).json()
    assert {r["id"] for r in first["rows"]}.isdisjoint(r["id"] for r in second["rows"])
    last = client.get("/api/traces", params={"limit": 5, "offset": 20}).json()
    assert len(last["rows"]) == 4
    row = first["rows"][0]
    assert set(row) >= {"id", "graph_name", "status", "duration_s", "group_id", "sample_index", "question"}
    # search: by question, by group, by a prefix of the id; % and _ are literal characters
    hits = client.get("/api/traces", params={"q": "picture 3?"}).json()
    assert hits["total"] == 3 and {r["group_id"] for r in hits["rows"]} == {"group-03"}
    assert client.get("/api/traces", params={"q": "group-07"}).json()["total"] == 3
    assert client.get("/api/traces", params={"q": row["id"][:10]}).json()["rows"][0]["id"] == row["id"]
    assert client.get("/api/traces", params={"q": "%"}).json()["total"] == 0
    assert client.get("/api/traces", params={"status": "error"}).json()["total"] == 0


def test_listing_reads_one_page_with_limit_and_offset(toy: tuple[Path, Path]) -> None:
    from graphdistill.ui.sources import open_store

    store = open_store(toy[0])
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    total, rows = store.listing(offset=6, limit=3)
    store.close()
    assert total == 24 and len(rows) == 3
    select = [s for s in statements if "FROM traces" in s and "COUNT" not in s]
    assert len(select) == 1 and "LIMIT 3 OFFSET 6" in select[0]


def test_one_trace_as_its_graph_with_nodes_sources_and_samples(client: Any) -> None:
    tid = client.get("/api/traces", params={"q": "group-01"}).json()["rows"][0]["id"]
    t = client.get(f"/api/traces/{tid}").json()
    assert [s["node"] for s in t["spans"]] == ["detect", "retrieve", "answer"]
    assert [s["ms"] for s in t["spans"]] == pytest.approx([1000.0, 1000.0, 1000.0])
    assert [s["start_ms"] for s in t["spans"]] == pytest.approx([0.0, 1000.0, 2000.0])
    assert t["spans"][0]["writes"]["detections"]["names"] == ["cat"]
    assert t["sources"] == [{"id": "doc-cat", "text": "A cat is a small furry animal."}]
    assert t["output"]["answer"] == "There is a cat."
    assert t["output"]["objects"][0]["mask"]["mask"].startswith(f"{H}×{W} RLE")  # masks shown by size
    assert [s["sample_index"] for s in t["samples"]] == [0, 1, 2]
    assert tid in {s["id"] for s in t["samples"]}
    image = t["inputs"]["image"]
    assert image["shape"] == [H, W, 3]
    assert np.array_equal(_png(client.get(image["url"]).content), noise(1))  # served from the blobs


def test_pictures_draw_each_nodes_output_on_the_input_image(client: Any) -> None:
    tid = client.get("/api/traces", params={"q": "group-01"}).json()["rows"][0]["id"]
    final = client.get(f"/api/traces/{tid}/picture.png")
    assert final.status_code == 200 and final.headers["content-type"] == "image/png"
    pic = _png(final.content)
    assert pic.shape[1] == W and pic.shape[0] > H  # the answer is written under the image
    assert not np.array_equal(pic[:H], noise(1))  # the box and mask are drawn on it
    detect = _png(client.get(f"/api/traces/{tid}/picture.png", params={"node": "detect"}).content)
    assert not np.array_equal(detect[:H], noise(1)) and not np.array_equal(detect[:H], pic[:H])  # no mask
    missing = client.get(f"/api/traces/{tid}/picture.png", params={"node": "nope"})
    assert missing.status_code == 404 and "no node 'nope'" in missing.json()["error"]
    unknown = client.get("/api/traces/not-a-trace")
    assert unknown.status_code == 404 and "no trace with id 'not-a-trace'" in unknown.json()["error"]
    assert client.get("/api/blobs/" + "0" * 64).status_code == 404


def test_filter_page_shows_kept_and_dropped_by_rule_with_reasons(client: Any) -> None:
    everything = client.get("/api/filter", params={"limit": 100}).json()
    assert everything["recorded"] and everything["kept"] == 6 and everything["dropped"] == 2
    assert everything["summary"]["by_rule"] == {"answer_class_not_detected": 2}
    dropped = client.get("/api/filter", params={"kept": "false"}).json()["rows"]
    assert [d["group_id"] for d in dropped] == ["group-02", "group-05"]
    assert all(d["rule"] == "answer_class_not_detected" and "dog" in d["reason"] for d in dropped)
    for d in dropped:  # each links to one of its traces
        assert client.get(f"/api/traces/{d['trace']}").json()["group_id"] == d["group_id"]
    kept = client.get("/api/filter", params={"kept": "true"}).json()["rows"]
    assert len(kept) == 6 and all(d["split"] in ("train", "test") and d["reason"] is None for d in kept)
    by_rule = client.get("/api/filter", params={"rule": "answer_class_not_detected"}).json()
    assert by_rule["total"] == 2


def test_filter_page_of_a_dataset_filtered_before_decisions_were_recorded(
    toy: tuple[Path, Path], tmp_path: Path
) -> None:
    from graphdistill.ui import open_sources
    from graphdistill.ui.views import NOT_RECORDED, filter_view

    ds = tmp_path / "ds"
    shutil.copytree(toy[1], ds)
    (ds / "report" / "decisions.jsonl").unlink()
    src = open_sources(toy[0], dataset=ds)
    view = filter_view(src, limit=100)
    src.close()
    assert not view["recorded"] and view["kept"] == 6 and view["dropped"] == 2
    assert [d["reason"] for d in view["rows"] if not d["kept"]] == [NOT_RECORDED] * 2


def test_the_ui_never_writes_to_the_store(toy: tuple[Path, Path], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from graphdistill.ui import open_sources
    from graphdistill.ui.app import create_app

    store = tmp_path / "store"
    shutil.copytree(toy[0], store)

    def digest() -> dict[str, str]:
        return {
            str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*"))
            if p.is_file() and not p.name.endswith("-shm")  # SQLite's shared-memory index of readers
        }

    before = digest()
    src = open_sources(store, dataset=toy[1])
    with TestClient(create_app(src)) as c:
        for row in c.get("/api/traces", params={"limit": 200}).json()["rows"]:
            assert c.get(f"/api/traces/{row['id']}").status_code == 200
            assert c.get(f"/api/traces/{row['id']}/picture.png").status_code == 200
        assert c.get("/api/filter").status_code == 200
    after = digest()
    assert after == before
    with pytest.raises(sqlite3.OperationalError, match="readonly database"):  # SQLite itself refuses
        src.store._db.execute("DELETE FROM traces")
    src.close()


def test_bad_inputs_are_refused_naming_them(toy: tuple[Path, Path], tmp_path: Path) -> None:
    from graphdistill.cli import main
    from graphdistill.ui import UIError, open_sources

    with pytest.raises(UIError, match=r"trace store .*nowhere: no such folder"):
        open_sources(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UIError, match=r"empty: no traces.sqlite there \(not a trace store"):
        open_sources(tmp_path / "empty")
    with pytest.raises(UIError, match=r"dataset .*nods: no such folder"):
        open_sources(toy[0], dataset=tmp_path / "nods")
    with pytest.raises(UIError, match=r"bundle .*nobundle.*no manifest.json"):
        open_sources(toy[0], bundle=tmp_path / "nobundle")
    with pytest.raises(UIError, match=r"run .*norun: no such folder"):
        open_sources(toy[0], run=tmp_path / "norun")
    assert main(["ui", str(tmp_path / "empty")]) == 2


def test_ui_without_a_store_opens_the_demos_folder(
    toy: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``graphdistill ui`` alone means ./demo-out, what ``make demo`` writes; where there is none the error
    names it."""
    from graphdistill.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["ui"]) == 2
    assert "demo-out: no such folder" in capsys.readouterr().err


def test_an_executorch_bundle_is_refused(tmp_path: Path) -> None:
    from graphdistill.runner.bundle import BUNDLE_FORMAT, manifest_checksum
    from graphdistill.runner.manifest import Manifest
    from graphdistill.ui.sources import UIError, open_bundle

    manifest: dict[str, Any] = {k: None for k in Manifest.__required_keys__}
    manifest.update(format=BUNDLE_FORMAT, runtime="executorch", files={})
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UIError, match="its runtime is 'executorch'; the browser runs ONNX bundles only"):
        open_bundle(tmp_path)


def test_binds_loopback_unless_another_host_is_explicitly_allowed() -> None:
    from graphdistill.cli import main
    from graphdistill.ui.serve import check_host

    assert check_host("127.0.0.1", False) is None and check_host("localhost", False) is None
    assert check_host("::1", False) is None
    with pytest.raises(Exception, match="needs --allow-remote"):
        check_host("0.0.0.0", False)
    warning = check_host("0.0.0.0", True)
    assert warning is not None and "anyone who can reach" in warning
    assert main(["ui", "nowhere", "--host", "0.0.0.0"]) == 2  # refused before anything is opened


def test_draw_endpoint_draws_any_output_with_the_shared_drawing(client: Any) -> None:
    from PIL import Image

    from graphdistill import viz

    buf = io.BytesIO()
    Image.fromarray(noise(3)).save(buf, format="PNG")
    output = {
        "answer": "a cat",
        "objects": [{"label": "cat", "score": 0.5, "box": [2, 2, 20, 20], "mask": None}],
    }
    r = client.post("/api/draw", json={"image": base64.b64encode(buf.getvalue()).decode(), "output": output})
    assert r.status_code == 200
    assert np.array_equal(_png(r.content), np.asarray(viz.draw_output(noise(3), output)))
    bad = client.post("/api/draw", json={"image": base64.b64encode(b"not a picture").decode()})
    assert bad.status_code == 404 and "the uploaded photo" in bad.json()["error"]


# --------------------------------------------------------------------------------------------------------
# runner.js (Node) against graphdistill.runner (Python)
# --------------------------------------------------------------------------------------------------------

_HARNESS = """
const R = require(process.argv[1]);
const req = JSON.parse(require("fs").readFileSync(0, "utf8"));
const t = new R.ByteLevelBPE(req.tokenizer);
const out = {
  images: req.images.map((im) => {
    const img = { width: im.w, height: im.h, data: Uint8Array.from(Buffer.from(im.b64, "base64")) };
    return Buffer.from(new Uint8Array(R.preprocess(img, req.spec).x.buffer)).toString("base64");
  }),
  encoded: req.texts.map((s) => t.encode(s)),
  decoded: req.ids.map((ids) => t.decode(ids)),
  masks: req.masks.map((m) => R.objectMaskRle(Float32Array.from(m.logits), m.ms,
    { scale: 0, padLeft: 0, padTop: 0, height: m.h, width: m.w }, m.box)),
  sources: R.topSources([0.5, 2, 2, -1, 3], 3, ["a", "b", "c", "d", "e"]),
  greedy: [R.greedyToken([0, 9, 5, 1], [1, 2, 1, 2], 3, 0), R.greedyToken([0, 9, 5, 1], [1, 1], 0, 2)],
};
process.stdout.write(JSON.stringify(out));
"""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed (make setup installs it with npm)")
        pytest.skip("node is not installed")
    return node


def test_runner_js_equals_the_python_runner_on_preprocessing_tokens_masks_and_decoding() -> None:
    from graphdistill.runner.bpe import ByteLevelBPE
    from graphdistill.runner.bundle import greedy_token, top_sources
    from graphdistill.runner.preprocess import Preprocessor, letterbox_geometry, object_mask_rle
    from graphdistill.student.tokenizer import StudentTokenizer

    rng = np.random.default_rng(0)
    spec = {"resize": "letterbox", "size": [96, 96], "align": "top-left", "interpolation": "bilinear",
            "reducing_gap": 1.0, "pad_value": [114, 114, 114], "layout": "NCHW", "dtype": "float32",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    # shapes that reduce by 2, 3 and unevenly, that only stretch, one pixel high, and the canvas exactly
    shapes = [(40, 60), (300, 200), (97, 1203), (96, 96), (1, 5), (250, 251), (400, 97)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    texts = ["What is in the picture?", "  two  spaces\tand\n tabs ", "café déjà-vu 123 it's we'll",
             "a cat<pad>and a dog, cat", "émoji 🙂 ok", "How many cats are there?"]  # fmt: skip
    # the student's own tokenizer, trained the way training does (class names as added tokens too)
    tokenizer_json = StudentTokenizer.train(texts * 3, 300, 2, class_names=["cat", "dog"]).tok.to_str()
    bpe = ByteLevelBPE(json.loads(tokenizer_json))
    ids = [[*bpe.encode(t), 2, 0, 1] for t in texts]
    masks = []
    for h, w in [(48, 64), (30, 20), (97, 150)]:
        for _ in range(3):
            x1, y1 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
            box = [x1, y1, min(w, x1 + rng.uniform(3, w * 0.5)), min(h, y1 + rng.uniform(3, h * 0.5))]
            masks.append({"logits": rng.normal(0, 3, (28, 28)).astype(np.float32).ravel().tolist(),
                          "ms": 28, "h": h, "w": w, "box": [float(v) for v in box]})  # fmt: skip
    # a mask over the whole image: its runs continue from one column into the next
    masks.append({"logits": [3.0] * 28 * 28, "ms": 28, "h": 30, "w": 40, "box": [0.0, 0.0, 40.0, 30.0]})
    req = {
        "spec": spec,
        "images": [
            {"w": i.shape[1], "h": i.shape[0], "b64": base64.b64encode(i.tobytes()).decode()} for i in images
        ],
        "tokenizer": json.loads(tokenizer_json),
        "texts": texts,
        "ids": ids,
        "masks": masks,
    }
    done = subprocess.run(
        [_node(), "-e", _HARNESS, str(RUNNER_JS)],
        input=json.dumps(req),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    js = json.loads(done.stdout)
    pre = Preprocessor(spec)
    for image, got in zip(images, js["images"], strict=True):
        want, _ = pre(image)
        assert np.array_equal(np.frombuffer(base64.b64decode(got), np.float32).reshape(want.shape), want), (
            image.shape
        )
    assert js["encoded"] == [bpe.encode(t) for t in texts]
    assert js["decoded"] == [bpe.decode(i) for i in ids]
    for m, got in zip(masks, js["masks"], strict=True):
        logits = np.asarray(m["logits"], np.float32).reshape(28, 28)
        assert got == object_mask_rle(logits, letterbox_geometry(m["h"], m["w"], 96), m["box"])
    assert js["sources"] == top_sources(np.array([0.5, 2, 2, -1, 3]), 3, ["a", "b", "c", "d", "e"])
    assert js["greedy"] == [greedy_token(np.array([0, 9, 5, 1.0]), [1, 2, 1, 2], 3, 0),
                            greedy_token(np.array([0, 9, 5, 1.0]), [1, 1], 0, 2)]  # fmt: skip


def test_a_demos_output_folder_opens_with_its_dataset(toy: tuple[Path, Path], tmp_path: Path) -> None:
    from graphdistill.ui import open_sources

    (tmp_path / "store").symlink_to(toy[0], target_is_directory=True)
    (tmp_path / "dataset").symlink_to(toy[1], target_is_directory=True)
    src = open_sources(tmp_path)
    assert (src.store.root, src.dataset_path) == (tmp_path / "store", tmp_path / "dataset")
    assert src.run is None and src.bundle is None  # the demo folder has none: those pages say so
    src.close()
    other = open_sources(tmp_path, dataset=toy[1])  # a flag wins over what the folder holds
    assert other.dataset_path == toy[1]
    other.close()
