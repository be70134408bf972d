"""The object-detector teacher: an Ultralytics YOLO model, fully offline, returning :class:`Detections`.

Ultralytics works in BGR and mutates process-wide state on its first predict (it sets torch's thread count
to cores - 1); this adapter hides both: it takes RGB ``uint8`` arrays (the graph's image convention) and
restores torch's thread count after every call.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from graphdistill._env import apply_offline_env
from graphdistill._lazy import require
from graphdistill.images import to_rgb_uint8
from graphdistill.trace import Detections
from graphdistill.weights import REGISTRY, WeightsError, resolve

log = logging.getLogger(__name__)


def _pick_device(device: str | None) -> str:
    """``None`` -> "cuda" when a GPU is usable, else "cpu"; anything else is passed through."""
    if device:
        return device
    torch = require("torch", purpose="the YOLO detector")
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Ultralytics calls ``torch.set_num_threads`` during predict; put the caller's setting back."""
    torch = require("torch")
    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _as_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like -> numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def results_to_detections(result: Any, names: Sequence[str]) -> Detections:
    """Convert one Ultralytics ``Results`` (duck-typed: ``.boxes.{xyxy,cls,conf}``, ``.orig_shape``)."""
    h, w = (int(v) for v in result.orig_shape[:2])
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return Detections(image_size=[h, w])
    xyxy = _as_numpy(boxes.xyxy).astype(np.float64).reshape(-1, 4)
    # clip to the image: the model can return boxes a fraction of a pixel outside it
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
    cls = _as_numpy(boxes.cls).astype(np.int64).reshape(-1)
    conf = _as_numpy(boxes.conf).astype(np.float64).reshape(-1)
    return Detections(
        xyxy=[[float(v) for v in b] for b in xyxy],
        class_ids=[int(c) for c in cls],
        names=[names[int(c)] for c in cls],
        scores=[float(s) for s in conf],
        image_size=[h, w],
    )


class YoloDetector:
    """Ultralytics YOLO as a teacher: ``detect(rgb) -> Detections``, ``detect_batch([rgb, ...])``.

    ``weights`` is a registry name (see ``graphdistill weights list``) or a local ``.pt`` path; ``classes``
    restricts detections to those class names. Inference is deterministic (YOLO draws no random numbers);
    ``seed`` is kept for the common teacher interface, and deliberately not applied to torch's global RNG
    (other graph nodes may be sampling from it in parallel threads).
    """

    max_batch = 16  # images per model call: bounds the letterboxed batch tensor's memory

    def __init__(
        self,
        weights: str | os.PathLike[str] = "yolo11n",
        device: str | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        classes: list[str] | None = None,
        imgsz: int = 640,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= conf <= 1.0:
            raise ValueError(f"conf must be in [0, 1], got {conf}")
        if not 0.0 <= iou <= 1.0:
            raise ValueError(f"iou must be in [0, 1], got {iou}")
        if imgsz < 32:
            raise ValueError(f"imgsz must be at least 32 pixels, got {imgsz}")
        path, sha = resolve(weights)
        apply_offline_env()  # before ultralytics is imported: no hub, no auto-install, local font
        require("torch", purpose="the YOLO detector")
        ultralytics = require("ultralytics", purpose="the YOLO detector")
        self.device = _pick_device(device)
        self.conf = float(conf)
        self.iou = float(iou)
        self.imgsz = int(imgsz)
        self.seed = int(seed)
        self.weights_path = Path(path)
        self.weights_arg = weights
        self.weights_sha256 = sha
        name = os.fspath(weights)
        self.model_id = REGISTRY[name].model_id if name in REGISTRY else f"ultralytics YOLO ({path.name})"
        with _keep_torch_threads():
            self._model = ultralytics.YOLO(str(path), task="detect")
        raw = self._model.names
        self.names: list[str] = (
            [str(raw[i]) for i in sorted(raw)] if isinstance(raw, dict) else [str(n) for n in raw]
        )
        self.classes = list(classes) if classes is not None else None
        self._class_ids = self._resolve_classes(self.classes)
        # Set ultralytics' predictor up now, on a tiny blank image: its setup changes torch's thread count
        # for the rest of that call, so a first real image would run on other threads than later ones and
        # come out different at float precision.
        self._predict([np.zeros((32, 32, 3), dtype=np.uint8)])
        log.info("loaded %s from %s on %s", self.model_id, path, self.device)

    def _resolve_classes(self, classes: list[str] | None) -> list[int] | None:
        if classes is None:
            return None
        index = {n: i for i, n in enumerate(self.names)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(
                f"unknown class name(s) {unknown} for detector {self.model_id}; valid names: "
                f"{', '.join(self.names)}"
            )
        return [index[c] for c in classes]

    def detect(self, image: np.ndarray) -> Detections:
        """Detect objects in one RGB ``uint8`` HxWx3 image; boxes are xyxy pixels of that image."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect in several images; one :class:`Detections` per image, same order.

        Images of one size go through the model together (up to ``max_batch`` per call).
        """
        if len(images) == 0:
            return []
        # ultralytics reads numpy arrays as BGR (OpenCV convention)
        bgr = [
            np.ascontiguousarray(to_rgb_uint8(img, f"detector input #{i}")[:, :, ::-1])
            for i, img in enumerate(images)
        ]
        # one model call per image size: ultralytics letterboxes a mixed-size batch to a common square, which
        # changes the boxes; grouping keeps a result independent of whatever else was in the batch
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(bgr):
            groups.setdefault(img.shape, []).append(i)
        out: list[Detections | None] = [None] * len(bgr)
        for same_size in groups.values():
            for start in range(0, len(same_size), self.max_batch):
                idx = same_size[start : start + self.max_batch]
                for i, r in zip(idx, self._predict([bgr[i] for i in idx]), strict=True):
                    out[i] = results_to_detections(r, self.names)
        return [d for d in out if d is not None]

    def _predict(self, bgr: list[np.ndarray]) -> list[Any]:
        torch = require("torch")
        # No RNG is touched here: YOLO inference draws no random numbers, and saving/restoring torch's
        # global RNG (fork_rng) would clobber draws that a sampling LLM makes in another graph thread.
        with _keep_torch_threads(), torch.inference_mode():
            return list(
                self._model.predict(
                    bgr,
                    conf=self.conf,
                    iou=self.iou,
                    imgsz=self.imgsz,
                    classes=self._class_ids,
                    device=self.device,
                    verbose=False,
                    save=False,
                )
            )

    def student_offer(self) -> dict[str, Any]:
        """The student may start from this detector: its trunk (backbone + neck) and its dense detection head
        (see :func:`load_student_start`). A JSON reference the graph schema records for the detect node."""
        name = os.fspath(self.weights_arg)
        licence = REGISTRY[name].licence if name in REGISTRY else "AGPL-3.0 (Ultralytics YOLO weights)"
        return {
            "kind": "ultralytics-detect",
            "weights": name if name in REGISTRY else str(self.weights_path.resolve()),
            "weights_sha256": self.weights_sha256,
            "model_id": self.model_id,
            "licence": licence,
            "imgsz": self.imgsz,
            "conf": self.conf,
            "iou": self.iou,
            "names": list(self.names),
        }

    def __repr__(self) -> str:
        return f"YoloDetector({self.model_id!r}, device={self.device!r}, conf={self.conf}, iou={self.iou})"


def load_student_start(ref: dict[str, Any]) -> Any:
    """A YOLO detector's offer (:meth:`YoloDetector.student_offer`) -> ``teachers.base.StudentStart``: the
    Ultralytics model's YAML (to rebuild its architecture) and its float weights. The weights are resolved as
    the detector resolved them and must still have the recorded sha256."""
    from graphdistill.teachers.base import OfferError, StudentStart

    try:
        path, sha = resolve(ref["weights"])
    except (KeyError, OSError, ValueError, WeightsError) as exc:
        raise OfferError(
            f"detector offer {ref.get('weights')!r}: cannot resolve its weights ({exc})"
        ) from exc
    if ref.get("weights_sha256") and sha != ref["weights_sha256"]:
        raise OfferError(
            f"detector offer {ref['weights']!r}: the weights' sha256 {sha[:12]}… is not the recorded "
            f"{str(ref['weights_sha256'])[:12]}… (the file changed since the traces were recorded)"
        )
    apply_offline_env()
    torch = require("torch", purpose="starting the student from the YOLO detector")
    require("ultralytics", purpose="starting the student from the YOLO detector")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]) if isinstance(ckpt, dict) else ckpt
    yaml = getattr(model, "yaml", None)
    if not isinstance(yaml, dict) or type(model.model[-1]).__name__ != "Detect":
        raise OfferError(
            f"detector offer {ref['weights']!r}: not an Ultralytics detection model (no Detect head)"
        )
    raw = model.names
    names = [str(raw[i]) for i in sorted(raw)] if isinstance(raw, dict) else [str(n) for n in raw]
    return StudentStart(
        kind="ultralytics-detect",
        spec=json.loads(json.dumps(yaml, default=str)),
        state_dict={k: v.detach().float().clone() for k, v in model.state_dict().items()},
        class_names=names,
        input_size=int(ref.get("imgsz", 640)),
        score_threshold=float(ref.get("conf", 0.25)),
        nms_iou=float(ref.get("iou", 0.7)),
        model_id=str(ref.get("model_id", path.name)),
        weights_sha256=sha,
        licence=str(ref.get("licence", "AGPL-3.0")),
    )
