"""Image in, model input out; model boxes and masks back to the input image. numpy + Pillow only.

The rule (``manifest["preprocessing"]``; the keys below are its fields):
1. RGB ``uint8`` H×W×3 (grayscale is repeated to 3 channels, alpha is dropped);
2. ``letterbox``: scale by ``s = size / max(H, W)`` to ``w' × h' = round(W·s) × round(H·s)`` (each
   clamped to 1..size) with Pillow's ``interpolation`` filter and ``reducing_gap`` (when the spec has one:
   first ``Image.reduce`` by the largest integer factor ``k`` with ``W / k >= w' * reducing_gap`` (and the
   same for the height), a box average, then the filter), paste it on a ``size × size`` canvas filled
   with ``pad_value``: at the top-left corner (``align: top-left``, the student's rule) or centred
   (``align: center``: ``((size - w') // 2, (size - h') // 2)``);
3. ``x = (pixel / 255 - mean) / std`` per channel (each step in float32), ``float32``, N = 1, laid out as
   ``layout`` says: ``NCHW`` (planes; the student's own loader, ONNX bundles) or ``NHWC`` (pixels with their 3
   channels together; ExecuTorch bundles, whose XNNPACK convolutions read NHWC, so the program need not
   transpose its input).

Model outputs live on that square canvas: boxes are ``cx, cy, w, h`` in 0..1 of the canvas, masks are
``mask_size × mask_size`` logits over the whole canvas. :func:`boxes_to_image` and :func:`paste_mask`
undo the letterbox exactly as the PyTorch predictor (``graphdistill.student.predict``) does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """A path or an array -> H×W×3 uint8 RGB. A path is read as everywhere else in graphdistill
    (:func:`graphdistill.images.load_image`, numpy + Pillow as well: EXIF rotation, 16-bit, CMYK, palette,
    the first frame of an animation, a pixel cap instead of a decompression bomb; ``ImageError`` naming the
    file)."""
    if isinstance(image, (str, Path)):
        from graphdistill.images import load_image

        return load_image(image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image array must be H×W×3 RGB, got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3])


def canvas_size(spec: Mapping[str, Any]) -> int:
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


class Preprocessor:
    """The rule above for one ``spec``, with what does not depend on the image made once: the canvas filled
    with ``pad_value`` (filling it per query took longer than the resize) and the per-channel mean and std as
    float32. Call it on each image."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        if (
            spec.get("resize") != "letterbox"
            or spec.get("layout") not in ("NCHW", "NHWC")
            or spec.get("dtype") != "float32"
        ):
            raise ValueError(f"unsupported preprocessing {spec}")
        self.size = size = canvas_size(spec)
        self.layout = str(spec["layout"])
        self.align = spec.get("align", "top-left")
        self.resample = RESAMPLE[spec.get("interpolation", "bilinear")]
        self.reducing_gap = spec.get("reducing_gap")
        self.canvas = np.empty((size, size, 3), dtype=np.uint8)
        self.canvas[:] = np.asarray(spec.get("pad_value", [0, 0, 0]), dtype=np.uint8)
        mean, std = np.asarray(spec["mean"], dtype=np.float32), np.asarray(spec["std"], dtype=np.float32)
        if self.layout == "NCHW":  # broadcast over a [3, S, S] plane stack
            self.mean, self.std = mean[:, None, None], std[:, None, None]
        else:  # over the rows of an [S, S * 3] view: each row is S pixels of 3 channels
            self.mean, self.std = np.tile(mean, size), np.tile(std, size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        s = self.size
        return (1, 3, s, s) if self.layout == "NCHW" else (1, s, s, 3)

    def __call__(self, rgb: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, Letterbox]:
        """H×W×3 uint8 -> (float32 [1, 3, size, size] or, NHWC, [1, size, size, 3], where the image sits on
        the canvas); written into ``out`` when given (e.g. the runtime's own input buffer)."""
        h, w = rgb.shape[:2]
        box = letterbox_geometry(h, w, self.size, self.align)
        new_w, new_h, _ = _resized(h, w, self.size)
        resized = Image.fromarray(rgb).resize((new_w, new_h), self.resample, reducing_gap=self.reducing_gap)
        canvas = self.canvas.copy()
        canvas[box.pad_top : box.pad_top + new_h, box.pad_left : box.pad_left + new_w] = np.asarray(resized)
        x = np.empty(self.shape, dtype=np.float32) if out is None else out
        if x.shape != self.shape or not x.flags.c_contiguous:
            raise ValueError(f"output buffer must be a contiguous {self.shape} array, got {x.shape}")
        # (pixel / 255 - mean) / std, each step in float32 (faster than a lookup table of the 256 values:
        # np.take widens every uint8 index to intp first); NCHW: HWC -> CHW on the way
        if self.layout == "NCHW":
            np.divide(canvas.transpose(2, 0, 1), np.float32(255.0), out=x[0], dtype=np.float32)
            y = x[0]
        else:
            np.divide(canvas, np.float32(255.0), out=x[0], dtype=np.float32)
            y = x[0].reshape(self.size, self.size * 3)
        y -= self.mean
        y /= self.std
        return x, box


def preprocess(rgb: np.ndarray, spec: Mapping[str, Any]) -> tuple[np.ndarray, Letterbox]:
    """H×W×3 uint8 -> (float32 [1, 3, size, size], where the image sits on the canvas)."""
    return Preprocessor(spec)(rgb)


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
    """COCO uncompressed RLE (``graphdistill.trace.RLE`` encodes and decodes with these two functions):
    column-major runs, first run counts zeros (0 when the first pixel is on)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [0]}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def rle_decode(size: list[int] | tuple[int, int], counts: list[int]) -> np.ndarray:
    """COCO uncompressed RLE (:func:`rle_encode`'s format) -> H×W bool mask."""
    h, w = int(size[0]), int(size[1])
    runs = np.asarray(counts, dtype=np.int64)
    if int(runs.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(runs.sum())} but size {[h, w]} has {h * w} pixels")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True  # runs alternate off, on, off, ...
    return np.repeat(values, runs).reshape((h, w), order="F")


def _parity_positions(pos: np.ndarray) -> np.ndarray:
    """Sorted change positions with those that occur an even number of times removed (two changes on one
    pixel cancel)."""
    pos = np.sort(pos)
    if not pos.size:
        return pos
    first = np.concatenate([[0], np.flatnonzero(pos[1:] != pos[:-1]) + 1])
    return np.asarray(pos[first[np.diff(np.concatenate([first, [pos.size]])) % 2 == 1]])


def _rle_from_changes(changes: np.ndarray, height: int, width: int) -> dict[str, list[int]]:
    """Flat column-major positions where the mask switches (off before the first) -> COCO RLE."""
    n = height * width
    bounds = np.concatenate([[0], changes[changes < n], [n]])
    return {"size": [int(height), int(width)], "counts": np.diff(bounds).tolist()}


def rle_resize(
    rle: Mapping[str, Any],
    size: tuple[int, int],
    region: tuple[int, int] | None = None,
    flip: bool = False,
) -> dict[str, list[int]]:
    """A mask (COCO RLE) -> its nearest-neighbour resize to ``size`` (h, w), as COCO RLE: output pixel (y, x)
    reads source pixel (⌊(y + ½)·rh/h⌋, ⌊(x + ½)·rw/w⌋) of the source's top-left ``region`` (rh, rw; default:
    all of it), its columns mirrored first when ``flip``. Computed from the source's on/off switches, without
    any output-sized array: a test-time view's mask (a few hundred pixels a side) goes back onto a photo of
    millions in well under a millisecond."""
    src = rle_decode(rle["size"], rle["counts"])
    rh, rw = region if region is not None else src.shape
    h, w = int(size[0]), int(size[1])
    src = src[:rh, :rw]
    if flip:
        src = src[:, ::-1]
    if h * w == 0 or src.size == 0:
        return {"size": [h, w], "counts": [h * w]}
    sy = np.minimum(((np.arange(h) + 0.5) * rh / h).astype(np.int64), rh - 1)
    sx = np.minimum(((np.arange(w) + 0.5) * rw / w).astype(np.int64), rw - 1)
    # down each source column: rows r where the mask switches between r - 1 and r; output row: first y with
    # sy[y] >= r (a switch at or above sy[0] is already in the column's first value)
    r, c = np.nonzero(src[1:] != src[:-1])
    y = np.searchsorted(sy, r + 1, side="left")
    keep = (y >= 1) & (y < h)
    y, c = y[keep], c[keep]
    order = np.argsort(c, kind="stable")
    y, c = y[order], c[order]
    per_col = np.bincount(c, minlength=rw)
    start = np.concatenate([[0], np.cumsum(per_col)[:-1]])
    # every output column x repeats the switches of its source column sx[x]
    n_x = per_col[sx]
    xs = np.repeat(np.arange(w), n_x)
    offs = np.arange(int(n_x.sum())) - np.repeat(np.cumsum(n_x) - n_x, n_x)
    inside = xs * h + y[np.repeat(start[sx], n_x) + offs]
    first = src[sy[0], sx]  # each output column's first value
    last = src[sy[-1], sx]  # and its last
    before = np.concatenate([[False], last[:-1]])
    at_top = np.arange(w)[first != before] * h
    return _rle_from_changes(_parity_positions(np.concatenate([at_top, inside])), h, w)


def rle_majority(rles: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Pixel majority of masks of one size (COCO RLE): on where more than half of them are, as COCO RLE,
    computed from their runs (no pixel array)."""
    h, w = (int(v) for v in rles[0]["size"])
    pos, delta = [], []
    for m in rles:
        if [int(v) for v in m["size"]] != [h, w]:
            raise ValueError(f"masks of sizes {rles[0]['size']} and {m['size']} cannot be voted")
        ends = np.cumsum(np.asarray(m["counts"], dtype=np.int64))[:-1]  # a run ends: the state flips
        pos.append(ends)
        delta.append(np.where(np.arange(len(ends)) % 2 == 0, 1, -1))  # off -> on, on -> off, ...
    p, d = np.concatenate(pos), np.concatenate(delta)
    if not p.size:
        return {"size": [h, w], "counts": [h * w]}
    order = np.argsort(p, kind="stable")
    p, d = p[order], d[order]
    at = np.concatenate([[0], np.flatnonzero(p[1:] != p[:-1]) + 1])
    on = np.cumsum(np.add.reduceat(d, at)) * 2 > len(rles)  # from each distinct position on
    prev = np.concatenate([[False], on[:-1]])
    return _rle_from_changes(p[at][on != prev], h, w)


def mask_region(xyxy: np.ndarray | list[float], height: int, width: int) -> tuple[int, int, int, int]:
    """The pixels a mask may cover: ``floor(x1) <= x < ceil(x2)``, ``floor(y1) <= y < ceil(y2)``, clipped
    to the image -> (x0, y0, x1, y1) as ints (empty when x1 <= x0 or y1 <= y0)."""
    x0, y0 = max(0, int(np.floor(xyxy[0]))), max(0, int(np.floor(xyxy[1])))
    x1, y1 = min(width, int(np.ceil(xyxy[2]))), min(height, int(np.ceil(xyxy[3])))
    return x0, y0, max(x0, x1), max(y0, y1)


def object_mask_rle(
    logits: np.ndarray, box: Letterbox, xyxy: np.ndarray | list[float]
) -> dict[str, list[int]]:
    """One object's mask at the input image's size, as COCO RLE (:func:`rle_encode`'s format).

    The rule: ``p = sigmoid(logits)``, the top-left ``round(H*m) × round(W*m)`` cells (``m = mask_size /
    max(H, W)``, each clamped to 1..mask_size: the cells covering the image, as in :func:`paste_mask`);
    pixel ``(y, x)`` reads that grid bilinearly at cell coordinates ``((y + .5)·mh/H - .5, (x + .5)·mw/W -
    .5)`` (cell centres at integers, clamped at the edges: ``np.interp`` in each direction, the same map
    as :func:`paste_mask`'s Pillow resize up to float rounding); it is on where that value > 0.5 and it lies
    in the object's box (:func:`mask_region`); off everywhere else.

    Computed without any H×W (or box-sized) array: the map is linear between cell centres, so each
    column's on/off switches are solved from the ``mh - 1`` segments of its column profile; the cost is
    ``mh × box width``, well under what resizing and encoding a full-resolution mask would take."""
    if box.pad_left or box.pad_top:
        raise ValueError("masks can only be pasted back from a top-left letterbox")
    height, width = box.height, box.width
    x0, y0, x1, y1 = mask_region(xyxy, height, width)
    if x1 <= x0 or y1 <= y0:
        return {"size": [int(height), int(width)], "counts": [height * width]}
    mw, mh, _ = _resized(height, width, logits.shape[0])
    grid = 1.0 / (1.0 + np.exp(-logits[:mh, :mw].astype(np.float64)))
    n = x1 - x0
    # each column of the box, read across: profile[k, c] = the map at cell row k, image column x0 + c
    u = (np.arange(x0, x1) + 0.5) * (mw / width) - 0.5
    left = np.clip(np.floor(u), 0, max(mw - 2, 0)).astype(np.int64)
    frac = np.clip(u - left, 0.0, 1.0)
    right = np.minimum(left + 1, mw - 1)
    profile = np.take(grid, left, axis=1)  # np.take: several times faster than grid[:, left]
    profile *= 1.0 - frac
    profile += np.take(grid, right, axis=1) * frac  # [mh, box width]
    # down each column: where the segment between cell rows k and k + 1 crosses 0.5, and which way
    on = profile > 0.5
    at = np.flatnonzero(on[:-1] != on[1:])  # into the flattened [mh - 1, n] (= [mh, n] up to the last row)
    k_idx, col = np.divmod(at, n)
    ka, kb = profile.ravel()[at], profile.ravel()[at + n]
    t = k_idx + (0.5 - ka) / (kb - ka)  # cell row of the crossing
    y_cross = (t + 0.5) * (height / mh) - 0.5  # the same point in image rows
    rising = on.ravel()[at + n]
    y_switch = np.where(rising, np.floor(y_cross) + 1, np.ceil(y_cross)).astype(np.int64)
    # state at the box's top row: the state above the first cell row, flipped by every earlier switch
    before = np.bincount(col[y_switch <= y0], minlength=n)
    start_on = on[0] ^ (before % 2 == 1)
    inside = (y_switch > y0) & (y_switch < y1)
    end_on = start_on ^ (np.bincount(col[inside], minlength=n) % 2 == 1)
    cols = np.arange(n)
    pos = np.sort(
        np.concatenate(
            [
                (x0 + cols[start_on]) * height + y0,  # a run of on starts at the box's top
                (x0 + col[inside]) * height + y_switch[inside],  # switches inside the box
                (x0 + cols[end_on]) * height + y1,  # ... and stops at its bottom
            ]
        )
    )
    # switches that land on one pixel cancel in pairs (a run that ends where the next starts: bottom of
    # one column and top of the next, or several crossings between two pixel centres): keep a position
    # that occurs an odd number of times; nothing starts after the last pixel
    return _rle_from_changes(_parity_positions(pos), height, width)
