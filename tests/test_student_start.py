"""A student starts from what its teacher already knows: the offer mechanism (a node's model offers modules, the
graph schema records it, training loads it), a YOLO detector's trunk and head rebuilt from its own weights, and
the licence of those weights travelling into the run and the bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import dataset_offering, tiny_train_config
from graphdistill.graphs import GraphBuilder
from graphdistill.teachers.base import OFFER_LOADERS, OfferError, load_offer, pick_offer
from graphdistill.trace import Kind

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


class _Offering:
    """A teacher adapter (duck-typed) whose model the student may start from."""

    model_id = "toy/offering"
    weights_sha256 = "a" * 64
    device = "cpu"

    def student_offer(self) -> dict[str, Any]:
        return {"kind": "toy-trunk", "weights": "toy.pt", "licence": "MIT"}


class _Silent:
    model_id = "toy/silent"
    weights_sha256 = "b" * 64
    device = "cpu"


def test_the_graph_schema_records_what_each_nodes_model_offers() -> None:
    g = (
        GraphBuilder("offers")
        .input("x", Kind.NUMBER)
        .output("y", Kind.NUMBER)
        .node("look", lambda r: {"z": r["x"]}, reads=["x"], writes={"z": Kind.NUMBER}, model=_Offering())
        .node("think", lambda r: {"w": r["z"]}, reads=["z"], writes={"w": Kind.NUMBER}, model=_Silent())
        .node("plain", lambda r: {"y": r["w"]}, reads=["w"], writes=["y"])
    )
    schema = g.schema()
    assert schema.offers == {"look": {"kind": "toy-trunk", "weights": "toy.pt", "licence": "MIT"}}
    # the offers travel with the schema (recorded with the traces, written into the dataset's manifest)
    again = type(schema).model_validate(json.loads(schema.model_dump_json()))
    assert again.offers == schema.offers
    assert pick_offer(schema.offers, "toy-trunk") == ("look", schema.offers["look"])
    assert pick_offer(schema.offers, "ultralytics-detect") is None
    plain = GraphBuilder("none").input("x", Kind.NUMBER).output("y", Kind.NUMBER)
    assert plain.node("f", lambda r: {"y": r["x"]}, reads=["x"], writes=["y"]).schema().offers == {}


def test_an_offer_of_an_unknown_kind_is_refused_naming_it() -> None:
    assert "ultralytics-detect" in OFFER_LOADERS
    with pytest.raises(
        OfferError, match=r"node look offers modules of unknown kind 'toy-trunk'.*ultralytics-detect"
    ):
        load_offer({"kind": "toy-trunk"}, node="look")
    with pytest.raises(OfferError, match="unknown kind ''"):
        load_offer({})
    assert issubclass(OfferError, ValueError)  # the CLI's bad-input path (exit code 2)
    first = {
        "a": {"kind": "x"},
        "b": {"kind": "ultralytics-detect", "n": 1},
        "c": {"kind": "ultralytics-detect"},
    }
    assert pick_offer(first, "ultralytics-detect") == ("b", {"kind": "ultralytics-detect", "n": 1})


def test_a_detector_offer_whose_weights_changed_or_went_missing_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "mine.pt"
    weights.write_bytes(b"the weights the traces were recorded with")
    ref = {
        "kind": "ultralytics-detect",
        "weights": str(weights),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    weights.write_bytes(b"other weights, written after the recording")
    with pytest.raises(
        OfferError, match=r"mine\.pt.*is not the recorded.*changed since the traces were recorded"
    ):
        load_offer(ref, node="detect")
    weights.unlink()
    with pytest.raises(OfferError, match=r"mine\.pt.*cannot resolve its weights"):
        load_offer(ref, node="detect")


@pytest.mark.slow
def test_a_registry_detector_offer_with_another_recorded_sha256_is_refused() -> None:
    import _models

    ref = _models.detector().student_offer()
    assert (
        ref["kind"] == "ultralytics-detect" and ref["weights"] == "yolo11n" and "AGPL-3.0" in ref["licence"]
    )
    with pytest.raises(OfferError, match="is not the recorded"):
        load_offer({**ref, "weights_sha256": "0" * 64})


# ---- the YOLO detector's trunk and head, rebuilt from its own weights ------------------------------------------


@pytest.fixture(scope="module")
def yolo_start() -> Any:
    import _models

    return load_offer(_models.detector().student_offer(), node="detect")


def _yolo_student(start: Any, image_size: int, **kw: Any) -> Any:
    from graphdistill.student.model import Student, StudentConfig

    cfg = StudentConfig(
        trunk="ultralytics",
        trunk_spec=start.spec,
        image_size=image_size,
        num_classes=len(start.class_names),
        score_threshold=start.score_threshold,
        nms_iou=start.nms_iou,
        **kw,
    )
    model = Student(cfg)
    model.start_from(start)
    return model.eval()


@pytest.mark.slow
def test_the_trunk_computes_the_detectors_own_per_cell_outputs(yolo_start: Any) -> None:
    """Same weights, same random input: the student's dense outputs are Ultralytics' own (raw box distributions
    and class logits per cell, and the decoded boxes and scores), also traced phone-friendly for export."""
    import torch

    from graphdistill.student import phone_ops
    from graphdistill.weights import resolve

    student = _yolo_student(yolo_start, 320, outputs={"dets": "detections"})
    path, _ = resolve("yolo11n")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    yolo = (ckpt.get("ema") or ckpt["model"]).float().eval()
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded, raw = yolo(x)
        dense = student.dense(student.trunk(x))
        with phone_ops.phone_friendly():
            phone = student.dense(student.trunk(x))
        boxes = student.decode_boxes(dense["det_dist"])
    assert dense["det_dist"].shape == raw["boxes"].shape == (1, 64, 2100)
    torch.testing.assert_close(dense["det_dist"], raw["boxes"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dense["det_cls"], raw["scores"], atol=1e-4, rtol=1e-4)
    for key in ("det_dist", "det_cls"):
        torch.testing.assert_close(phone[key], dense[key], atol=1e-4, rtol=1e-4)
    xywh = decoded[:, :4].transpose(1, 2)
    xyxy = torch.cat([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], -1)
    torch.testing.assert_close(boxes, xyxy, atol=1e-3, rtol=1e-4)  # pixels
    torch.testing.assert_close(dense["det_cls"].sigmoid(), decoded[:, 4:], atol=1e-4, rtol=1e-4)
    assert float(raw["boxes"].std()) > 1 and float(raw["scores"].std()) > 1  # real logits, not all zeros


@pytest.mark.slow
@pytest.mark.parametrize("photo_id", ["ultralytics/bus", "ultralytics/zidane"])
def test_a_fresh_student_started_from_yolo_already_finds_the_teachers_boxes(
    yolo_start: Any, photo_id: str
) -> None:
    """The issue's test: before any training, at the teacher's input size, the student (the detector's trunk
    and head, selecting in its own graph) reproduces the teacher detector's boxes: box mAP@0.5 >= 0.9."""
    import _models
    from graphdistill.eval.metrics import box_map
    from graphdistill.student.loader import spec_of
    from graphdistill.student.predict import StudentPredictor
    from graphdistill.student.tokenizer import StudentTokenizer

    detector = _models.detector()
    assert yolo_start.input_size == detector.imgsz == 640
    student = _yolo_student(yolo_start, 640, outputs={"dets": "detections"})
    tok = StudentTokenizer.train(["What is in this picture?"] * 3, vocab_size=300)
    meta = {"class_names": yolo_start.class_names, "preprocessing": spec_of(student.config)}
    image = _models.builtin_image(photo_id)
    dets = StudentPredictor(student, tok, meta).predict(image, "What is in this picture?")["dets"]
    teacher = detector.detect(image)
    assert len(teacher) >= 3  # a photo with several objects
    as_objects = [
        [{"label": n, "class_id": c, "score": s, "box": b} for n, c, s, b in zip(*cols, strict=True)]
        for cols in (
            (teacher.names, teacher.class_ids, teacher.scores, teacher.xyxy),
            (dets["names"], dets["class_ids"], dets["scores"], dets["xyxy"]),
        )
    ]
    result = box_map([as_objects[0]], [as_objects[1]], class_names=yolo_start.class_names)
    assert result["box_map50"] >= 0.9, (result, as_objects)


# ---- training started from the detector, and the licence it carries ------------------------------------------


def test_start_none_or_a_graph_offering_nothing_gives_a_trunk_from_scratch(tmp_path: Path) -> None:
    from graphdistill.student.train import TrainRecipe
    from graphdistill.student.trunks import TimmTrunk

    broken = {"kind": "ultralytics-detect", "weights": str(tmp_path / "gone.pt"), "weights_sha256": "0" * 64}
    offering = dataset_offering(tmp_path / "offering", {"detect": broken})
    silent = dataset_offering(tmp_path / "silent", {})
    for ds, start in ((offering, "none"), (silent, "auto")):
        recipe = TrainRecipe(tiny_train_config(ds, tmp_path / f"run-{start}", start=start))
        recipe.setup()  # "none" never even loads the (broken) offer
        assert recipe.start is None and isinstance(recipe.model.trunk, TimmTrunk)
        assert recipe.model_config.trunk == "timm" and recipe.meta()["started_from"] is None
        assert recipe.meta()["preprocessing"]["std"] != [1.0, 1.0, 1.0]  # ImageNet-normalised input
    # "auto" loads what the graph offers, and an offer that cannot be loaded is an error naming it
    with pytest.raises(OfferError, match=r"gone\.pt"):
        TrainRecipe(tiny_train_config(offering, tmp_path / "run-auto-broken")).setup()
    for bad, message in (
        ({"start": "yolo"}, "start must be 'auto' or 'none'"),
        ({"freeze": "all"}, "freeze"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainRecipe(tiny_train_config(silent, tmp_path / "bad", **bad)).setup()


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [None, "backbone"], ids=["default", "backbone"])
def test_a_run_started_from_yolo_carries_its_weights_and_licence_into_meta_and_the_bundle(
    tmp_path: Path, freeze: str | None
) -> None:
    import torch

    import _models
    from graphdistill.export.bundle import export_run
    from graphdistill.runner import BundleRunner
    from graphdistill.student.model import StudentConfig
    from graphdistill.student.train import TrainRecipe

    offer = _models.detector().student_offer()
    ds = dataset_offering(tmp_path / "ds", {"detect": offer})
    recipe = TrainRecipe(
        tiny_train_config(ds, tmp_path / "run", epochs=2, **({"freeze": freeze} if freeze else {}))
    )
    recipe.setup()
    start = recipe.start
    assert start is not None and start.node == "detect" and recipe.class_names == start.class_names
    before = {k: v.clone() for k, v in recipe.model.trunk.state_dict().items()}
    recipe.train()
    recipe.save()
    recipe.cleanup()

    run = tmp_path / "run"
    cfg = StudentConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.trunk == "ultralytics" and cfg.trunk_spec == start.spec and cfg.num_classes == 80
    assert (cfg.score_threshold, cfg.nms_iou) == (offer["conf"], offer["iou"])  # the detector's own
    assert len(cfg.class_token_ids) == 80 and min(cfg.class_token_ids) > 3  # every label is a token
    meta = json.loads((run / "meta.json").read_text())
    assert meta["started_from"] == {
        "kind": "ultralytics-detect",
        "node": "detect",
        "model_id": offer["model_id"],
        "weights_sha256": offer["weights_sha256"],
        "licence": offer["licence"],
    }
    assert "AGPL-3.0" in meta["started_from"]["licence"]
    assert meta["preprocessing"]["mean"] == [0.0, 0.0, 0.0] and meta["preprocessing"]["std"] == [
        1.0,
        1.0,
        1.0,
    ]
    losses = recipe.history[-1]["train_loss"]
    assert {"det_cls", "det_box", "det_dfl", "mask_bce"} <= set(losses)
    after = recipe.model.trunk.state_dict()
    if freeze is None:  # the default: the detector stays the teacher's, so its per-cell outputs teach nothing
        assert recipe.cfg.freeze == "trunk" and not {"kd_cls", "kd_box"} & set(losses)
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:  # the backbone kept the detector's weights, the neck and head trained, also on its per-cell outputs
        assert {"kd_cls", "kd_box"} <= set(losses)
        n_backbone = recipe.model.trunk.n_backbone
        backbone = [k for k in before if k.startswith("layers.") and int(k.split(".")[1]) < n_backbone]
        assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head.cv3"))
        # batch-norm statistics stay the detector's everywhere
        stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
        assert stats and all(torch.equal(before[k], after[k]) for k in stats)
        return  # the bundle is checked once, for the default

    bundle = tmp_path / "bundle"
    manifest = export_run(run, "onnx", bundle, n_calibration=2, n_heldout=2)
    assert manifest["parity"]["passed"], manifest["parity"]["failures"]
    assert manifest["started_from"] == meta["started_from"]
    assert manifest["licence"].startswith(offer["licence"]) and offer["model_id"] in manifest["licence"]
    assert json.loads((bundle / "manifest.json").read_text())["licence"] == manifest["licence"]
    from graphdistill.dataset import open_dataset

    data = open_dataset(ds)
    row = data.rows("test")[0]
    out = BundleRunner(bundle, threads=1).predict(data.image(row), row.question)
    assert set(out) == {"answer", "objects", "sources"}
    shutil.rmtree(bundle)
    assert np.isfinite(losses["total"])


@pytest.mark.slow
@pytest.mark.parametrize("freeze", ["backbone", "trunk", "none"])
def test_a_trunk_started_from_the_detector_trains_at_its_own_rate_as_much_as_freeze_says(
    tmp_path: Path, freeze: str
) -> None:
    import _models
    from graphdistill.student.train import TrainRecipe

    ds = dataset_offering(tmp_path / "ds", {"detect": _models.detector().student_offer()})
    recipe = TrainRecipe(tiny_train_config(ds, tmp_path / "run", freeze=freeze, lr=1e-3, trunk_lr=1e-5))
    recipe.setup()
    trunk = recipe.model.trunk
    backbone = [p for m in trunk.layers[: trunk.n_backbone] for p in m.parameters()]
    head = [
        p for branch in (trunk.head.cv2, trunk.head.cv3) for p in branch.parameters()
    ]  # not the fixed DFL
    rest = [p for m in trunk.layers[trunk.n_backbone :] for p in m.parameters()] + head
    assert backbone and rest
    assert all(p.requires_grad == (freeze == "none") for p in backbone)
    assert all(p.requires_grad == (freeze != "trunk") for p in rest)
    groups = {g["initial_lr"]: {id(p) for p in g["params"]} for g in recipe.optimizer.param_groups}
    trained_trunk = {id(p) for p in trunk.parameters() if p.requires_grad}
    assert {id(p) for p in backbone + rest if p.requires_grad} <= trained_trunk
    assert groups.get(1e-5, set()) == trained_trunk  # the trunk: trunk_lr; everything else: lr
    assert groups[1e-3] and not groups[1e-3] & {id(p) for p in trunk.parameters()}
    # the mask, object-token and text parts train at lr whatever the trunk does
    assert {id(p) for p in recipe.model.proto.parameters()} <= groups[1e-3]
