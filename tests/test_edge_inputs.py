"""Inputs at the edges through every way in: the Python API, `run`, `record` (a JSONL row), `predict` and
`run-bundle`. Each photo or question gets a correct result or one clear line naming it (exit code 2), and what
is already stored is never touched."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import test_export
from graphdistill.cli import main
from graphdistill.images import ImageError, load_image
from test_export import onnx_float, run_dir  # noqa: F401  (module fixtures: a tiny run, its bundle)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), *test_export.pytestmark]  # the export's warnings

EMOJI = "🐱🐶❓"
LONG = ("Is there a cat? " * 625)[:-1] + "!"  # 10,000 characters


def _edge_images(root: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """name -> (file, the (height, width) a reader must see)."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, tuple[int, int]]] = {}
    Image.new("RGB", (1, 1), (200, 30, 30)).save(p := root / "one_pixel.png")
    out["1x1"] = (p, (1, 1))
    Image.fromarray(np.arange(30 * 50, dtype=np.uint16).reshape(30, 50) * 40).save(p := root / "deep.png")
    out["16-bit png"] = (p, (30, 50))
    Image.new("CMYK", (48, 32), (0, 200, 200, 0)).save(p := root / "print.jpg")
    out["cmyk jpeg"] = (p, (32, 48))
    Image.new("L", (40, 24), 128).save(p := root / "gray.jpg")
    out["grayscale"] = (p, (24, 40))
    frames = [Image.new("P", (36, 20), c) for c in (1, 2, 3)]
    frames[0].save(p := root / "moving.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["animated gif"] = (p, (20, 36))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": stored 40 wide x 20 high, shown 20 wide x 40 high
    Image.new("RGB", (40, 20), (10, 200, 10)).save(p := root / "rotated.jpg", exif=exif.tobytes())
    out["exif rotated"] = (p, (40, 20))
    return out


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, tuple[int, int]]]:
    return _edge_images(tmp_path_factory.mktemp("edge"))


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (12000, 12000)).save(path, compress_level=1)  # a real 12000x12000 PNG, ~80 KB on disk
    return path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_the_python_api_reads_every_edge_photo_and_refuses_the_huge_one_quickly(
    edge: dict[str, tuple[Path, tuple[int, int]]], huge: Path
) -> None:
    for name, (path, hw) in edge.items():
        img = load_image(path)
        assert img.shape == (*hw, 3) and img.dtype == np.uint8, name
    red = load_image(edge["cmyk jpeg"][0])[0, 0]  # magenta + yellow ink, no cyan: red, converted from CMYK
    assert red[0] > 200 and red[1] < 100 and red[2] < 100
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=r"huge\.png: 12000x12000 \(144 MP\) is larger than the 64 MP limit"):
        load_image(huge)
    assert time.perf_counter() - t0 < 5


TOY = """
from graphdistill.graphs.builder import GraphBuilder

def describe(r):
    img = r["image"]
    return {"answer": f"{img.shape[0]}x{img.shape[1]}x{img.shape[2]} {img.dtype} {len(r['question'])} chars"}

graph = (GraphBuilder("edge").input("image", "image").input("question", "text").output("answer", "text")
         .node("describe", describe, reads=["image", "question"], writes=["answer"]))
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("toy") / "edge_graph.py"
    path.write_text(TOY)
    return f"{path}:graph"


def test_run_answers_every_edge_photo_and_question_and_refuses_the_rest_in_one_line(
    toy: str, edge: dict[str, tuple[Path, tuple[int, int]]], huge: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    some = str(edge["1x1"][0])
    for name, (path, (h, w)) in edge.items():
        rc, out, _ = _cli(capsys, "run", "--graph", toy, "--image", str(path), "--question", "q", "--json")
        assert rc == 0 and json.loads(out)["answer"] == f"{h}x{w}x3 uint8 1 chars", name
    for question in (EMOJI, LONG):
        rc, out, _ = _cli(capsys, "run", "--graph", toy, "--image", some, "--question", question, "--json")
        assert rc == 0 and json.loads(out)["answer"].endswith(f" {len(question)} chars")
    rc, _, err = _cli(capsys, "run", "--graph", toy, "--image", str(huge), "--question", "q")
    assert rc == 2 and "huge.png: 12000x12000 (144 MP) is larger than the 64 MP limit" in err
    rc, _, err = _cli(capsys, "run", "--graph", toy, "--image", some, "--question", " ")
    assert rc == 2 and "--question is empty" in err


def test_record_keeps_every_good_row_and_names_every_bad_one_without_touching_the_store(
    toy: str,
    edge: dict[str, tuple[Path, tuple[int, int]]],
    huge: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from graphdistill.store.trace_store import TraceStore

    store = tmp_path / "store"
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"image": str(edge["grayscale"][0]), "question": "already here?"}) + "\n")
    assert _cli(capsys, "record", "--graph", toy, "--inputs", str(first), "--store", str(store))[0] == 0
    with TraceStore(store, readonly=True) as s:
        (before,) = list(s.iter())

    rows = [{"image": str(p), "question": "q"} for p, _ in edge.values()]
    rows += [{"image": str(edge["1x1"][0]), "question": q} for q in (EMOJI, LONG)]
    lines = [json.dumps(r) for r in rows]
    lines.append(json.dumps({"image": str(huge), "question": "q"}))  # a failed trace naming the photo
    lines.append(json.dumps({"image": str(edge["1x1"][0]), "question": "  "}))  # skipped: empty question
    data = ("\n".join(lines) + "\n").encode() + b'{"image": "caf\xe9.png"}\n'  # skipped: not UTF-8
    inputs = tmp_path / "edge.jsonl"
    inputs.write_bytes(data)
    rc, out, err = _cli(
        capsys, "record", "--graph", toy, "--inputs", str(inputs), "--store", str(store), "--json"
    )
    assert rc == 0, err
    counts = json.loads(out)
    assert (counts["recorded"], counts["failed"], counts["skipped"]) == (len(rows), 1, 2)
    assert f"line {len(lines)} skipped: its question is empty" in caplog.text
    assert f"line {len(lines) + 1} skipped: not UTF-8 text" in caplog.text
    assert "huge.png not run: image" in caplog.text and "is larger than the 64 MP limit" in caplog.text
    with TraceStore(store, readonly=True) as s:
        traces = {t.id: t for t in s.iter()}
    assert traces[before.id] == before  # what was stored before is untouched
    answers = sorted(str(t.output.get("answer")) for t in traces.values() if t.status == "ok")
    expected = sorted(
        [f"{h}x{w}x3 uint8 1 chars" for _, (h, w) in edge.values()]
        + [f"1x1x3 uint8 {len(q)} chars" for q in (EMOJI, LONG)]
        + ["24x40x3 uint8 13 chars"]
    )
    assert answers == expected
    (bad,) = [t for t in traces.values() if t.status == "error"]
    assert "huge.png: 12000x12000 (144 MP) is larger than the 64 MP limit" in str(bad.error)


@pytest.mark.parametrize("command", ["predict", "run-bundle"])
def test_the_student_and_the_bundle_answer_every_edge_photo_and_question(
    command: str,
    run_dir: Path,  # noqa: F811
    onnx_float: Path,  # noqa: F811
    edge: dict[str, tuple[Path, tuple[int, int]]],
    huge: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = str(run_dir if command == "predict" else onnx_float)
    some = str(edge["grayscale"][0])
    for name, (path, (h, w)) in edge.items():
        rc, out, err = _cli(capsys, command, target, "--image", str(path), "--question", "q", "--json")
        assert rc == 0, (name, err)
        got: dict[str, Any] = json.loads(out)
        assert isinstance(got["answer"], str) and isinstance(got["sources"], list), name
        for box in got["objects"]["xyxy"] if "xyxy" in got["objects"] else [o["box"] for o in got["objects"]]:
            assert 0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h, (
                name,
                box,
            )  # in the photo's frame
    for question in (EMOJI, LONG):
        rc, out, err = _cli(capsys, command, target, "--image", some, "--question", question, "--json")
        assert rc == 0 and isinstance(json.loads(out)["answer"], str), err
    rc, _, err = _cli(capsys, command, target, "--image", str(huge), "--question", "q")
    assert rc == 2 and "huge.png: 12000x12000 (144 MP) is larger than the 64 MP limit" in err
    rc, _, err = _cli(capsys, command, target, "--image", some, "--question", "")
    assert rc == 2 and "--question is empty" in err
