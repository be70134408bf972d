"""The vision teachers: YOLO detector, SAM segmenter, CLIP embedder (issue 3, part 2).

Real default weights (slow) on the built-in photos; CLIP has no real weights offline, so its tests run on
seeded random initialisations and on a checkpoint file written here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from _models import builtin_image, detector, segmenter
from graphdistill.images import ImageError
from graphdistill.trace import Detections, Masks
from graphdistill.weights import REGISTRY

pytestmark = pytest.mark.filterwarnings(
    # open_clip's ResNet archs and timm import paths warn on import in some versions; named, not blanket
    "ignore:Importing from timm.models:FutureWarning",
)


# --------------------------------------------------------------------------------------------------------
# fast: argument checks and conversions that need no model
# --------------------------------------------------------------------------------------------------------


def test_clip_refuses_without_checkpoint() -> None:
    from graphdistill.teachers.clip import ClipEmbedder, NoClipWeightsError

    with pytest.raises(NoClipWeightsError, match=r"checkpoint=.*random_weights=True"):
        ClipEmbedder()
    with pytest.raises(ValueError, match="not both"):
        ClipEmbedder(checkpoint="x.pt", random_weights=True)


def test_clip_missing_checkpoint_path_is_named(tmp_path: Path) -> None:
    from graphdistill.teachers.clip import ClipEmbedder

    missing = tmp_path / "nope.pt"
    with pytest.raises(Exception, match="nope.pt"):
        ClipEmbedder(checkpoint=missing)


def test_segmenter_rejects_unknown_model_type() -> None:
    from graphdistill.teachers.segmenter import SamSegmenter

    with pytest.raises(ValueError, match=r"vit_x.*vit_t, vit_b, vit_l, vit_h"):
        SamSegmenter(model_type="vit_x")


def test_boxes_array_accepts_detections_lists_and_empty() -> None:
    from graphdistill.teachers.segmenter import boxes_array

    det = Detections(xyxy=[[1, 2, 3, 4]], class_ids=[0], names=["a"], scores=[0.5], image_size=[10, 10])
    np.testing.assert_array_equal(boxes_array(det), [[1, 2, 3, 4]])
    assert boxes_array([]).shape == (0, 4)
    assert boxes_array(np.zeros((0, 4))).shape == (0, 4)
    with pytest.raises(ValueError, match="4 numbers"):
        boxes_array([[1, 2, 3]])
    with pytest.raises(ValueError, match="NaN"):
        boxes_array([[0, 0, np.nan, 1]])


def test_results_to_detections_converts_and_clips_boxes() -> None:
    """The converter duck-types Ultralytics Results: boxes in pixels, clipped to the image, names by id."""
    from graphdistill.teachers.detector import results_to_detections

    boxes = _Boxes(
        xyxy=np.array([[-0.4, 10.0, 50.0, 100.3], [20.0, 30.0, 40.0, 60.0]]),
        cls=np.array([1.0, 0.0]),
        conf=np.array([0.9, 0.4]),
    )
    result = SimpleNamespace(orig_shape=(100, 200), boxes=boxes)
    det = results_to_detections(result, ["person", "bicycle"])
    assert det.image_size == [100, 200]
    assert det.xyxy == [[0.0, 10.0, 50.0, 100.0], [20.0, 30.0, 40.0, 60.0]]
    assert det.names == ["bicycle", "person"] and det.class_ids == [1, 0]
    assert det.scores == pytest.approx([0.9, 0.4])
    empty = results_to_detections(SimpleNamespace(orig_shape=(5, 6), boxes=None), ["person"])
    assert len(empty) == 0 and empty.image_size == [5, 6]


class _Boxes:
    """Shaped like ultralytics' Boxes: xyxy / cls / conf arrays and a length."""

    def __init__(self, xyxy: np.ndarray, cls: np.ndarray, conf: np.ndarray) -> None:
        self.xyxy, self.cls, self.conf = xyxy, cls, conf

    def __len__(self) -> int:
        return len(self.xyxy)


# --------------------------------------------------------------------------------------------------------
# detector (real YOLO11n)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_detector_finds_cat_bus_and_people() -> None:
    from graphdistill.teachers.base import Detector

    det = detector()
    assert isinstance(det, Detector)
    assert det.weights_sha256 == REGISTRY["yolo11n"].sha256
    assert len(det.names) == 80 and det.names[0] == "person" and det.names[5] == "bus"
    chelsea = builtin_image("skimage/chelsea")
    cats = det.detect(chelsea)
    assert cats.image_size == list(chelsea.shape[:2])
    assert "cat" in cats.names
    bus_img = builtin_image("ultralytics/bus")
    bus = det.detect(bus_img)
    assert "bus" in bus.names
    assert bus.names.count("person") >= 2
    h, w = bus_img.shape[:2]
    for x1, y1, x2, y2 in bus.xyxy:
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
    assert all(det.conf <= s <= 1 for s in bus.scores)
    assert [det.names[c] for c in bus.class_ids] == bus.names
    with pytest.raises(ImageError, match=r"detector input #0.*shape \(4, 4, 2\)"):
        det.detect(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.slow
def test_detector_is_deterministic_and_batch_matches_single() -> None:
    det = detector()
    chelsea, bus = builtin_image("skimage/chelsea"), builtin_image("ultralytics/bus")
    first = det.detect(bus)
    assert det.detect(bus).model_dump() == first.model_dump()
    # a mixed-size batch, with a repeated image: each result equals the image's own single-image result
    batch = det.detect_batch([chelsea, bus, bus])
    assert len(batch) == 3
    assert batch[0].names == det.detect(chelsea).names
    for got in batch[1:]:
        assert got.names == first.names
        np.testing.assert_allclose(got.xyxy, first.xyxy, atol=0.5)
        np.testing.assert_allclose(got.scores, first.scores, atol=1e-3)
    assert det.detect_batch([]) == []


@pytest.mark.slow
def test_detector_loads_a_local_weights_path(tmp_path: Path) -> None:
    """A user's own .pt (here: a copy of the registry file, outside the cache) loads and detects the same."""
    import shutil

    from graphdistill.teachers.detector import YoloDetector

    local = tmp_path / "my_yolo.pt"
    shutil.copyfile(detector().weights_path, local)
    det = YoloDetector(weights=str(local))
    assert det.weights_path == local
    assert det.weights_sha256 == REGISTRY["yolo11n"].sha256  # its digest is computed, not looked up
    assert "my_yolo.pt" in det.model_id
    bus = builtin_image("ultralytics/bus")
    got, want = det.detect(bus), detector().detect(bus)
    assert got.names == want.names and "bus" in got.names
    np.testing.assert_allclose(got.xyxy, want.xyxy, atol=0.5)


@pytest.mark.slow
def test_detector_batch_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    det = detector()
    bus = builtin_image("ultralytics/bus")
    whole = det.detect_batch([bus, bus, bus])
    monkeypatch.setattr(det, "max_batch", 2)  # the three same-size images now take two model calls
    calls: list[int] = []
    real = det._predict
    monkeypatch.setattr(det, "_predict", lambda imgs: calls.append(len(imgs)) or real(imgs))
    chunked = det.detect_batch([bus, bus, bus])
    assert calls == [2, 1]
    for a, b in zip(whole, chunked, strict=True):
        assert a.names == b.names
        np.testing.assert_allclose(a.xyxy, b.xyxy, atol=0.5)


@pytest.mark.slow
def test_detector_class_filter_and_unknown_class() -> None:
    from graphdistill.teachers.detector import YoloDetector

    people = YoloDetector(classes=["person"]).detect(builtin_image("ultralytics/bus"))
    assert len(people) >= 2 and set(people.names) == {"person"}
    with pytest.raises(ValueError, match=r"unicorn.*valid names: person, bicycle"):
        YoloDetector(classes=["person", "unicorn"])


@pytest.mark.slow
def test_detector_restores_torch_thread_count() -> None:
    import torch
    from ultralytics.utils import NUM_THREADS

    from graphdistill.teachers.detector import YoloDetector

    before = torch.get_num_threads()
    # a count ultralytics would never choose itself, so a missing restore cannot pass by accident
    mine = NUM_THREADS + 1
    torch.set_num_threads(mine)
    try:
        fresh = YoloDetector()  # a fresh model: ultralytics changes the count on its first predict
        fresh.detect(builtin_image("skimage/chelsea"))
        assert torch.get_num_threads() == mine
        fresh.detect_batch([builtin_image("skimage/chelsea")])
        assert torch.get_num_threads() == mine
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------
# segmenter (real MobileSAM)
# --------------------------------------------------------------------------------------------------------


class _CallCounter:
    """Counts the calls a real SAM predictor receives (it still does the work)."""

    def __init__(self, seg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = {"set_image": 0, "predict_torch": 0, "encoder": 0}
        predictor = seg._predictor
        for name in ("set_image", "predict_torch"):
            real = getattr(predictor, name)
            monkeypatch.setattr(predictor, name, self._wrap(name, real))
        self._hook = seg._sam.image_encoder.register_forward_hook(self._encoder_ran)

    def _wrap(self, name: str, real: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return real(*args, **kwargs)

        return counted

    def _encoder_ran(self, *_: Any) -> None:
        self.calls["encoder"] += 1

    def close(self) -> None:
        self._hook.remove()


def _inside_and_cover(mask: np.ndarray, box: list[float], margin: int = 2) -> tuple[float, float]:
    """Share of the mask inside its box (with a small margin), and share of the box the mask covers."""
    x1, y1, x2, y2 = box
    h, w = mask.shape
    ys = slice(max(0, int(y1) - margin), min(h, int(np.ceil(y2)) + margin))
    xs = slice(max(0, int(x1) - margin), min(w, int(np.ceil(x2)) + margin))
    area = max(int(mask.sum()), 1)
    return float(mask[ys, xs].sum()) / area, float(mask.sum()) / max((x2 - x1) * (y2 - y1), 1.0)


@pytest.mark.slow
def test_segmenter_cat_mask_lies_inside_its_box() -> None:
    from graphdistill.teachers.base import Segmenter

    seg = segmenter()
    assert isinstance(seg, Segmenter)
    assert seg.weights_sha256 == REGISTRY["mobile_sam"].sha256
    chelsea = builtin_image("skimage/chelsea")
    dets = detector().detect(chelsea)
    i = dets.names.index("cat")
    masks = seg.segment(chelsea, [dets.xyxy[i]])
    assert isinstance(masks, Masks) and len(masks) == 1
    assert masks.rles[0].size == list(chelsea.shape[:2])
    inside, cover = _inside_and_cover(masks.rles[0].decode(), dets.xyxy[i])
    assert inside >= 0.97
    assert 0.3 <= cover <= 1.0
    assert 0.5 <= masks.scores[0] <= 1.0
    assert seg.segment(chelsea, [dets.xyxy[i]]).model_dump() == masks.model_dump()  # deterministic


@pytest.mark.slow
def test_segmenter_all_boxes_of_an_image_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    seg = segmenter()
    bus_img = builtin_image("ultralytics/bus")
    dets = detector().detect(bus_img)
    assert len(dets) >= 3
    counter = _CallCounter(seg, monkeypatch)
    try:
        masks = seg.segment(bus_img, dets)
    finally:
        counter.close()
    assert counter.calls == {"set_image": 1, "predict_torch": 1, "encoder": 1}
    assert len(masks) == len(dets)
    for rle, box in zip(masks.rles, dets.xyxy, strict=True):
        inside, cover = _inside_and_cover(rle.decode(), box)
        assert inside >= 0.95 and cover >= 0.1


@pytest.mark.slow
def test_segmenter_no_boxes_skips_the_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    seg = segmenter()
    chelsea = builtin_image("skimage/chelsea")
    counter = _CallCounter(seg, monkeypatch)
    try:
        empty = seg.segment(chelsea, Detections(image_size=list(chelsea.shape[:2])))
        assert len(empty) == 0 and counter.calls["encoder"] == 0
        with pytest.raises(ValueError, match="detections are for a 10x20 image"):
            seg.segment(chelsea, Detections(image_size=[10, 20]))
        h, w = chelsea.shape[:2]
        batch = seg.segment_batch([chelsea, chelsea], [[], [[w * 0.1, h * 0.1, w * 0.9, h * 0.9]]])
    finally:
        counter.close()
    assert [len(m) for m in batch] == [0, 1]
    assert counter.calls == {"set_image": 1, "predict_torch": 1, "encoder": 1}
    with pytest.raises(ValueError, match="one list of boxes per image"):
        seg.segment_batch([chelsea], [])


@pytest.mark.slow
def test_segmenter_loads_a_local_checkpoint_path() -> None:
    from graphdistill.teachers.segmenter import SamSegmenter

    path = segmenter().weights_path
    local = SamSegmenter(weights=str(path))
    assert local.weights_sha256 == REGISTRY["mobile_sam"].sha256
    assert path.name in local.model_id


# --------------------------------------------------------------------------------------------------------
# CLIP (seeded random weights; a checkpoint written here)
# --------------------------------------------------------------------------------------------------------

SMALL_ARCH = "ViT-S-32-alt"  # 43 M params: the cheapest open_clip arch whose tokenizer works offline


def _probe_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), np.full((64, 64, 3), 200, np.uint8)]


@pytest.mark.slow
def test_clip_random_default_arch_is_marked_and_normalised() -> None:
    from graphdistill.teachers.base import ImageEmbedder
    from graphdistill.teachers.clip import ClipEmbedder

    clip = ClipEmbedder(random_weights=True)
    assert isinstance(clip, ImageEmbedder)
    assert clip.random_weights is True
    assert "RANDOM WEIGHTS" in clip.model_id and "ViT-B-32" in clip.model_id
    assert len(clip.weights_sha256) == 64
    imgs = clip.embed_images([*_probe_images(), builtin_image("skimage/chelsea")])
    txts = clip.embed_texts(["a cat", "a bus", "a person on a bicycle"])
    assert imgs.dtype == np.float32 and txts.dtype == np.float32
    assert imgs.shape == (3, clip.dim) and txts.shape == (3, clip.dim) and clip.dim == 512
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txts, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(txts[0], txts[1])
    assert clip.embed_texts([]).shape == (0, 512)


@pytest.mark.slow
def test_clip_random_weights_deterministic_per_seed_and_checkpoint_round_trip(tmp_path: Path) -> None:
    import torch

    from graphdistill.teachers.clip import ClipEmbedder

    imgs, texts = _probe_images(), ["a cat on a sofa", "a red bus"]
    a = ClipEmbedder(SMALL_ARCH, random_weights=True, seed=0)
    b = ClipEmbedder(SMALL_ARCH, random_weights=True, seed=0)
    c = ClipEmbedder(SMALL_ARCH, random_weights=True, seed=1)
    emb_a = a.embed_images(imgs)
    np.testing.assert_array_equal(emb_a, b.embed_images(imgs))
    np.testing.assert_array_equal(a.embed_texts(texts), b.embed_texts(texts))
    b.batch_size = 1  # chunking must not change the result (beyond float noise)
    np.testing.assert_allclose(b.embed_images(imgs), emb_a, atol=1e-5)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert not np.allclose(emb_a, c.embed_images(imgs), atol=1e-3)
    assert "seed=1" in c.model_id

    ckpt = tmp_path / "clip_small.pt"
    torch.save(a._model.state_dict(), ckpt)
    loaded = ClipEmbedder(SMALL_ARCH, checkpoint=ckpt, seed=123)  # seed must not matter with a checkpoint
    assert loaded.random_weights is False and "RANDOM" not in loaded.model_id
    from graphdistill.weights import digest_path

    assert loaded.weights_sha256 == digest_path(ckpt)
    np.testing.assert_allclose(loaded.embed_images(imgs), emb_a, atol=1e-6)
    np.testing.assert_allclose(loaded.embed_texts(texts), a.embed_texts(texts), atol=1e-6)
    with pytest.raises(ValueError, match="does not fit architecture"):
        ClipEmbedder("ViT-B-32", checkpoint=ckpt)
