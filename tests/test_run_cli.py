"""`graphdistill run`, `load_graph` specs and the output pictures; bad inputs get clear errors.

Most tests drive the CLI in-process with a small plain-Python teacher graph given by ``--graph``; the one
real-model CLI run is marked slow.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from graphdistill.cli import main
from graphdistill.graphs import GraphBuilder
from graphdistill.graphs.spec import GraphSpecError, load_graph
from graphdistill.trace import RLE, Kind, ObjectOut
from graphdistill.viz import draw_output, side_by_side

# A toy teacher: reports what image it got, "detects" the brightest quarter with a mask.
TOY_GRAPH = textwrap.dedent(
    """
    import numpy as np
    from graphdistill.graphs import GraphBuilder
    from graphdistill.trace import RLE, Kind, ObjectOut

    def look(r):
        img = r["image"]
        h, w = img.shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        mask[: h // 2, : w // 2] = True
        obj = ObjectOut(label="corner", class_id=0, score=0.9, box=[0.0, 0.0, w / 2, h / 2],
                        mask=RLE.encode(mask)).model_dump(mode="json")
        answer = f"{h}x{w}x{img.shape[2]} {img.dtype} q={r['question']}"
        return {"answer": answer, "objects": [obj], "sources": ["doc-1"]}

    def explode(r):
        raise RuntimeError("the model fell over")

    def _base(name):
        return (GraphBuilder(name).input("image", Kind.IMAGE).input("question", Kind.TEXT)
                .output("answer", Kind.TEXT).output("objects", Kind.OBJECTS).output("sources", Kind.SOURCES))

    builder = _base("toy").node("look", look, reads=["image", "question"],
                                writes=["answer", "objects", "sources"])
    compiled = builder.compile()

    def factory():
        return builder

    broken = _base("broken").node("explode", explode, reads=["image"], writes=["answer", "objects", "sources"])
    not_a_graph = 42
    """
)


@pytest.fixture
def toy(tmp_path: Path) -> str:
    path = tmp_path / "toy_graph.py"
    path.write_text(TOY_GRAPH)
    return str(path)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["run", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------ happy path
def test_json_prints_exactly_one_object(toy: str, photo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(
        capsys, "--graph", f"{toy}:builder", "--image", str(photo), "--question", " hi ", "--json"
    )
    assert rc == 0
    result = json.loads(out)  # the whole of stdout is one JSON document
    assert set(result) == {"answer", "objects", "sources"}
    assert result["answer"] == "48x64x3 uint8 q=hi" and result["sources"] == ["doc-1"]
    (obj,) = result["objects"]
    assert obj["label"] == "corner" and obj["box"] == [0.0, 0.0, 32.0, 24.0]
    assert RLE.model_validate(obj["mask"]).area() == 24 * 32


def test_human_output_and_annotated_picture(
    toy: str, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_png = tmp_path / "annotated.png"
    rc, out, _ = _run(
        capsys, "--graph", f"{toy}:factory", "--image", str(photo), "--question", "q", "--out", str(out_png)
    )
    assert rc == 0
    assert "48x64x3 uint8 q=q" in out and "corner" in out and "doc-1" in out
    pic = Image.open(out_png)
    assert pic.width == 64 and pic.height > 48  # the answer is written under the image


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "exif"])
def test_image_modes_are_converted(
    mode: str, toy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "exif":  # stored 40 wide x 20 high, EXIF says "rotate 90": shown 20 wide x 40 high
        path = tmp_path / "rotated.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif.tobytes())
        expected = "40x20x3 uint8"
    elif mode == "I;16":
        arr = (np.arange(30 * 50, dtype=np.uint16).reshape(30, 50) * 40).astype(np.uint16)
        Image.fromarray(arr).save(path)
        expected = "30x50x3 uint8"
    else:
        Image.new(mode, (50, 30)).save(path)
        expected = "30x50x3 uint8"
    rc, out, _ = _run(capsys, "--graph", f"{toy}:compiled", "--image", str(path), "--question", "q", "--json")
    assert rc == 0 and json.loads(out)["answer"].startswith(expected)


def test_in_memory_graph_module_spec(
    photo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = types.ModuleType("gd_test_graphs")
    graph = (
        GraphBuilder("echo")
        .input("image", Kind.IMAGE)
        .input("question", Kind.TEXT)
        .output("answer", Kind.TEXT)
        .node("echo", lambda r: {"answer": r["question"].upper()}, reads=["question"], writes=["answer"])
    )
    mod.graph = graph  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gd_test_graphs", mod)
    rc, out, _ = _run(
        capsys, "--graph", "gd_test_graphs:graph", "--image", str(photo), "--question", "x?", "--json"
    )
    assert rc == 0 and json.loads(out) == {"answer": "X?"}


# ------------------------------------------------------------------------------------------------ bad input
def _bad(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(["run", *argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert out == ""
    assert "Traceback" not in err
    return err


def test_missing_zero_byte_corrupt_and_non_image_files(
    toy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = ["--graph", f"{toy}:builder", "--question", "q"]
    missing = tmp_path / "nope.png"
    assert "nope.png: no such file" in _bad(capsys, *g, "--image", str(missing))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty.png: the file is empty (0 bytes)" in _bad(capsys, *g, "--image", str(empty))
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    assert "notes.jpg: not a readable image file" in _bad(capsys, *g, "--image", str(text))
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    err = _bad(capsys, *g, "--image", str(truncated))
    assert "truncated.png" in err and "corrupt or truncated" in err
    assert "is a directory" in _bad(capsys, *g, "--image", str(tmp_path))


def test_enormous_image_is_refused_quickly(
    toy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(big, compress_level=1)  # a real 12000x12000 PNG (80 KB on disk)
    t0 = time.perf_counter()
    err = _bad(capsys, "--graph", f"{toy}:builder", "--image", str(big), "--question", "q")
    assert time.perf_counter() - t0 < 5
    assert "huge.png: 12000x12000 (144 MP) is larger than the 64 MP limit" in err


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question(question: str, toy: str, photo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _bad(capsys, "--graph", f"{toy}:builder", "--image", str(photo), "--question", question)
    assert "--question is empty" in err


def test_failing_node_is_named(toy: str, photo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _bad(capsys, "--graph", f"{toy}:broken", "--image", str(photo), "--question", "q")
    assert "node 'explode' failed: RuntimeError: the model fell over" in err


def test_failing_node_of_a_plain_langgraph_graph_is_named(
    photo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand-written StateGraph has no NodeError wrapper: the error still names the node that raised."""
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class State(TypedDict, total=False):
        image: Any
        question: str
        answer: str

    def fine(state: State) -> dict[str, Any]:
        return {"answer": "so far so good"}

    def explode(state: State) -> dict[str, Any]:
        raise KeyError("missing_field")

    g = StateGraph(State)
    g.add_node("fine", fine)
    g.add_node("plain_explode", explode)
    g.add_edge(START, "fine")
    g.add_edge("fine", "plain_explode")
    g.add_edge("plain_explode", END)
    mod = types.ModuleType("gd_test_plain_graph")
    mod.graph = g  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gd_test_plain_graph", mod)
    err = _bad(capsys, "--graph", "gd_test_plain_graph:graph", "--image", str(photo), "--question", "q")
    assert "node 'plain_explode' failed: KeyError: 'missing_field'" in err


def test_weight_flags_reach_the_reference_graph_config(
    photo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--detector/--segmenter/--segmenter-type/--llm/--text-embedder fill VisualRagConfig (models not loaded)."""
    import importlib

    vr = importlib.import_module(
        "graphdistill.graphs.visual_rag"
    )  # the package re-exports a same-named function

    seen: list[Any] = []

    def fake_visual_rag(config: Any, teachers: Any = None) -> Any:
        seen.append(config)
        return (
            GraphBuilder("stub")
            .input("image", Kind.IMAGE)
            .input("question", Kind.TEXT)
            .output("answer", Kind.TEXT)
            .node("a", lambda r: {"answer": "ok"}, reads=["question"], writes=["answer"])
            .compile()
        )

    monkeypatch.setattr(vr, "visual_rag", fake_visual_rag)
    rc, out, _ = _run(
        capsys,
        *("--image", str(photo), "--question", "q", "--json"),
        *("--detector", "/w/det.pt", "--segmenter", "/w/sam_b.pth", "--segmenter-type", "vit_b"),
        *("--llm", "/w/my-llm", "--text-embedder", "/w/my-st", "--device", "cpu"),
    )
    assert rc == 0 and json.loads(out) == {"answer": "ok"}
    (config,) = seen
    assert (config.detector, config.segmenter, config.segmenter_type) == (
        "/w/det.pt",
        "/w/sam_b.pth",
        "vit_b",
    )
    assert (config.llm, config.embedder, config.device) == ("/w/my-llm", "/w/my-st", "cpu")
    defaults = vr.VisualRagConfig()
    rc, _, _ = _run(capsys, "--image", str(photo), "--question", "q", "--json")
    assert rc == 0 and seen[1] == defaults  # no flag: the registry defaults


def test_weight_flags_are_refused_with_a_user_graph(
    toy: str, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = ["--graph", f"{toy}:builder", "--image", str(photo), "--question", "q"]
    err = _bad(capsys, *g, "--detector", "my.pt", "--text-embedder", "st")
    assert "--detector, --text-embedder choose the reference graph's weights" in err


def test_missing_detector_path_is_a_clear_error(
    photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "my_yolo.pt"
    err = _bad(capsys, "--image", str(photo), "--question", "q", "--detector", str(missing))
    assert "could not load its models" in err and f"weights {str(missing)!r}" in err
    assert "nor an existing path" in err


def test_third_party_notice_names_only_real_run_flags() -> None:
    """The licence notice tells users to swap weights with run flags: each flag it names must exist."""
    import re

    from graphdistill.cli import build_parser

    notice = (Path(__file__).resolve().parents[1] / "THIRD_PARTY_NOTICES.md").read_text()
    named = set(re.findall(r"`graphdistill run (--[a-z][a-z-]*)|`(--[a-z][a-z-]*)`", notice))
    flags = {a or b for a, b in named}
    assert {"--detector", "--segmenter", "--llm", "--text-embedder"} <= flags
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    options = {o for action in run._actions for o in action.option_strings}
    assert flags <= options, flags - options


def test_bad_out_path(toy: str, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = ["--graph", f"{toy}:builder", "--image", str(photo), "--question", "q"]
    assert "does not exist" in _bad(capsys, *g, "--out", str(tmp_path / "no" / "such" / "a.png"))
    assert "ending in .png" in _bad(capsys, *g, "--out", str(tmp_path / "a.txt"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{dir}/missing.py:graph", "no such file"),
        ("no_such_module_gd:graph", "no module named 'no_such_module_gd'"),
        ("{toy}:nothing_here", "has no attribute 'nothing_here'"),
        ("{toy}:not_a_graph", "expected a GraphBuilder"),
        ("{toy}", "expected 'package.module:attr'"),
    ],
)
def test_bad_graph_specs(
    spec: str, message: str, toy: str, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec.format(dir=tmp_path, toy=toy)
    err = _bad(capsys, "--graph", spec, "--image", str(photo), "--question", "q")
    assert message in err
    with pytest.raises(GraphSpecError, match=message):
        load_graph(spec)


def test_load_graph_kinds(toy: str) -> None:
    for attr in ("builder", "compiled", "factory"):
        g = load_graph(f"{toy}:{attr}")
        out = g.invoke({"image": np.zeros((4, 6, 3), np.uint8), "question": "q"})
        assert out["answer"] == "4x6x3 uint8 q=q"
    with pytest.raises(GraphSpecError, match="factory must take no required arguments"):
        load_graph(f"{toy}:look")


# ------------------------------------------------------------------------------------------------ pictures
def test_draw_output_paints_masks_boxes_and_caption() -> None:
    img = np.full((60, 80, 3), 200, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:30, 20:50] = True
    obj = ObjectOut(label="cat", score=0.87, box=[20, 10, 50, 30], mask=RLE.encode(mask)).model_dump(
        mode="json"
    )
    pic = np.asarray(
        draw_output(img, {"answer": "A cat.", "objects": [obj], "sources": ["cat-1"]}, title="t")
    )
    assert pic.shape[1] == 80 and pic.shape[0] > 60
    assert not np.array_equal(pic[20, 35], img[20, 35])  # masked pixel tinted
    assert np.array_equal(pic[50, 5], img[50, 5])  # far away pixel untouched
    assert (pic[60:] < 100).any()  # text under the image
    assert np.asarray(draw_output(img, {"objects": []})).shape == (60, 80, 3)


def test_side_by_side() -> None:
    a = np.zeros((10, 20, 3), np.uint8)
    b = Image.new("RGB", (30, 15))
    out = side_by_side([a, b], ["teacher", "student"], gap=4)
    assert out.size == (20 + 4 + 30, 15 + 26)
    with pytest.raises(ValueError, match="2 images but 1 titles"):
        side_by_side([a, b], ["x"])


# ------------------------------------------------------------------------------------------------ real models
@pytest.mark.slow
def test_real_reference_graph_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import _models
    from graphdistill.graphs.visual_rag import visual_rag

    teachers = _models.visual_rag_teachers()
    mod = types.ModuleType("gd_test_real_graph")
    mod.graph = lambda: visual_rag(teachers=teachers)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gd_test_real_graph", mod)
    path = tmp_path / "chelsea.png"
    Image.fromarray(_models.builtin_image("skimage/chelsea")).save(path)
    rc, out, _ = _run(
        capsys,
        "--graph",
        "gd_test_real_graph:graph",
        "--image",
        str(path),
        "--question",
        "What is this?",
        "--json",
    )
    assert rc == 0
    result = json.loads(out)
    assert result["answer"].strip()
    cats = [o for o in result["objects"] if o["label"] == "cat"]
    assert cats and RLE.model_validate(cats[0]["mask"]).area() > 1000
    assert result["sources"]


@pytest.mark.slow
def test_real_default_run_json_and_picture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`graphdistill run` with no --graph: the default models and the default KB, built on first use (here
    into tmp_path, not the shared cache)."""
    import _models
    from graphdistill.teachers import retriever

    kb = tmp_path / "kb" / "chroma"
    monkeypatch.setattr(retriever, "default_path", lambda: kb)
    photo = tmp_path / "chelsea.png"
    image = _models.builtin_image("skimage/chelsea")
    Image.fromarray(image).save(photo)
    out_png = tmp_path / "annotated.png"
    rc, out, err = _run(
        capsys,
        *("--image", str(photo), "--question", "What is in this picture?"),
        *("--json", "--out", str(out_png)),
    )
    assert rc == 0, err
    result = json.loads(out)
    assert result["answer"].strip()
    cats = [o for o in result["objects"] if o["label"] == "cat"]
    assert cats, result["objects"]
    assert RLE.model_validate(cats[0]["mask"]).area() > 0.05 * image.shape[0] * image.shape[1]
    assert any(s.startswith("coco/cat/") for s in result["sources"]), result["sources"]
    assert kb.is_dir() and any(kb.iterdir())  # the default KB was built where we pointed it
    pic = Image.open(out_png)
    assert pic.width == image.shape[1] and pic.height > image.shape[0]
    assert f"annotatedpicture:{out_png}" in "".join(err.split())  # rich may wrap the long path


def test_non_image_is_a_clear_error_even_after_ultralytics_patched_pillow(tmp_path: Path) -> None:
    """ultralytics swaps PIL.Image.open for a wrapper that imports a HEIF plugin on unknown files."""
    import ultralytics.utils.patches  # noqa: F401  (applies the patch, as loading the detector does)

    from graphdistill.images import ImageError, load_image

    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image at all")
    with pytest.raises(ImageError, match=r"notes\.jpg: not a readable image file"):
        load_image(bad)
