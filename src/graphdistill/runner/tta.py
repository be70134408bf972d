"""Test-time augmentation for a student: one query answered on several views of its photo, the answers voted
and the objects fused. numpy + Pillow only, like the rest of :mod:`graphdistill.runner`; the PyTorch
predictor (``StudentPredictor.predict(..., tta=)``) and the bundle runner (``BundleRunner.predict``, a
bundle exported with ``tta`` in its manifest) both go through :func:`predict_views`.

Views (the manifest's ``tta.augmentations``, in this order after the photo itself):

- ``flip``: the photo mirrored left to right;
- ``scale``: the photo shrunk to :data:`TTA_SCALE` of its size and pasted at the top-left of a canvas of its
  original size filled with the letterbox's pad colour, so the model sees every object at that fraction of
  its usual size (a letterboxing model would see a plain resize exactly as it sees the photo).

A view of a photo larger than the model's input is made at the model's input size (one resize instead of
two). Each view's objects are mapped back onto the photo (:func:`unview_object`: the geometry the teacher's
recorded test-time views are undone with, :func:`graphdistill.recording.tta.untta_object`), then
a mirrored view's answer has *left* and *right* swapped (:func:`unview_text`), and
the views vote as the filter votes a teacher's samples (:mod:`graphdistill.runner.vote`, quorum = half the
views, rounded up): an object is kept when a quorum of views found it (class and box IoU >= :data:`FUSE_IOU`),
its box the score-weighted mean, its score the mean, its mask the pixel majority; the answer is the largest
cluster of identical normalised answers (ties: the photo's own answer; an embedder, in Python, clusters by
meaning); sources are those a quorum of views retrieved, by how many did, then mean rank, cut to the first
view's count; embeddings are averaged. With two views the quorum is one: the objects are the union of both
views' (fused where they agree) and the answer is the photo's own unless both views wrote the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from graphdistill.errors import GraphdistillError
from graphdistill.runner.preprocess import rle_resize
from graphdistill.runner.vote import (
    Embedder,
    fuse_objects,
    vote_answers,
    vote_sources,
    weighted_mean,
)

TTA_CHOICES = ("flip", "scale")
TTA_SCALE = 0.8  # the "scale" view: the photo at 80 % of its size
FUSE_IOU = 0.5  # objects of two views are one when their boxes overlap by at least this (the filter's vote)
# the adaptive policy counts a candidate the detector dropped as a near miss when its score is within NEAR_LOGIT
# (in logits) under the detector's threshold: about twice the mean |logit shift| int8 gives the student's detector
# scores on training images calibration did not see (0.24; benchmarks/results/int8_noise.json), set before any
# held-out photo was looked at. At the detector's 0.25 that is a score of 0.1682 or more.
NEAR_LOGIT = 0.5


class TTAError(GraphdistillError, ValueError):
    """An unknown test-time augmentation; the message names it and the choices."""


def parse_tta(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"flip,scale"`` (or ``["flip", "scale"]``; ``None`` / ``""`` / ``"none"``: none) -> the augmentations,
    each once, in the given order; an unknown name is refused, naming it and the choices."""
    if spec is None:
        return ()
    items = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    items = [t for t in items if t and t != "none"]
    for t in items:
        if t not in TTA_CHOICES:
            raise TTAError(f"tta {spec!r}: unknown augmentation {t!r} (choose from {', '.join(TTA_CHOICES)})")
    return tuple(dict.fromkeys(items))


def parse_policy(
    spec: str | Sequence[str] | None, below: float | None
) -> tuple[tuple[str, ...], float | None]:
    """:func:`parse_tta` of ``spec`` and the adaptive threshold ``below`` (None, or a score in 0..1 with at
    least one augmentation), checked together."""
    augmentations = parse_tta(spec)
    if below is not None and not (augmentations and 0.0 <= below <= 1.0):
        raise TTAError(f"tta_below {below}: needs augmentations (tta) and a score between 0 and 1")
    return augmentations, below


@dataclass(frozen=True)
class View:
    """One view of a photo and how to undo it: the photo mirrored left to right (``flip``), resized by
    ``scale`` (view pixels per photo pixel) and placed at the top-left of the view."""

    flip: bool = False
    scale: float = 1.0

    @property
    def identity(self) -> bool:
        return not self.flip and self.scale == 1.0


def views(augmentations: Sequence[str]) -> list[View]:
    """The photo itself, then one view per augmentation (:func:`parse_tta`'s names), at the photo's size."""
    out = [View()]
    for a in parse_tta(augmentations):
        out.append(View(flip=True) if a == "flip" else View(scale=TTA_SCALE))
    return out


def shrunk_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of a photo of ``height`` × ``width`` resized by ``scale``."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def view_images(
    rgb: np.ndarray, augmentations: Sequence[str], pad_value: Sequence[int], size: int | None = None
) -> list[tuple[np.ndarray, View]]:
    """The photo itself, then each augmentation's view of it (H×W×3 uint8), each with the :class:`View` that
    undoes it. ``size``: the model's square input side; a view of a photo larger than that is made at that
    size (long side ``size``), since the model's letterbox would bring it there anyway: one resize of the
    photo instead of two, and the views' masks come back small."""
    h, w = rgb.shape[:2]
    reduce = min(1.0, size / max(h, w)) if size else 1.0
    out: list[tuple[np.ndarray, View]] = [(rgb, View())]
    for nominal in views(augmentations)[1:]:
        view = View(nominal.flip, nominal.scale * reduce)
        canvas = shrunk_size(h, w, reduce) if nominal.scale != 1.0 else None
        out.append((view_image(rgb, view, pad_value, canvas), view))
    return out


def view_image(
    rgb: np.ndarray,
    view: View,
    pad_value: Sequence[int] = (114, 114, 114),
    canvas: tuple[int, int] | None = None,
) -> np.ndarray:
    """The H×W×3 uint8 image the model answers for ``view``: the photo mirrored, resized by ``view.scale``
    (Pillow bilinear, ``reducing_gap`` 1) and, when ``canvas`` (h, w) is larger than that, pasted at the
    top-left of a canvas of that size filled with ``pad_value``."""
    if view.identity:
        return rgb
    h, w = rgb.shape[:2]
    rh, rw = shrunk_size(h, w, view.scale) if view.scale != 1.0 else (h, w)
    img = rgb[:, ::-1] if view.flip else rgb
    if (rh, rw) != (h, w):
        img = np.asarray(
            Image.fromarray(np.ascontiguousarray(img)).resize(
                (rw, rh), Image.Resampling.BILINEAR, reducing_gap=1.0
            )
        )
    if canvas is None or tuple(canvas) == (rh, rw):
        return np.ascontiguousarray(img)
    out = np.empty((canvas[0], canvas[1], 3), dtype=np.uint8)
    out[:] = np.asarray(pad_value, dtype=np.uint8)
    out[:rh, :rw] = img
    return out


def unview_box(box: Sequence[float], flip: bool, scale: float, orig_size: tuple[int, int]) -> list[float]:
    """An xyxy box seen on a view (the photo of ``orig_size`` (h, w) mirrored if ``flip``, then resized by
    ``scale`` to :func:`shrunk_size`, at the view's top-left) -> the same box on the photo, clipped to it."""
    oh, ow = orig_size
    aw = shrunk_size(oh, ow, scale)[1] if scale != 1.0 else ow
    x1, y1, x2, y2 = (float(v) for v in box)
    if flip:
        x1, x2 = aw - x2, aw - x1
    return [
        float(np.clip(x1 / scale, 0, ow)),
        float(np.clip(y1 / scale, 0, oh)),
        float(np.clip(x2 / scale, 0, ow)),
        float(np.clip(y2 / scale, 0, oh)),
    ]


def unview_object(obj: Mapping[str, Any], view: View, orig_size: tuple[int, int]) -> dict[str, Any] | None:
    """One object (``{label, class_id, score, box, mask}``, mask as RLE dict or None) the model found on
    ``view`` -> the same object on the photo (its mask: the view's part that holds the photo, mirrored back
    and resized to the photo by nearest neighbour, :func:`~graphdistill.runner.preprocess.rle_resize`); None
    when its box lies outside the photo (on a shrunk view's padding)."""
    if view.identity:
        return dict(obj)
    box = unview_box(obj["box"], view.flip, view.scale, orig_size)
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    mask = obj.get("mask")
    if mask is not None:
        region = shrunk_size(orig_size[0], orig_size[1], view.scale) if view.scale != 1.0 else None
        mask = rle_resize(mask, orig_size, region, view.flip)
    return {**obj, "box": box, "mask": mask}


_SIDES = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def unview_text(text: str, flip: bool) -> str:
    """An answer written about a mirrored view -> the same answer about the photo: the words *left* and *right*
    (and *leftmost*, *rightmost*) swapped, keeping their case. Answers that place objects ("a person at the
    right") would otherwise vote against the photo's own."""
    if not flip:
        return text

    def swap(m: re.Match[str]) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + (m.group(2) or "")

    return _SIDES.sub(swap, text)


def detections_dict(objects: list[dict[str, Any]], height: int, width: int) -> dict[str, Any]:
    """Objects as a DETECTIONS output: the same objects as parallel lists (``trace.Detections`` as JSON)."""
    return {
        "kind": "detections",
        "xyxy": [o["box"] for o in objects],
        "class_ids": [o["class_id"] for o in objects],
        "names": [o["label"] for o in objects],
        "scores": [o["score"] for o in objects],
        "image_size": [height, width],
    }


def _as_objects(value: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A DETECTIONS output (parallel lists) -> objects without masks."""
    return [
        {"label": n, "class_id": int(c), "score": float(s), "box": list(b), "mask": None}
        for b, c, n, s in zip(value["xyxy"], value["class_ids"], value["names"], value["scores"], strict=True)
    ]


def unview_result(
    result: Mapping[str, Any], view: View, outputs: Mapping[str, str], orig_size: tuple[int, int]
) -> dict[str, Any]:
    """One view's result (``{output field: value}``, ``outputs``: field -> kind) mapped back onto the photo:
    text un-mirrored, boxes and masks mapped back (objects the view's padding holds dropped); other fields as
    they are. The photo's own view comes back as it was."""
    out: dict[str, Any] = dict(result)
    for name, kind in outputs.items():
        v = result.get(name)
        if kind == "text" and isinstance(v, str):
            out[name] = unview_text(v, view.flip)
        elif kind in ("objects", "detections"):
            objs = [
                u
                for o in ((v or []) if kind == "objects" else (_as_objects(v) if v else []))
                if (u := unview_object(o, view, orig_size)) is not None
            ]
            out[name] = objs if kind == "objects" else detections_dict(objs, *orig_size)
    return out


def fuse_views(
    results: Sequence[Mapping[str, Any]],
    view_list: Sequence[View],
    outputs: Mapping[str, str],
    orig_size: tuple[int, int],
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """One result per view (``{output field: value}``, the graph's fields, ``outputs``: field -> kind) -> the
    fused result (the module docstring's rules), each mapped back first (:func:`unview_result`)."""
    back = [unview_result(r, v, outputs, orig_size) for r, v in zip(results, view_list, strict=True)]
    return fuse_results(back, outputs, orig_size, embedder)


def fuse_results(
    results: Sequence[Mapping[str, Any]],
    outputs: Mapping[str, str],
    orig_size: tuple[int, int],
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Several results of one input, all in the photo's own frame (views mapped back, or samples) -> one:
    answers voted by meaning, objects fused (those at least half found), sources voted, embeddings averaged;
    other fields from the first."""
    n = len(results)
    quorum = math.ceil(n / 2)
    out: dict[str, Any] = {}
    for name, kind in outputs.items():
        values = [r.get(name) for r in results]
        if kind == "text":
            answers = [v for v in values if isinstance(v, str)]
            idx, _, _ = vote_answers(answers, n, embedder)
            out[name] = answers[idx] if idx is not None else values[0]
        elif kind in ("objects", "detections"):
            per_view = [(v or []) if kind == "objects" else (_as_objects(v) if v else []) for v in values]
            objects = [o for o, _ in fuse_objects(per_view, quorum, FUSE_IOU)]
            out[name] = objects if kind == "objects" else detections_dict(objects, *orig_size)
        elif kind == "sources":
            lists = [list(v or []) for v in values]
            out[name] = vote_sources(lists, n, quorum)[0][: len(lists[0])]
        elif kind == "embedding":
            vecs = [np.asarray(v, dtype=np.float64) for v in values if v is not None]
            out[name] = [float(x) for x in weighted_mean(np.stack(vecs))] if vecs else None
        else:
            out[name] = values[0]
    return out


def near_floor(score_threshold: float) -> float:
    """The score from which a candidate the detector dropped is a near miss: :data:`NEAR_LOGIT` under
    ``score_threshold`` in logits."""
    t = min(max(float(score_threshold), 1e-6), 1 - 1e-6)
    return 1.0 / (1.0 + math.exp(-(math.log(t / (1 - t)) - NEAR_LOGIT)))


def near_miss(scores: Any, keep: Any) -> float:
    """The best score among the selected slots not kept (encode's ``scores`` where ``keep`` is false: the
    selection puts the best candidates NMS did not suppress there, after the kept objects), 0 when none."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)[~np.asarray(keep, dtype=bool).reshape(-1)]
    return float(s.max()) if s.size else 0.0


def has_near_miss(outputs: Mapping[str, Any], floor: float | None) -> bool:
    """Whether one answer's raw outputs (``scores`` and ``keep`` of its selected slots, batch dim removed) hold
    a near miss: :func:`near_miss` at least ``floor`` (None, or no ``keep``: never). The one reading the
    bundle runner, the PyTorch predictor and the export gate share."""
    if floor is None or "keep" not in outputs:
        return False
    return near_miss(outputs["scores"], outputs["keep"]) >= floor


def unsure(result: Mapping[str, Any], outputs: Mapping[str, str], below: float, near: bool = False) -> bool:
    """The adaptive policy's signal, read off one answer: no object at all, one scoring under ``below``, or
    (``near``) a candidate the detector dropped just under its threshold (:func:`near_miss` at least
    :func:`near_floor`): an object near the threshold is the kind another view finds or loses, and one the
    answer no longer shows is what int8 loses. A graph without an objects output is always unsure (the views
    are all there is to go on)."""
    scores: list[float] = []
    seen = False
    for name, kind in outputs.items():
        value = result.get(name)
        if kind == "objects":
            seen = True
            scores += [float(o["score"]) for o in value or []]
        elif kind == "detections":
            seen = True
            scores += [float(v) for v in (value or {}).get("scores", [])]
    return near or not seen or not scores or min(scores) < below


def predict_views(
    rgb: np.ndarray,
    predict: Callable[[np.ndarray], Mapping[str, Any]],
    augmentations: Sequence[str],
    outputs: Mapping[str, str],
    pad_value: Sequence[int] = (114, 114, 114),
    size: int | None = None,
    embedder: Embedder | None = None,
    below: float | None = None,
    first: Mapping[str, Any] | None = None,
    near: bool = False,
) -> dict[str, Any]:
    """``predict`` (an H×W×3 uint8 photo -> the graph's output fields) on the photo and each augmentation's
    view of it (:func:`view_images`; ``size``: the model's input side), fused (:func:`fuse_views`). No
    augmentations: ``predict(rgb)`` itself. ``below`` (adaptive compute): the views are answered only when the
    photo's own answer is :func:`unsure` — no object, or one scoring under ``below``, or ``near`` (the caller
    saw a near miss) — otherwise that answer is the result, at the cost of one query. ``first``: the photo's own
    answer, when the caller has made it already."""
    if not parse_tta(augmentations):
        return dict(predict(rgb) if first is None else first)
    first = predict(rgb) if first is None else first
    if below is not None and not unsure(first, outputs, below, near):
        return dict(first)
    made = view_images(rgb, augmentations, pad_value, size)  # the photo itself first: answered above
    results = [first, *(predict(img) for img, _ in made[1:])]
    return fuse_views(
        results, [v for _, v in made], outputs, (int(rgb.shape[0]), int(rgb.shape[1])), embedder
    )
