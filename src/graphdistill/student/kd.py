"""The teacher detector's own per-cell outputs, as soft targets for a student started from it.

A trace records the detector's final boxes only; its per-cell class probabilities and box distributions are
richer targets (every cell, background included, says what the detector believes there) and cost one forward
pass of the detector per training image, so the trainer computes them once, here, from the weights the detector
offered (``teachers.base.StudentStart``), and keeps them in memory.

The detector runs at **twice** the student's input size on the same letterboxed canvas. Its stride-16 and
stride-32 cells then cover exactly the image regions of the student's stride-8 and stride-16 cells (same grid,
same row-major order), at the same object scale, and its box distributions count distances in units of its
stride, which are the student's stride in the student's pixels: the targets line up cell for cell and bin for
bin, with no resampling. (The student's stride-32 cells have no counterpart; they learn from the assigned
final boxes alone.) At 320 px that is the detector's own 640; at the default 448, 896.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from graphdistill.student.loader import UNIT, preprocess_image
from graphdistill.student.trunks import UltralyticsTrunk, level_sizes

log = logging.getLogger(__name__)


class DetectorTargets:
    """``targets(image)`` -> the detector's class probabilities [C, N] and box-distribution logits [4·R, N] for
    the student's first N cells (strides 8 and 16 of an ``image_size``² input), float16 (they are kept for
    every training image)."""

    def __init__(self, start: Any, image_size: int, device: str | torch.device = "cpu") -> None:
        self.size = 2 * image_size
        self.device = torch.device(device)
        self.trunk = UltralyticsTrunk(start.spec, len(start.class_names))
        self.trunk.load_ultralytics(start.state_dict)
        self.trunk.eval().to(self.device)
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.cells = sum(level_sizes(image_size)[:2])

    @torch.no_grad()
    def targets(self, images: Sequence[Any]) -> list[tuple[Tensor, Tensor]]:
        x = torch.stack([preprocess_image(im, self.size, mean=UNIT[0], std=UNIT[1])[0] for im in images])
        feats = self.trunk(x.to(self.device))
        head: Any = self.trunk.head
        cls = torch.cat([head.cv3[i](feats[i]).flatten(2) for i in (1, 2)], 2).sigmoid()
        dist = torch.cat([head.cv2[i](feats[i]).flatten(2) for i in (1, 2)], 2)
        assert cls.shape[2] == self.cells, (cls.shape, self.cells)
        return [(c.half().cpu(), d.half().cpu()) for c, d in zip(cls, dist, strict=True)]


def cached_targets(
    detector: DetectorTargets,
    keys: Sequence[str],
    image_of: Callable[[int], Any],
    *,
    batch: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> Callable[[int], dict[str, Tensor]]:
    """Compute the targets once per distinct image (``keys[i]``: row i's image id; rows that share an image,
    such as a photo's counterfactual replays, share them) -> ``row index -> {kd_cls, kd_dist, kd_valid}``."""
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    todo = list(first.items())
    cache: dict[str, tuple[Tensor, Tensor]] = {}
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        for (key, _), t in zip(chunk, detector.targets([image_of(i) for _, i in chunk]), strict=True):
            cache[key] = t
        if progress:
            progress("detector targets", min(start + batch, len(todo)), len(todo))
    log.info("detector targets for %d distinct images (%d rows)", len(cache), len(keys))

    def get(i: int) -> dict[str, Tensor]:
        c, d = cache[keys[i]]
        return {"kd_cls": c, "kd_dist": d, "kd_valid": torch.tensor(True)}

    return get
