"""Image in, model input out; model boxes and masks back to the input image. numpy + Pillow only.

The rule (``manifest["preprocessing"]``; the keys below are its fields):
1. RGB ``uint8`` H×W×3 (grayscale is repeated to 3 channels, alpha is dropped);
2. ``letterbox``: scale by ``s = size / max(H, W)`` to ``w' × h' = round(W·s) × round(H·s)`` (each
   clamped to 1..size) with Pillow's ``interpolation`` filter and ``reducing_gap`` (when the spec has one:
   first ``Image.reduce`` by the largest integer factor ``k`` with ``W / k >= w' * reducing_gap`` (and the
   same for the height), a box average, then the filter), paste it on a ``size × size`` canvas filled
   with ``pad_value``: at the top-left corner (``align: top-left``, the student's rule) or centred
   (``align: center``: ``((size - w') // 2, (size - h') // 2)``);
3. ``x = (pixel / 255 - mean) / std`` per channel, ``float32``, layout ``NCHW`` with N = 1.

Model outputs live on that square canvas: boxes are ``cx, cy, w, h`` in 0..1 of the canvas, masks are
``mask_size × mask_size`` logits over the whole canvas. :func:`boxes_to_image` and :func:`paste_mask`
undo the letterbox exactly as the PyTorch predictor (``graphdistill.student.predict``) does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
            "bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX}  # fmt: skip


@dataclass(frozen=True)
class Letterbox:
    """Where the input image sits on the model's square canvas."""

    scale: float  # canvas px per image px
    pad_left: int
    pad_top: int
    height: int  # of the input image
    width: int


def load_rgb(image: np.ndarray | str | Path) -> np.ndarray:
    """A path or an array -> H×W×3 uint8 RGB."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image array must be H×W×3 RGB, got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3])


def canvas_size(spec: dict[str, Any]) -> int:
    size = spec["size"]
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"preprocessing size must be square, got {size}")
        size = size[0]
    return int(size)


def _resized(height: int, width: int, size: int) -> tuple[int, int, float]:
    scale = size / max(height, width)
    return max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))), scale


def letterbox_geometry(height: int, width: int, size: int, align: str = "top-left") -> Letterbox:
    new_w, new_h, scale = _resized(height, width, size)
    if align == "top-left":
        return Letterbox(scale, 0, 0, height, width)
    if align == "center":
        return Letterbox(scale, (size - new_w) // 2, (size - new_h) // 2, height, width)
    raise ValueError(f"unknown letterbox align {align!r}")


def preprocess(rgb: np.ndarray, spec: dict[str, Any]) -> tuple[np.ndarray, Letterbox]:
    """H×W×3 uint8 -> (float32 [1, 3, size, size], where the image sits on the canvas)."""
    if spec.get("resize") != "letterbox" or spec.get("layout") != "NCHW" or spec.get("dtype") != "float32":
        raise ValueError(f"unsupported preprocessing {spec}")
    size = canvas_size(spec)
    h, w = rgb.shape[:2]
    box = letterbox_geometry(h, w, size, spec.get("align", "top-left"))
    new_w, new_h, _ = _resized(h, w, size)
    resample = RESAMPLE[spec.get("interpolation", "bilinear")]
    resized = Image.fromarray(rgb).resize((new_w, new_h), resample, reducing_gap=spec.get("reducing_gap"))
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = np.asarray(spec.get("pad_value", [0, 0, 0]), dtype=np.uint8)
    canvas[box.pad_top : box.pad_top + new_h, box.pad_left : box.pad_left + new_w] = np.asarray(resized)
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    x = (canvas.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), box


def boxes_to_image(boxes: np.ndarray, box: Letterbox, size: int) -> np.ndarray:
    """[N, 4] canvas-normalised cx, cy, w, h -> [N, 4] x1, y1, x2, y2 in input-image pixels: scale by
    ``size / scale``, shift by the padding, clip to the image (and keep x2 >= x1, y2 >= y1)."""
    side = size / box.scale
    cx, cy, bw, bh = (boxes[:, i] * side for i in range(4))
    cx, cy = cx - box.pad_left / box.scale, cy - box.pad_top / box.scale
    x1 = np.minimum(np.maximum(cx - bw / 2, 0.0), box.width)
    y1 = np.minimum(np.maximum(cy - bh / 2, 0.0), box.height)
    x2 = np.minimum(np.maximum(cx + bw / 2, x1), box.width)
    y2 = np.minimum(np.maximum(cy + bh / 2, y1), box.height)
    return np.stack([x1, y1, x2, y2], axis=1)


def paste_mask(logits: np.ndarray, box: Letterbox) -> np.ndarray:
    """mask_size × mask_size logits over the (top-left letterboxed) canvas -> H×W bool mask of the input
    image: ``sigmoid``, keep the part covering the image (``round(H·m) × round(W·m)`` cells from the top-left,
    ``m = mask_size / max(H, W)``, each clamped to 1..mask_size), resize that float32 map to W×H with
    Pillow's bilinear filter, and threshold at 0.5."""
    if box.pad_left or box.pad_top:
        raise ValueError("masks can only be pasted back from a top-left letterbox")
    ms = logits.shape[0]
    mw, mh, _ = _resized(box.height, box.width, ms)
    prob = (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).astype(np.float32)[:mh, :mw]
    full = Image.fromarray(np.ascontiguousarray(prob)).resize((box.width, box.height), RESAMPLE["bilinear"])
    return np.asarray(full) > 0.5


def rle_encode(mask: np.ndarray) -> dict[str, list[int]]:
    """COCO uncompressed RLE (same as ``graphdistill.trace.RLE.encode``): column-major runs, first run
    counts zeros (0 when the first pixel is on)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [0]}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def mask_region(xyxy: np.ndarray | list[float], height: int, width: int) -> tuple[int, int, int, int]:
    """The pixels a mask may cover: ``floor(x1) <= x < ceil(x2)``, ``floor(y1) <= y < ceil(y2)``, clipped
    to the image -> (x0, y0, x1, y1) as ints (empty when x1 <= x0 or y1 <= y0)."""
    x0, y0 = max(0, int(np.floor(xyxy[0]))), max(0, int(np.floor(xyxy[1])))
    x1, y1 = min(width, int(np.ceil(xyxy[2]))), min(height, int(np.ceil(xyxy[3])))
    return x0, y0, max(x0, x1), max(y0, y1)


def paste_mask_in_box(logits: np.ndarray, box: Letterbox, xyxy: np.ndarray | list[float]) -> np.ndarray:
    """The part of :func:`paste_mask` inside the object's box (:func:`mask_region`), computed only there:
    the same bilinear map sampled at the same pixel centres (Pillow's ``resize(box=...)``), so a phone
    pastes an object in time ∝ its box, not the photo. -> bool [y1 - y0, x1 - x0]."""
    if box.pad_left or box.pad_top:
        raise ValueError("masks can only be pasted back from a top-left letterbox")
    x0, y0, x1, y1 = mask_region(xyxy, box.height, box.width)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((y1 - y0, x1 - x0), dtype=bool)
    ms = logits.shape[0]
    mw, mh, _ = _resized(box.height, box.width, ms)
    prob = (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).astype(np.float32)[:mh, :mw]
    sx, sy = mw / box.width, mh / box.height  # mask cells per image pixel, as in the whole-image resize
    region = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    crop = Image.fromarray(np.ascontiguousarray(prob)).resize(
        (x1 - x0, y1 - y0), RESAMPLE["bilinear"], box=region
    )
    return np.asarray(crop) > 0.5


def rle_of_region(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict[str, list[int]]:
    """COCO RLE (as :func:`rle_encode`) of an H×W mask that is ``crop`` at (x0, y0) and off elsewhere,
    without building the H×W mask: runs never cross a column, so each column's transitions are found in
    the crop (padded with an off row above and below) and shifted to column-major image positions."""
    size = [int(height), int(width)]
    ch, cw = crop.shape
    if ch == 0 or cw == 0 or not crop.any():
        return {"size": size, "counts": [height * width]}
    padded = np.zeros((cw, ch + 2), dtype=np.int8)  # one row per crop column
    padded[:, 1:-1] = crop.T
    col, row = np.nonzero(np.diff(padded, axis=1))  # transitions, in column-major order
    pos = (x0 + col) * height + (y0 + row)  # image index where a run of on / off starts
    # a run that ends at the bottom of a column and one that starts at the top of the next are one run
    joined = np.flatnonzero(pos[1:] == pos[:-1])
    pos = np.delete(pos, np.concatenate([joined, joined + 1]))
    pos = pos[pos < height * width]  # a run that ends at the last pixel starts nothing after it
    bounds = np.concatenate([[0], pos, [height * width]])
    return {"size": size, "counts": [int(r) for r in np.diff(bounds)]}


def object_mask_rle(
    logits: np.ndarray, box: Letterbox, xyxy: np.ndarray | list[float]
) -> dict[str, list[int]]:
    """One object's mask at the input image's size, as COCO RLE: :func:`paste_mask_in_box` at the
    object's box (``xyxy`` in image pixels, as :func:`boxes_to_image` gives), off outside it."""
    x0, y0, _, _ = mask_region(xyxy, box.height, box.width)
    return rle_of_region(paste_mask_in_box(logits, box, xyxy), x0, y0, box.height, box.width)
