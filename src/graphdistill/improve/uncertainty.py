"""How unsure the student is about an input, read off its own augmented predictions.

The student answers each pool input several ways: the photo, each test-time view of it (``flip``, ``scale``:
:mod:`graphdistill.runner.tta`, mapped back onto the photo) and the question reworded from the template bank
(:func:`paraphrase`). Where those answers disagree the student has not learnt the input, and that is where a
teacher call is worth most (active learning by committee of views; Houlsby et al. 2011's disagreement,
Gal et al. 2017's augmentation variant). Five parts, each in [0, 1], 1 the most unsure:

- ``answer``: 1 − the winning answer's share (answers voted by meaning, :func:`graphdistill.runner.vote.vote_answers`);
- ``boxes``: over the object clusters of the predictions (:func:`~graphdistill.runner.vote.cluster_objects`),
  1 − (share of predictions that found it × mean IoU of its boxes to their fused box);
- ``masks``: 1 − the mean pairwise mask IoU inside each cluster found more than once;
- ``sources``: 1 − the mean pairwise Jaccard overlap of the retrieved document sets;
- ``low_score``: 1 − the mean object score (1 without any object).

The score is their mean. The same predictions, mapped back, are what the self-training arms turn into labels
(:mod:`graphdistill.improve.labels`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from graphdistill.recording.inputs import GENERIC_QUESTIONS, HELDOUT_GENERIC, HELDOUT_LABEL, LABEL_QUESTIONS
from graphdistill.runner.tta import parse_tta, unview_result, view_images
from graphdistill.runner.vote import box_iou_pair, cluster_objects, fused_box, vote_answers

Predict = Callable[[np.ndarray, str], Mapping[str, Any]]
Embedder = Callable[[Sequence[str]], np.ndarray]

PARTS = ("answer", "boxes", "masks", "sources", "low_score")


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{x}"), "(.+?)") + "$", re.IGNORECASE)


def paraphrase(question: str) -> str | None:
    """Another wording of a question from the training template bank (:mod:`graphdistill.recording.inputs`):
    another of :data:`~graphdistill.recording.inputs.LABEL_QUESTIONS` asking about the same object, or another
    generic question; None for a question no template makes. The rewording always comes from the bank training
    inputs are asked from, never from the held-out bank (those words are kept for evaluation), though a question
    of the held-out bank is recognised. Deterministic (the pick hashes the question)."""
    q = question.strip()
    pick = int.from_bytes(hashlib.sha256(q.encode()).digest()[:4], "little")
    for t in (*LABEL_QUESTIONS, *HELDOUT_LABEL):
        m = _template_regex(t).match(q)
        if m:
            others = [o for o in LABEL_QUESTIONS if o != t]
            return others[pick % len(others)].format(x=m.group(1))
    if q in GENERIC_QUESTIONS or q in HELDOUT_GENERIC:
        others = [o for o in GENERIC_QUESTIONS if o != q]
        return others[pick % len(others)]
    return None


@dataclass(frozen=True)
class Disagreement:
    """How unsure the student is about one input (the module docstring's parts)."""

    answer: float
    boxes: float
    masks: float
    sources: float
    low_score: float
    predictions: int  # how many predictions the parts compare

    @property
    def score(self) -> float:
        return float(np.mean([getattr(self, p) for p in PARTS]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score}


def _objects(result: Mapping[str, Any], outputs: Mapping[str, str]) -> list[Mapping[str, Any]]:
    objs: list[Mapping[str, Any]] = []
    for name, kind in outputs.items():
        if kind == "objects":
            objs += list(result.get(name) or [])
    return objs


def _mask_iou(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    from graphdistill.eval.metrics import mask_iou

    return mask_iou(a, b)


def disagreement(
    predictions: Sequence[Mapping[str, Any]], outputs: Mapping[str, str], embedder: Embedder | None = None
) -> Disagreement:
    """The parts of :class:`Disagreement` from several predictions of one input, all in the photo's frame
    (``{output field: value}``; ``outputs``: field -> kind, the graph's)."""
    n = len(predictions)
    if n == 0:
        raise ValueError("disagreement needs at least one prediction")
    answers = [str(p.get(f) or "") for f, k in outputs.items() if k == "text" for p in predictions]
    answer = 1.0 - vote_answers(answers, len(answers), embedder)[1] if answers else 0.0
    per = [_objects(p, outputs) for p in predictions]
    triples = [[(str(o["label"]), o["box"], float(o["score"])) for o in objs] for objs in per]
    clusters = cluster_objects(triples)
    box_parts, mask_parts = [], []
    for c in clusters:
        boxes = [per[p][i]["box"] for p, i in c]
        fused = fused_box(boxes, [float(per[p][i]["score"]) for p, i in c])
        mean_iou = float(np.mean([box_iou_pair(b, fused) for b in boxes]))
        box_parts.append(1.0 - (len(c) / n) * mean_iou)
        masks: list[Mapping[str, Any]] = [m for p, i in c if (m := per[p][i].get("mask"))]
        if len(masks) > 1:
            mask_parts.append(
                1.0 - float(np.mean([_mask_iou(a, b) for a, b in itertools.combinations(masks, 2)]))
            )
    sets = [set(p.get(f) or []) for f, k in outputs.items() if k == "sources" for p in predictions]
    overlaps = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in itertools.combinations(sets, 2)]
    scores = [float(o["score"]) for objs in per for o in objs]
    has_objects = any(k == "objects" for k in outputs.values())
    return Disagreement(
        answer=float(answer),
        boxes=float(np.mean(box_parts)) if box_parts else 0.0,
        masks=float(np.mean(mask_parts)) if mask_parts else 0.0,
        sources=1.0 - float(np.mean(overlaps)) if overlaps else 0.0,
        low_score=(1.0 - float(np.mean(scores)) if scores else 1.0) if has_objects else 0.0,
        predictions=n,
    )


@dataclass(frozen=True)
class Prediction:
    """One of the student's answers to a pool input, mapped back onto the photo: which view of the photo and
    which question it answered."""

    view: str  # "photo", "flip", "scale", "paraphrase"
    question: str
    result: dict[str, Any]


def augmented_predictions(
    image: np.ndarray,
    question: str,
    predict: Predict,
    outputs: Mapping[str, str],
    *,
    augmentations: Sequence[str] = ("flip", "scale"),
    reword: bool = True,
    pad_value: Sequence[int] = (114, 114, 114),
    size: int | None = None,
) -> list[Prediction]:
    """The student's answers to one input: the photo first, then each augmentation's view (mapped back), then
    the photo with the question reworded (:func:`paraphrase`, when ``reword`` and a rewording exists)."""
    made = view_images(image, augmentations, pad_value, size)
    orig = (int(image.shape[0]), int(image.shape[1]))
    out: list[Prediction] = []
    for name, (img, view) in zip(("photo", *parse_tta(augmentations)), made, strict=True):
        out.append(Prediction(name, question, unview_result(predict(img, question), view, outputs, orig)))
    other = paraphrase(question) if reword else None
    if other is not None:
        out.append(Prediction("paraphrase", other, dict(predict(image, other))))
    return out
