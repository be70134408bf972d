"""Test-time augmentation for the student (graphdistill.runner.tta): views of a photo, their objects mapped back
onto it, and the vote that fuses them (graphdistill.runner.vote, shared with the filter's vote)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from graphdistill.runner.preprocess import rle_decode, rle_encode, rle_majority, rle_resize
from graphdistill.runner.tta import (
    TTA_SCALE,
    TTAError,
    View,
    fuse_views,
    parse_tta,
    predict_views,
    unsure,
    unview_text,
    view_images,
    views,
)

OUTPUTS = {"answer": "text", "objects": "objects", "sources": "sources", "vec": "embedding"}
PAD = (114, 114, 114)


def _mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[box[1] : box[3], box[0] : box[2]] = True
    return m


def _obj(label: str, score: float, box: tuple[int, int, int, int], size: tuple[int, int]) -> dict[str, Any]:
    return {
        "label": label,
        "class_id": {"cat": 0, "dog": 1, "cup": 2}[label],
        "score": score,
        "box": [float(v) for v in box],
        "mask": rle_encode(_mask(*size, box)),
    }


def _result(size: tuple[int, int] = (40, 60)) -> dict[str, Any]:
    return {
        "answer": "A cat at the left and a cup.",
        "objects": [_obj("cat", 0.9, (2, 5, 20, 30), size), _obj("cup", 0.4, (30, 10, 50, 25), size)],
        "sources": ["doc/cat", "doc/cup", "doc/dog"],
        "vec": [0.5, -1.0, 2.0],
    }


@pytest.mark.parametrize("n", [2, 3])
def test_fusing_identical_predictions_is_the_identity(n: int) -> None:
    r = _result()
    fused = fuse_views([copy.deepcopy(r) for _ in range(n)], [View()] * n, OUTPUTS, (40, 60))
    assert fused == r


def test_parse_tta_names_the_unknown_augmentation_and_the_choices() -> None:
    assert parse_tta("flip, scale") == ("flip", "scale")
    assert parse_tta(["scale", "flip", "scale"]) == ("scale", "flip")
    assert parse_tta("none") == parse_tta("") == parse_tta(None) == ()
    with pytest.raises(TTAError, match=r"'blur'.*flip, scale"):
        parse_tta("flip,blur")
    assert views(("flip", "scale")) == [View(), View(flip=True), View(scale=TTA_SCALE)]


def _find_square(rgb: np.ndarray) -> dict[str, Any]:
    """A toy model: the white pixels of the image are one 'cat' (box and mask), whatever view it is shown."""
    on = rgb.min(axis=2) > 200
    ys, xs = np.nonzero(on)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    obj = {"label": "cat", "class_id": 0, "score": 0.8, "box": box, "mask": rle_encode(on)}
    return {"answer": "a cat", "objects": [obj], "sources": ["doc/cat"]}


@pytest.mark.parametrize("size", [None, 100])  # 100: views made at a model's smaller input side
def test_each_view_is_answered_on_its_own_image_and_mapped_back_onto_the_photo(size: int | None) -> None:
    h, w = 120, 200
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[20:70, 30:90] = 255  # off centre, so a view that was not mirrored back would land elsewhere
    seen: list[np.ndarray] = []

    def model(img: np.ndarray) -> dict[str, Any]:
        seen.append(img)
        return _find_square(img)

    outputs = {"answer": "text", "objects": "objects", "sources": "sources"}
    tol = 1.5 if size is None else 2.5  # a pixel of the view, in photo pixels
    for aug in ("flip", "scale"):
        (_, _), (img, view) = view_images(rgb, [aug], PAD, size)
        alone = fuse_views([_find_square(img)], [view], outputs, (h, w))
        np.testing.assert_allclose(alone["objects"][0]["box"], [30, 20, 90, 70], atol=tol)
        got = rle_decode(alone["objects"][0]["mask"]["size"], alone["objects"][0]["mask"]["counts"])
        want = _mask(h, w, (30, 20, 90, 70))
        assert got.shape == (h, w) and (got & want).sum() / (got | want).sum() > 0.9
    seen.clear()
    fused = predict_views(rgb, model, ("flip", "scale"), outputs, PAD, size)
    r = 1.0 if size is None else size / w
    assert len(seen) == 3 and np.array_equal(seen[0], rgb)
    assert seen[1].shape[:2] == seen[2].shape[:2] == (round(h * r), round(w * r))
    if size is None:
        assert np.array_equal(seen[1], rgb[:, ::-1])
    small = (round(h * r * TTA_SCALE), round(w * r * TTA_SCALE))
    assert (seen[2][small[0] :, :] == PAD[0]).all() and (seen[2][:, small[1] :] == PAD[0]).all()
    assert (seen[2][: small[0] - 2, : small[1] - 2] != PAD[0]).any()
    assert [o["label"] for o in fused["objects"]] == ["cat"]  # one object: the three views agreed on it
    np.testing.assert_allclose(fused["objects"][0]["box"], [30, 20, 90, 70], atol=tol)
    assert fused["answer"] == "a cat" and fused["sources"] == ["doc/cat"]
    assert predict_views(rgb, model, (), outputs, PAD) == _find_square(rgb)  # no views: the model itself


def test_the_views_vote_objects_answers_and_sources_by_quorum() -> None:
    size = (40, 60)
    a, b, c = _result(size), _result(size), _result(size)
    b["objects"] = [b["objects"][0]]  # only two of three views see the cup: kept
    a["objects"].append(_obj("dog", 0.95, (40, 28, 58, 39), size))
    # the third view is the photo mirrored: its boxes and masks are on the mirrored photo, its answer too
    c["objects"] = [
        {**o, "box": [60 - o["box"][2], o["box"][1], 60 - o["box"][0], o["box"][3]],
         "mask": rle_encode(rle_decode(o["mask"]["size"], o["mask"]["counts"])[:, ::-1])}
        for o in c["objects"]
    ]  # fmt: skip
    a["answer"], b["answer"], c["answer"] = "A dog.", "A cat at the right.", "a cat at the left"
    a["sources"], b["sources"], c["sources"] = ["d1", "d2", "d3"], ["d2", "d4", "d1"], ["d5", "d2", "d6"]
    fused = fuse_views([a, b, c], [View(), View(), View(flip=True)], OUTPUTS, size)
    assert [o["label"] for o in fused["objects"]] == ["cat", "cup"]
    np.testing.assert_allclose(fused["objects"][0]["box"], [2, 5, 20, 30])
    assert fused["answer"] == "A cat at the right."  # the mirrored view's "left" is the photo's right
    assert fused["sources"] == ["d2", "d1"]  # retrieved by 3 and by 2 of the 3 views; the rest by one
    np.testing.assert_allclose(fused["vec"], [0.5, -1.0, 2.0])


def test_two_views_keep_what_either_found_and_the_photos_own_answer() -> None:
    size = (40, 60)
    a, b = _result(size), _result(size)
    b["objects"] = [_obj("dog", 0.7, (40, 28, 58, 39), size)]
    b["answer"] = "a dog"
    fused = fuse_views([a, b], [View(), View()], OUTPUTS, size)
    assert sorted(o["label"] for o in fused["objects"]) == ["cat", "cup", "dog"]
    assert fused["answer"] == a["answer"]


def test_an_answer_about_a_mirrored_view_swaps_left_and_right() -> None:
    assert unview_text("Left: a cup at the right, RIGHTMOST fork; bright leftovers", True) == (
        "Right: a cup at the left, LEFTMOST fork; bright leftovers"
    )
    assert unview_text("a cup at the right", False) == "a cup at the right"


def test_detections_outputs_are_fused_as_parallel_lists() -> None:
    det = {
        "kind": "detections",
        "xyxy": [[2.0, 5.0, 20.0, 30.0]],
        "class_ids": [0],
        "names": ["cat"],
        "scores": [0.9],
        "image_size": [40, 60],
    }
    fused = fuse_views([{"boxes": det}, {"boxes": det}], [View(), View()], {"boxes": "detections"}, (40, 60))
    assert fused["boxes"] == det


def test_rle_decode_is_rle_encodes_inverse() -> None:
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (1, 1), (30, 2)]:
        m = rng.random(shape) > 0.5
        enc = rle_encode(m)
        assert np.array_equal(rle_decode(enc["size"], enc["counts"]), m)
    with pytest.raises(ValueError, match="sum to"):
        rle_decode([2, 2], [1, 2])


def _nearest(mask: np.ndarray, size: tuple[int, int], region: tuple[int, int], flip: bool) -> np.ndarray:
    """The rule rle_resize states, on a pixel array: output (y, x) reads the region's pixel at
    (floor((y + .5) rh / h), floor((x + .5) rw / w)), its columns mirrored first when flip."""
    m = mask[: region[0], : region[1]]
    m = m[:, ::-1] if flip else m
    ys = np.minimum(((np.arange(size[0]) + 0.5) * m.shape[0] / size[0]).astype(int), m.shape[0] - 1)
    xs = np.minimum(((np.arange(size[1]) + 0.5) * m.shape[1] / size[1]).astype(int), m.shape[1] - 1)
    return m[ys][:, xs]


def test_rle_resize_and_majority_are_the_pixel_rules_computed_on_runs() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        sh, sw = (int(v) for v in rng.integers(1, 25, 2))
        m = rng.random((sh, sw)) > rng.uniform(0.2, 0.8)
        region = (int(rng.integers(1, sh + 1)), int(rng.integers(1, sw + 1)))
        size = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))  # up and down
        flip = bool(rng.integers(0, 2))
        got = rle_resize(rle_encode(m), size, region, flip)
        assert np.array_equal(rle_decode(got["size"], got["counts"]), _nearest(m, size, region, flip))
        masks = [rng.random((sh, sw)) > 0.5 for _ in range(int(rng.integers(1, 5)))]
        vote = rle_majority([rle_encode(x) for x in masks])
        assert np.array_equal(rle_decode(vote["size"], vote["counts"]), np.sum(masks, 0) * 2 > len(masks))
    with pytest.raises(ValueError, match="cannot be voted"):
        rle_majority([rle_encode(np.ones((2, 2), bool)), rle_encode(np.ones((2, 3), bool))])


@pytest.mark.parametrize("command", ["predict", "run-bundle", "export", "eval"])
def test_every_command_refuses_an_unknown_augmentation_naming_it(
    command: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from graphdistill.cli import main

    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(photo)
    (tmp_path / "run").mkdir()
    (tmp_path / "ds").mkdir()
    argv = {
        "predict": ["predict", str(tmp_path / "run"), "--image", str(photo), "--question", "what?"],
        "run-bundle": ["run-bundle", str(tmp_path / "b"), "--image", str(photo), "--question", "what?"],
        "export": ["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "b")],
        "eval": ["eval", str(tmp_path / "run"), "--dataset", str(tmp_path / "ds")],
    }[command]
    assert main([*argv, "--tta", "flip,blur"]) == 2
    err = capsys.readouterr().err
    assert "--tta" in err and "'blur'" in err and "flip, scale" in err


def test_the_adaptive_policy_answers_the_views_only_when_the_photos_answer_is_unsure() -> None:
    rgb = np.zeros((30, 40, 3), dtype=np.uint8)
    outputs = {"answer": "text", "objects": "objects"}
    calls: list[np.ndarray] = []

    def model(score: float | None) -> Any:
        def predict(img: np.ndarray) -> dict[str, Any]:
            calls.append(img)
            objs = [] if score is None else [_obj("cat", score, (2, 2, 10, 10), img.shape[:2])]
            return {"answer": "a cat", "objects": objs}

        return predict

    for score, below, views_run in [
        (0.9, 0.5, False),
        (0.4, 0.5, True),
        (None, 0.5, True),
        (0.4, None, True),
    ]:
        calls.clear()
        out = predict_views(rgb, model(score), ("flip", "scale"), outputs, PAD, below=below)
        assert len(calls) == (3 if views_run else 1), (score, below)
        assert np.array_equal(calls[0], rgb)  # the photo itself is always answered first
        if not views_run:
            assert out == model(score)(rgb)
    # a near miss (the caller saw a dropped candidate just under the threshold) spends the views on a sure answer;
    # an answer the caller made already is not made again
    for near, views_run in ((True, True), (False, False)):
        calls.clear()
        first = model(0.9)(rgb)
        calls.clear()
        out = predict_views(
            rgb, model(0.9), ("flip", "scale"), outputs, PAD, below=0.5, first=first, near=near
        )
        assert len(calls) == (2 if views_run else 0) and (views_run or out == first)
    assert unsure({"boxes": {"scores": [0.8, 0.3]}}, {"boxes": "detections"}, 0.5)
    assert not unsure({"boxes": {"scores": [0.8]}}, {"boxes": "detections"}, 0.5)
    assert unsure({"answer": "a cat"}, {"answer": "text"}, 0.5)  # nothing to be sure of: the views decide


def test_the_adaptive_threshold_must_be_a_score(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from graphdistill.cli import main

    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(photo)
    argv = ["predict", str(tmp_path), "--image", str(photo), "--question", "what?", "--tta", "flip"]
    assert main([*argv, "--tta-below", "1.5"]) == 2
    assert "--tta-below 1.5" in capsys.readouterr().err
