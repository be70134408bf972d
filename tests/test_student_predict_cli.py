"""`graphdistill predict` prints what `graphdistill run` prints for the same graph, and draws the same kind of
picture: a toy teacher graph (plain Python, as in test_run_cli) against a tiny student trained for one epoch
on a synthetic dataset whose manifest declares the toy graph's outputs."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("tokenizers")

from _fixtures import TINY_STUDENT
from graphdistill.cli import main

# two toy teachers' outputs, between them every kind whose JSON differs: text, OBJECTS (with masks), SOURCES
# and a DETECTIONS record (a live trace.Detections in the graph's state; a student has one or the other)
GRAPHS = {
    "rag": [("answer", "text"), ("objects", "objects"), ("sources", "sources")],
    "det": [("answer", "text"), ("boxes", "detections"), ("sources", "sources")],
}

TOY_GRAPH = textwrap.dedent(
    """
    import numpy as np
    from graphdistill.graphs import GraphBuilder
    from graphdistill.trace import RLE, Detections, Kind, ObjectOut

    def look(r):
        h, w = r["image"].shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        mask[: h // 2, : w // 2] = True
        obj = ObjectOut(label="circle", class_id=0, score=0.9, box=[0.0, 0.0, w / 2, h / 2],
                        mask=RLE.encode(mask)).model_dump(mode="json")
        boxes = Detections(xyxy=[[0.0, 0.0, w / 2, h / 2]], class_ids=[0], names=["circle"], scores=[0.9],
                           image_size=[h, w])
        return {"answer": "a circle", "objects": [obj], "sources": ["doc-circle"], "boxes": boxes}

    def rag_look(r):
        out = look(r)
        return {k: out[k] for k in ("answer", "objects", "sources")}

    def det_look(r):
        out = look(r)
        return {k: out[k] for k in ("answer", "boxes", "sources")}

    def _base(name):
        return GraphBuilder(name).input("image", Kind.IMAGE).input("question", Kind.TEXT).output("answer", Kind.TEXT)

    rag = (
        _base("rag").output("objects", Kind.OBJECTS).output("sources", Kind.SOURCES)
        .node("look", rag_look, reads=["image", "question"], writes=["answer", "objects", "sources"])
    )
    det = (
        _base("det").output("boxes", Kind.DETECTIONS).output("sources", Kind.SOURCES)
        .node("look", det_look, reads=["image", "question"], writes=["answer", "boxes", "sources"])
    )
    """
)


@pytest.fixture(scope="module", params=sorted(GRAPHS))
def student_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    """(toy graph name, a one-epoch student run over that graph's outputs, a training photo saved as PNG)."""
    import torch

    from graphdistill.dataset import make_synthetic_dataset, open_dataset
    from graphdistill.student.train import TrainConfig, train

    root = tmp_path_factory.mktemp("predict-cli")
    make_synthetic_dataset(root / "synthetic", n=4, seed=3, fractions=(1, 0, 0))
    ds_dir = root / "ds"
    shutil.copytree(root / "synthetic", ds_dir)
    manifest = json.loads((ds_dir / "manifest.json").read_text())
    manifest["graph"]["outputs"] = [{"name": n, "kind": k} for n, k in GRAPHS[request.param]]
    (ds_dir / "manifest.json").write_text(json.dumps(manifest))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(
            TrainConfig(
                dataset=str(ds_dir),
                out=str(root / "run"),
                epochs=1,
                batch_size=4,
                device="cpu",
                vocab_size=400,
                # one epoch scores every cell far below the teacher's threshold: keep what the NMS leaves, so
                # the lists whose shape is compared are not empty
                overrides={**TINY_STUDENT, "score_threshold": 0.0},
            )
        )
    finally:
        torch.set_num_threads(threads)
    ds = open_dataset(ds_dir)
    photo = root / "photo.png"
    Image.fromarray(ds.image(ds.rows("train")[0])).save(photo)
    return request.param, root / "run", photo


def _shape(value: Any) -> Any:
    """A JSON value's structure: dict keys (recursively), list element shapes, scalar types."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return sorted({json.dumps(_shape(v), sort_keys=True) for v in value})
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__
    return "number"  # int or float: a box coordinate may be either


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert main(argv) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


@pytest.mark.slow
def test_predict_json_has_exactly_the_shape_run_json_has(
    student_run: tuple[str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph, run, photo = student_run
    toy = tmp_path / "toy_graph.py"
    toy.write_text(TOY_GRAPH)
    q = ["--image", str(photo), "--question", "what shape is this?", "--json"]
    teacher = _json(capsys, ["run", "--graph", f"{toy}:{graph}", *q])
    # threshold 0 (the student's own too): every object the in-graph NMS keeps is reported
    student = _json(capsys, ["predict", str(run), "--threshold", "0", *q])

    assert list(student) == list(teacher) == [n for n, _ in GRAPHS[graph]]  # the schema's fields, in order
    if graph == "rag":
        assert student["objects"] and student["objects"][0]["mask"]
    else:
        assert student["boxes"]["xyxy"]
        assert teacher["boxes"]["__record__"] == student["boxes"]["__record__"] == "detections"
        assert "kind" not in student["boxes"]  # the record is written as the trace writes it
    for name, value in student.items():
        assert _shape(value) == _shape(teacher[name]), name
    assert _shape(student) == _shape(teacher)


@pytest.mark.slow
@pytest.mark.parametrize("student_run", ["rag"], indirect=True)  # the graph whose objects are drawn
def test_predict_out_writes_the_annotated_picture(
    student_run: tuple[str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run, photo = student_run
    out_png = tmp_path / "annotated.png"
    argv = ["predict", str(run), "--image", str(photo), "--question", "what shape?", "--threshold", "0"]
    assert main([*argv, "--out", str(out_png)]) == 0
    assert str(out_png) in capsys.readouterr().err
    pic = np.asarray(Image.open(out_png).convert("RGB"))
    src = np.asarray(Image.open(photo).convert("RGB"))
    assert pic.shape[1] == src.shape[1] and pic.shape[0] > src.shape[0]  # the answer is written underneath
    assert not np.array_equal(pic[: src.shape[0]], src)  # boxes (and masks) are drawn on the photo

    for bad in ("annotated.txt", "no-such-folder/annotated.png"):
        assert main([*argv, "--out", str(tmp_path / bad)]) == 2
        assert "--out" in capsys.readouterr().err
