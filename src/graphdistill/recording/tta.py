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

from graphdistill.runner.preprocess import rle_resize
from graphdistill.runner.tta import TTA_CHOICES, TTA_SCALE, TTAError, unview_box
from graphdistill.runner.tta import parse_tta as parse_views
from graphdistill.trace import RLE, ObjectOut, Trace

META_TTA = "tta"  # the trace metadata key of what a sample saw
__all__ = [
    "META_TTA",
    "TTA",
    "TTA_CHOICES",
    "TTA_SCALE",
    "TTAError",
    "apply_tta",
    "parse_tta",
    "tta_of",
    "untta_object",
]


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
    """``"flip,scale"`` -> ``["flip", "scale"]``; an unknown name is refused (the student's test-time views
    take the same names: :func:`graphdistill.runner.tta.parse_tta`)."""
    return list(parse_views(text))


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


def untta_object(obj: ObjectOut, tta: TTA) -> ObjectOut:
    """Map one object seen on an augmented image back to the original image's frame (the geometry the
    student's test-time views are undone with: :func:`graphdistill.runner.tta.unview_box` and
    :func:`graphdistill.runner.preprocess.rle_resize`)."""
    box = unview_box(obj.box, tta.flip, tta.scale, tta.orig_size)
    mask = None
    if obj.mask is not None:
        mask = RLE(
            **rle_resize({"size": obj.mask.size, "counts": obj.mask.counts}, tta.orig_size, flip=tta.flip)
        )
    return obj.model_copy(update={"box": box, "mask": mask})
