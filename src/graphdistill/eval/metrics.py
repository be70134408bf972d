"""Fidelity of a student to its teacher, one metric family per output of the teacher graph.

The teacher's outputs are the ground truth: a student that reproduces the teacher exactly scores 1.0
everywhere, one that outputs nothing scores 0. Every function takes two parallel lists of output dicts in the
shape of the teacher graph's final output (``{"answer": str, "objects": [ObjectOut | dict], "sources":
[doc id]}``), so the same code scores a PyTorch student, an exported bundle (parity checks) or the teacher
against human labels. A graph whose outputs have other names (``reply``, ``things``) is brought to that
shape by :func:`canonical_output`, which picks each field by its declared kind.

- answers: SQuAD-normalised exact match, SQuAD token F1, and meaning agreement (cosine of sentence
  embeddings >= a threshold; the embedder is injectable).
- objects: box mAP@0.5, mAP@0.5:0.95 and per-class AP from torchmetrics ``MeanAveragePrecision``
  (faster-coco-eval backend); mask mean IoU over teacher objects matched by class + box IoU (Hungarian).
- sources: recall@k and precision against the teacher's retrieved document ids.

Undefined metrics (e.g. mAP when the teacher found no objects at all) are ``None``, never a made-up number.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphdistill.trace import CANONICAL_KINDS as TRACE_CANONICAL
from graphdistill.trace import RLE, Detections, ObjectOut, canonical_names

log = logging.getLogger(__name__)

Output = Mapping[str, Any]
Embedder = Callable[[list[str]], np.ndarray]

DEFAULT_SEMANTIC_THRESHOLD = 0.8
DEFAULT_MATCH_IOU = 0.5

# the canonical field -> the output kinds that fill it, first kind preferred (as strings)
CANONICAL_KINDS: dict[str, tuple[str, ...]] = {
    f: tuple(k.value for k in ks) for f, ks in TRACE_CANONICAL.items()
}


def canonical_output(out: Output, kinds: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An output keyed by the graph's own names -> the canonical ``answer`` / ``objects`` / ``sources``
    fields, each taken from the first output of its kind in ``kinds`` ({name: Kind or kind string}, the
    graph schema's order; a DETECTIONS output becomes mask-less objects). A canonical field the graph has
    no output for is left out, so it is not scored. Without ``kinds`` the output is returned as it is."""
    if kinds is None:
        return dict(out)
    kind_of = {name: str(getattr(k, "value", k)) for name, k in kinds.items()}
    result = {k: v for k, v in out.items() if k not in CANONICAL_KINDS}
    for field, name in canonical_names(kinds).items():
        if name is None:
            continue
        value = out.get(name)
        if kind_of[name] == "detections" and value is not None:
            value = _detections_as_objects(value)
        result[field] = value
    return result


def _detections_as_objects(value: Any) -> list[ObjectOut]:
    if isinstance(value, list):
        return [as_object(o) for o in value]
    dets = value if isinstance(value, Detections) else Detections.model_validate(dict(value))
    return dets.as_objects()


# --------------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 between the normalised answers (both empty = 1, one empty = 0)."""
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def default_embedder() -> Embedder:
    """The teacher's own MiniLM sentence embedder (loaded on first use)."""
    from graphdistill.teachers.text_embedder import SentenceEmbedder

    model = SentenceEmbedder()
    return lambda texts: np.asarray(model.embed(texts), dtype=np.float32)


def _as_embedder(embedder: Embedder | Any | None) -> Embedder:
    if embedder is None:
        return default_embedder()
    if hasattr(embedder, "embed"):
        return lambda texts: np.asarray(embedder.embed(texts), dtype=np.float32)
    return embedder  # type: ignore[no-any-return]


def semantic_similarity(preds: Sequence[str], refs: Sequence[str], embedder: Embedder | Any) -> np.ndarray:
    """Cosine similarity of each (pred, ref) pair; the vectors are renormalised in case they are not unit."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        return np.zeros(0, dtype=np.float32)
    fn = _as_embedder(embedder)
    vecs = np.asarray(fn([*preds, *refs]), dtype=np.float64)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    a, b = vecs[: len(preds)], vecs[len(preds) :]
    sims = np.sum(a * b, axis=1)
    # two empty answers agree; one empty answer never does
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        if not p.strip() or not r.strip():
            sims[i] = float(p.strip() == r.strip())
    return sims


def answer_metrics(
    refs: Sequence[str],
    preds: Sequence[str],
    *,
    embedder: Embedder | Any | None = None,
    semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
    semantic: bool = True,
) -> dict[str, float | None]:
    """Mean exact match, token F1 and meaning agreement (share of pairs with cosine >= threshold)."""
    if len(refs) != len(preds):
        raise ValueError(f"{len(refs)} reference answers but {len(preds)} predicted answers")
    if not refs:
        return {"answer_exact": None, "answer_f1": None, "answer_semantic": None, "answer_cosine": None}
    out: dict[str, float | None] = {
        "answer_exact": float(np.mean([exact_match(p, r) for p, r in zip(preds, refs, strict=True)])),
        "answer_f1": float(np.mean([token_f1(p, r) for p, r in zip(preds, refs, strict=True)])),
        "answer_semantic": None,
        "answer_cosine": None,
    }
    if semantic:
        sims = semantic_similarity(list(preds), list(refs), embedder)
        out["answer_semantic"] = float(np.mean(sims >= semantic_threshold - 1e-6))
        out["answer_cosine"] = float(np.mean(sims))
    return out


# --------------------------------------------------------------------------------------------------------
# Objects: boxes and masks
# --------------------------------------------------------------------------------------------------------


def as_object(obj: ObjectOut | Mapping[str, Any]) -> ObjectOut:
    return obj if isinstance(obj, ObjectOut) else ObjectOut.model_validate(dict(obj))


def box_iou(
    a: np.ndarray | Sequence[Sequence[float]], b: np.ndarray | Sequence[Sequence[float]]
) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (n, 4) x (m, 4) -> (n, m)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _mask_array(rle: RLE | Mapping[str, Any], size: Sequence[int] | None = None) -> np.ndarray:
    r = rle if isinstance(rle, RLE) else RLE.model_validate(dict(rle))
    m = r.decode()
    if size is not None and list(m.shape) != list(size):
        from PIL import Image

        img = Image.fromarray(m.astype(np.uint8) * 255).resize(
            (int(size[1]), int(size[0])), Image.Resampling.NEAREST
        )
        m = np.asarray(img) > 127
    return m


def mask_iou(a: RLE | Mapping[str, Any], b: RLE | Mapping[str, Any]) -> float:
    """IoU of two masks; ``b`` is resized (nearest) to ``a``'s size if they differ. Both empty = 1."""
    ma = _mask_array(a)
    mb = _mask_array(b, ma.shape)
    union = np.logical_or(ma, mb).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(ma, mb).sum() / union)


def _same_class(t: ObjectOut, s: ObjectOut) -> bool:
    if t.class_id is not None and s.class_id is not None:
        return t.class_id == s.class_id
    return t.label == s.label


def match_objects(
    teacher: Sequence[ObjectOut | Mapping[str, Any]],
    student: Sequence[ObjectOut | Mapping[str, Any]],
    *,
    min_iou: float = DEFAULT_MATCH_IOU,
) -> list[tuple[int, int, float]]:
    """One-to-one matching of student to teacher objects of the same class maximising total box IoU
    (Hungarian, scipy ``linear_sum_assignment``); pairs below ``min_iou`` box IoU are dropped.

    Returns ``(teacher_index, student_index, box_iou)`` triples.
    """
    t = [as_object(o) for o in teacher]
    s = [as_object(o) for o in student]
    if not t or not s:
        return []
    from scipy.optimize import linear_sum_assignment

    iou = box_iou([o.box for o in t], [o.box for o in s])
    same = np.array([[_same_class(a, b) for b in s] for a in t], dtype=bool)
    score = np.where(same, iou, 0.0)
    rows, cols = linear_sum_assignment(-score)
    return [
        (int(i), int(j), float(iou[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if same[i, j] and iou[i, j] >= min_iou
    ]


def mask_miou(
    teacher_objects: Sequence[Sequence[ObjectOut | Mapping[str, Any]]],
    student_objects: Sequence[Sequence[ObjectOut | Mapping[str, Any]]],
    *,
    min_iou: float = DEFAULT_MATCH_IOU,
) -> float | None:
    """Mean mask IoU over every teacher object that has a mask, across all rows.

    Student objects are matched to teacher objects per row by class and box IoU (Hungarian, see
    :func:`match_objects`). A matched pair scores the IoU of their masks (0 when the student gave no mask);
    **an unmatched teacher object counts as IoU 0**, so missing objects lower the score. Extra student
    objects do not enter this mean (box mAP penalises them). ``None`` when the teacher has no masks at all.
    """
    ious: list[float] = []
    for t_row, s_row in zip(teacher_objects, student_objects, strict=True):
        t = [as_object(o) for o in t_row]
        s = [as_object(o) for o in s_row]
        matched = {ti: si for ti, si, _ in match_objects(t, s, min_iou=min_iou)}
        for ti, obj in enumerate(t):
            if obj.mask is None:
                continue
            si = matched.get(ti)
            if si is None or s[si].mask is None:
                ious.append(0.0)
            else:
                ious.append(mask_iou(obj.mask, s[si].mask))  # type: ignore[arg-type]
    return float(np.mean(ious)) if ious else None


def _class_key(o: ObjectOut, names: dict[str, int]) -> int:
    if o.class_id is not None:
        return int(o.class_id)
    if o.label not in names:
        names[o.label] = 100_000 + len(names)  # labels without ids get ids far from the real ones
    return names[o.label]


def box_map(
    teacher_objects: Sequence[Sequence[ObjectOut | Mapping[str, Any]]],
    student_objects: Sequence[Sequence[ObjectOut | Mapping[str, Any]]],
    *,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """COCO box mAP of the student against the teacher's boxes, via torchmetrics ``MeanAveragePrecision``.

    Returns ``box_map`` (0.5:0.95), ``box_map50``, ``box_map75`` and ``box_ap_per_class`` ({label: AP
    0.5:0.95}); a value is ``None`` where COCO evaluation leaves it undefined (no teacher objects).
    """
    if len(teacher_objects) != len(student_objects):
        raise ValueError(f"{len(teacher_objects)} teacher rows but {len(student_objects)} student rows")
    torch = _require("torch")
    detection = _require("torchmetrics.detection")
    _require("faster_coco_eval")
    rows = [
        ([as_object(o) for o in t_row], [as_object(o) for o in s_row])
        for t_row, s_row in zip(teacher_objects, student_objects, strict=True)
    ]
    # an object without a class id (human labels) takes the id its label has elsewhere
    names = {o.label: int(o.class_id) for t, s in rows for o in (*t, *s) if o.class_id is not None}
    labels_by_id: dict[int, str] = {}
    preds, targets = [], []
    for t, s in rows:
        for o in (*t, *s):
            labels_by_id.setdefault(_class_key(o, names), o.label)
        targets.append(
            {
                "boxes": torch.tensor([o.box for o in t], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([_class_key(o, names) for o in t], dtype=torch.int64),
            }
        )
        preds.append(
            {
                "boxes": torch.tensor([o.box for o in s], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor([o.score for o in s], dtype=torch.float32),
                "labels": torch.tensor([_class_key(o, names) for o in s], dtype=torch.int64),
            }
        )
    if not targets:
        return {"box_map": None, "box_map50": None, "box_map75": None, "box_ap_per_class": {}}
    metric = detection.MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend="faster_coco_eval"
    )
    metric.update(preds, targets)
    res = metric.compute()

    def val(x: Any) -> float | None:
        v = float(x)
        return None if v < 0 else v

    per_class: dict[str, float | None] = {}
    classes = res["classes"].reshape(-1).tolist()
    aps = res["map_per_class"].reshape(-1).tolist()
    for cid, ap in zip(classes, aps, strict=False):
        label = labels_by_id.get(int(cid))
        if label is None and class_names is not None and 0 <= int(cid) < len(class_names):
            label = class_names[int(cid)]
        per_class[label or str(cid)] = None if ap < 0 else float(ap)
    return {
        "box_map": val(res["map"]),
        "box_map50": val(res["map_50"]),
        "box_map75": val(res["map_75"]),
        "box_ap_per_class": per_class,
    }


def _require(module: str) -> Any:
    from graphdistill._lazy import require

    return require(module, purpose="box mAP")


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------


def source_metrics(
    teacher_sources: Sequence[Sequence[str]],
    student_sources: Sequence[Sequence[str]],
    *,
    k: int | None = None,
) -> dict[str, float | None]:
    """Mean recall@k (share of the teacher's ids among the student's first k; k defaults to the number the
    teacher retrieved) and precision (share of the student's ids the teacher also retrieved).

    Rows where the teacher retrieved nothing are skipped for recall; an empty student list has precision 0
    (1 when the teacher's list is empty too).
    """
    recalls, precisions = [], []
    for t_ids, s_ids in zip(teacher_sources, student_sources, strict=True):
        t_set = set(t_ids)
        kk = len(t_ids) if k is None else k
        if t_set:
            recalls.append(len(t_set & set(list(s_ids)[:kk])) / len(t_set))
        if s_ids:
            precisions.append(len(t_set & set(s_ids)) / len(set(s_ids)))
        else:
            precisions.append(float(not t_set))
    return {
        "sources_recall": float(np.mean(recalls)) if recalls else None,
        "sources_precision": float(np.mean(precisions)) if precisions else None,
    }


# --------------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------------


def compare_outputs(
    reference: Sequence[Output],
    predicted: Sequence[Output],
    *,
    embedder: Embedder | Any | None = None,
    semantic: bool = True,
    semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
    class_names: Sequence[str] | None = None,
    k: int | None = None,
    kinds: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every fidelity metric of ``predicted`` against ``reference`` (parallel lists of output dicts).

    Outputs missing a field are scored on the fields they have: a key is skipped when no reference row has
    it (e.g. a graph without sources). ``kinds`` ({output name: kind}): the outputs are keyed by the graph's
    own names; each is scored by its kind (see :func:`canonical_output`).
    """
    if len(reference) != len(predicted):
        raise ValueError(f"{len(reference)} reference outputs but {len(predicted)} predicted outputs")
    if kinds is not None:
        reference = [canonical_output(r, kinds) for r in reference]
        predicted = [canonical_output(p, kinds) for p in predicted]
    out: dict[str, Any] = {"n": len(reference)}
    if any("answer" in r for r in reference):
        out.update(
            answer_metrics(
                [str(r.get("answer") or "") for r in reference],
                [str(p.get("answer") or "") for p in predicted],
                embedder=embedder,
                semantic=semantic,
                semantic_threshold=semantic_threshold,
            )
        )
    if any("objects" in r for r in reference):
        t_objs = [list(r.get("objects") or []) for r in reference]
        s_objs = [list(p.get("objects") or []) for p in predicted]
        out.update(box_map(t_objs, s_objs, class_names=class_names))
        out["mask_miou"] = mask_miou(t_objs, s_objs)
    if any("sources" in r for r in reference):
        out.update(
            source_metrics(
                [list(r.get("sources") or []) for r in reference],
                [list(p.get("sources") or []) for p in predicted],
                k=k,
            )
        )
    return out


def fidelity(
    teacher: Sequence[Output],
    student: Sequence[Output],
    *,
    ground_truth: Sequence[Output | None] | None = None,
    embedder: Embedder | Any | None = None,
    semantic: bool = True,
    semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
    class_names: Sequence[str] | None = None,
    k: int | None = None,
) -> dict[str, Any]:
    """Student against the teacher, and, where rows carry human ``ground_truth``, the same metrics for the
    student and for the teacher against it, side by side (``ground_truth.student`` / ``.teacher``).
    """
    if semantic and embedder is None:
        embedder = default_embedder()
    kw: dict[str, Any] = dict(
        embedder=embedder,
        semantic=semantic,
        semantic_threshold=semantic_threshold,
        class_names=class_names,
        k=k,
    )
    result = compare_outputs(teacher, student, **kw)
    if ground_truth is not None:
        idx = [i for i, g in enumerate(ground_truth) if g]
        if idx:
            gt = [ground_truth[i] for i in idx]
            result["ground_truth"] = {
                "n": len(idx),
                "student": compare_outputs(gt, [student[i] for i in idx], **kw),  # type: ignore[arg-type]
                "teacher": compare_outputs(gt, [teacher[i] for i in idx], **kw),  # type: ignore[arg-type]
            }
    return result
