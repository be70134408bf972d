"""Test-time augmentation of the teacher's samples: applied when an input is recorded, inverted when its
samples are voted. One module for both directions, and one typed record between them.

A deterministic graph gives the same answer K times; a flipped or rescaled view of the same photo gives it
variety the vote can use. Sample 0 always sees the original; sample i > 0 sees transform
``tta[(i - 1) % len(tta)]``. The trace records what it saw in ``metadata["tta"]`` (:data:`META_TTA`:
:meth:`TTA.to_metadata`), and the filter maps that sample's objects back to the original frame
(:func:`untta_object`) before it votes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphdistill.errors import GraphdistillError
from graphdistill.trace import RLE, ObjectOut, Trace

META_TTA = "tta"  # the trace metadata key of what a sample saw
TTA_CHOICES = ("flip", "scale")
TTA_SCALE = 0.8  # the "scale" view: the photo at 80 % of its size


class TTAError(GraphdistillError, ValueError):
    """An unknown test-time augmentation; the message names it and the choices."""


@dataclass(frozen=True)
class TTA:
    """What one sample saw: the original image of ``orig_size`` (h, w) resized by ``scale`` and, if ``flip``,
    mirrored left to right."""

    flip: bool = False
    scale: float = 1.0
    orig_size: tuple[int, int] = (0, 0)

    @property
    def identity(self) -> bool:
        return not self.flip and self.scale == 1.0

    def to_metadata(self) -> dict[str, Any]:
        return {"flip": self.flip, "scale": self.scale, "orig_size": list(self.orig_size)}

    @classmethod
    def from_metadata(cls, value: Mapping[str, Any]) -> TTA:
        size = value.get("orig_size") or (0, 0)
        return cls(bool(value.get("flip")), float(value.get("scale", 1.0)), (int(size[0]), int(size[1])))


def parse_tta(text: str) -> list[str]:
    """``"flip,scale"`` -> ``["flip", "scale"]``; an unknown name is refused."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in TTA_CHOICES:
            raise TTAError(f"tta {text!r}: unknown transform {t!r} (choose from {', '.join(TTA_CHOICES)})")
    return items


def apply_tta(image: np.ndarray, sample_index: int, tta: Sequence[str]) -> tuple[np.ndarray, TTA]:
    """The view sample ``sample_index`` sees of ``image`` (HxWx3 uint8), and what it is."""
    h, w = int(image.shape[0]), int(image.shape[1])
    if not tta or sample_index == 0:
        return image, TTA(orig_size=(h, w))
    kind = tta[(sample_index - 1) % len(tta)]
    if kind == "flip":
        return np.ascontiguousarray(image[:, ::-1]), TTA(flip=True, orig_size=(h, w))
    from PIL import Image

    size = (max(1, round(w * TTA_SCALE)), max(1, round(h * TTA_SCALE)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return resized, TTA(scale=TTA_SCALE, orig_size=(h, w))


def tta_of(trace: Trace) -> TTA | None:
    """What the trace's sample saw, or None when it saw the original."""
    value = trace.metadata.get(META_TTA)
    if not isinstance(value, Mapping):
        return None
    tta = TTA.from_metadata(value)
    return None if tta.identity else tta


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if mask.shape == (h, w):
        return mask
    ys = np.minimum((np.arange(h) + 0.5) * mask.shape[0] / h, mask.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(w) + 0.5) * mask.shape[1] / w, mask.shape[1] - 1).astype(int)
    resized: np.ndarray = mask[ys][:, xs]
    return resized


def untta_object(obj: ObjectOut, tta: TTA) -> ObjectOut:
    """Map one object seen on an augmented image back to the original image's frame."""
    scale = tta.scale
    oh, ow = tta.orig_size
    aw = round(ow * scale)
    x1, y1, x2, y2 = obj.box
    if tta.flip:
        x1, x2 = aw - x2, aw - x1
    box = [
        float(np.clip(x1 / scale, 0, ow)),
        float(np.clip(y1 / scale, 0, oh)),
        float(np.clip(x2 / scale, 0, ow)),
        float(np.clip(y2 / scale, 0, oh)),
    ]
    mask = None
    if obj.mask is not None:
        m = obj.mask.decode()
        if tta.flip:
            m = m[:, ::-1]
        mask = RLE.encode(_resize_mask(m, (oh, ow)))
    return obj.model_copy(update={"box": box, "mask": mask})
