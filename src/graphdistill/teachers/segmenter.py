"""The segmenter teacher: SAM driven by box prompts, returning one COCO RLE mask per box (:class:`Masks`).

The default is MobileSAM (TinyViT image encoder + SAM's prompt encoder and mask decoder), built from the
``mobile_sam`` package and driven by ``segment_anything.SamPredictor`` (the same predictor gives the
identical mask). ``vit_b`` / ``vit_l`` / ``vit_h`` are the original SAM, from a checkpoint the user supplies.

Per image the (expensive) image encoder runs once, and every box of that image goes through the mask
decoder in one batched call.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill._lazy import require
from graphdistill.images import to_rgb_uint8
from graphdistill.trace import RLE, Detections, Masks
from graphdistill.weights import REGISTRY, resolve

log = logging.getLogger(__name__)

MODEL_TYPES = ("vit_t", "vit_b", "vit_l", "vit_h")

Boxes = Detections | np.ndarray | Sequence[Sequence[float]]


def _pick_device(device: str | None) -> str:
    if device:
        return device
    torch = require("torch", purpose="the SAM segmenter")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _import_mobile_sam() -> Any:
    # mobile_sam re-registers TinyViT names in timm's registry and imports timm's deprecated paths; both
    # warn at import time, harmlessly. Silence exactly those so that callers running with -W error work.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit", category=UserWarning)
        return require("mobile_sam", purpose="the MobileSAM segmenter")


def _load_state_dict(path: Path, torch: Any) -> dict[str, Any]:
    """Read a SAM checkpoint without executing pickled code (tensors only); never touches the network."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file, or a pickle that holds more than tensors
        raise ValueError(
            f"SAM checkpoint {path} could not be read as a tensors-only state dict ({exc.__class__.__name__}: "
            f"{exc})"
        ) from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def boxes_array(boxes: Boxes, label: str = "boxes") -> np.ndarray:
    """Detections / an (n, 4) array / a list of [x1, y1, x2, y2] -> float32 (n, 4)."""
    raw = boxes.xyxy if isinstance(boxes, Detections) else boxes
    arr = np.asarray(raw, dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{label}: expected n boxes of 4 numbers [x1, y1, x2, y2], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{label}: boxes contain NaN or infinite coordinates")
    return arr


class SamSegmenter:
    """SAM with box prompts as a teacher: ``segment(rgb, boxes) -> Masks`` (one mask per box, same order).

    ``weights`` is a registry name or a local checkpoint path; ``model_type`` picks the architecture the
    checkpoint belongs to ("vit_t" = MobileSAM, or SAM's "vit_b" / "vit_l" / "vit_h").
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] = "mobile_sam",
        model_type: str = "vit_t",
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown SAM model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        path, sha = resolve(weights)
        torch = require("torch", purpose="the SAM segmenter")
        segment_anything = require("segment_anything", purpose="the SAM segmenter")
        self.device = _pick_device(device)
        self.model_type = model_type
        self.seed = int(seed)
        self.weights_path = Path(path)
        self.weights_sha256 = sha
        name = os.fspath(weights)
        self.model_id = (
            REGISTRY[name].model_id if name in REGISTRY else f"SAM {model_type} ({self.weights_path.name})"
        )
        # build empty, then load the weights ourselves: the libraries' own loaders call torch.load without
        # weights_only (arbitrary pickle) and without map_location (fails for GPU checkpoints on a CPU).
        # The throwaway init draws from a private, seeded RNG so the caller's RNG state is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if model_type == "vit_t":
                sam = _import_mobile_sam().sam_model_registry["vit_t"](checkpoint=None)
            else:
                sam = segment_anything.sam_model_registry[model_type](checkpoint=None)
        state = _load_state_dict(self.weights_path, torch)
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"SAM checkpoint {self.weights_path} does not match model_type {model_type!r} "
                f"(is it a checkpoint of another SAM size?): {str(exc).splitlines()[0]}"
            ) from exc
        sam.to(self.device).eval()
        self._sam = sam
        self._predictor = segment_anything.SamPredictor(sam)
        log.info("loaded %s from %s on %s", self.model_id, self.weights_path, self.device)

    def segment(self, image: np.ndarray, boxes: Boxes) -> Masks:
        """Masks for ``boxes`` (xyxy pixels of ``image``, RGB uint8 HxWx3), one per box, same order.

        With no boxes the image encoder does not run and the result is empty.
        """
        rgb = to_rgb_uint8(image, "segmenter input")
        if isinstance(boxes, Detections) and list(boxes.image_size) != list(rgb.shape[:2]):
            raise ValueError(
                f"the detections are for a {boxes.image_size[0]}x{boxes.image_size[1]} image (h x w) but the "
                f"image to segment is {rgb.shape[0]}x{rgb.shape[1]}; pass the image they were detected on"
            )
        box_arr = boxes_array(boxes)
        if len(box_arr) == 0:
            return Masks()
        torch = require("torch")
        predictor = self._predictor
        with torch.inference_mode():
            predictor.set_image(rgb, image_format="RGB")
            try:
                h, w = rgb.shape[:2]
                t_boxes = torch.as_tensor(box_arr, dtype=torch.float32, device=predictor.device)
                t_boxes = predictor.transform.apply_boxes_torch(t_boxes, (h, w))
                masks, iou, _ = predictor.predict_torch(
                    point_coords=None, point_labels=None, boxes=t_boxes, multimask_output=False
                )
            finally:
                predictor.reset_image()  # drop the embedding: it is large and belongs to this image only
        mask_np = masks[:, 0].cpu().numpy()
        scores = iou[:, 0].float().cpu().numpy()
        return Masks(rles=[RLE.encode(m) for m in mask_np], scores=[float(s) for s in scores])

    def segment_batch(self, images: Sequence[np.ndarray], boxes_per_image: Sequence[Boxes]) -> list[Masks]:
        """``segment`` for each (image, boxes) pair. Images go through the encoder one at a time: on a CPU
        batching them is slower per image, and it would need every image's embedding in memory at once."""
        if len(images) != len(boxes_per_image):
            raise ValueError(
                f"segment_batch got {len(images)} images but {len(boxes_per_image)} box lists; "
                "pass one list of boxes per image"
            )
        return [self.segment(img, bxs) for img, bxs in zip(images, boxes_per_image, strict=True)]

    def __repr__(self) -> str:
        return f"SamSegmenter({self.model_id!r}, model_type={self.model_type!r}, device={self.device!r})"
