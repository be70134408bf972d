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

This module is the one implementation of each measure (text normalisation and box IoU live in
:mod:`graphdistill.runner.vote`, numpy-only, for the runners' test-time vote; they are re-exported here):
text normalisation (also the filter's vote and dedup), token F1 (also training's validation and the int8 export gate), box IoU (also the vote's object
matching), object-match F1 and mask IoU (also the export gate).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# re-exported: the one implementation, numpy-only for the runners' test-time vote
from graphdistill.runner.vote import box_iou as box_iou
from graphdistill.runner.vote import box_iou_pair as box_iou_pair
from graphdistill.runner.vote import normalize_text as normalize_text
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


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_text(pred) == normalize_text(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 between the normalised answers (both empty = 1, one empty = 0): "The cat." against
    "cat" is 1.0, articles and punctuation being no words."""
    p, r = normalize_text(pred).split(), normalize_text(ref).split()
    if not p or not r:
        return float(p == r)
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def answer_diversity(answers: Sequence[str]) -> dict[str, float | None]:
    """How varied a set of answers is (the collapse measures of self-training, Li et al. 2016's distinct-n):
    ``distinct_1``/``distinct_2``: distinct uni-/bigrams over all of them (normalised words, :func:`token_f1`'s),
    ``entropy``: Shannon entropy of their word distribution in bits, ``top_share``: the share of answers that
    are the most common (normalised) answer. A model collapsing onto a few outputs lowers the first three and
    raises the last. None where there is nothing to count."""
    texts = [normalize_text(a or "") for a in answers]
    words = [t.split() for t in texts]
    out: dict[str, float | None] = {}
    for n in (1, 2):
        grams = [tuple(w[i : i + n]) for w in words for i in range(len(w) - n + 1)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else None
    counts = Counter(x for w in words for x in w)
    total = sum(counts.values())
    if total:
        p = np.array(list(counts.values()), dtype=np.float64) / total
        out["entropy"] = float(-(p * np.log2(p)).sum())
    else:
        out["entropy"] = None
    out["top_share"] = Counter(texts).most_common(1)[0][1] / len(texts) if texts else None
    return out


def class_coverage(labels: Sequence[Sequence[str]], class_names: Sequence[str] = ()) -> dict[str, Any]:
    """Which classes a set of labels (each row's object labels) covers: ``classes`` (how many distinct),
    ``share`` (of ``class_names``, when given), ``rows_with_objects`` (share of rows with any object)."""
    seen = {str(x) for row in labels for x in row}
    return {
        "classes": len(seen),
        "share": len(seen & set(class_names)) / len(class_names) if class_names else None,
        "rows_with_objects": sum(1 for row in labels if row) / len(labels) if labels else None,
    }


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
    fn: Embedder = embedder
    return fn


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
    sims: np.ndarray = np.sum(a * b, axis=1)
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
    scores = answer_scores(
        refs, preds, embedder=embedder, semantic_threshold=semantic_threshold, semantic=semantic
    )
    keys = ("answer_exact", "answer_f1", "answer_semantic", "answer_cosine")
    return {k: float(np.mean(scores[k])) if k in scores and len(refs) else None for k in keys}


def answer_scores(
    refs: Sequence[str],
    preds: Sequence[str],
    *,
    embedder: Embedder | Any | None = None,
    semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
    semantic: bool = True,
) -> dict[str, np.ndarray]:
    """Each pair's exact match, token F1 and, with ``semantic``, meaning agreement (1 where cosine >=
    threshold) and cosine: the rows :func:`answer_metrics` averages."""
    if len(refs) != len(preds):
        raise ValueError(f"{len(refs)} reference answers but {len(preds)} predicted answers")
    pairs = list(zip(preds, refs, strict=True))
    out = {
        "answer_exact": np.array([exact_match(p, r) for p, r in pairs], dtype=np.float64),
        "answer_f1": np.array([token_f1(p, r) for p, r in pairs], dtype=np.float64),
    }
    if semantic and pairs:
        sims = semantic_similarity(list(preds), list(refs), embedder)
        out["answer_semantic"] = (sims >= semantic_threshold - 1e-6).astype(np.float64)
        out["answer_cosine"] = np.asarray(sims, dtype=np.float64)
    return out


# --------------------------------------------------------------------------------------------------------
# Objects: boxes and masks
# --------------------------------------------------------------------------------------------------------


def as_object(obj: ObjectOut | Mapping[str, Any]) -> ObjectOut:
    return obj if isinstance(obj, ObjectOut) else ObjectOut.model_validate(dict(obj))


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


def mask_array_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of one shape. Both empty = 1."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def mask_iou(a: RLE | Mapping[str, Any], b: RLE | Mapping[str, Any]) -> float:
    """IoU of two masks; ``b`` is resized (nearest) to ``a``'s size if they differ. Both empty = 1."""
    ma = _mask_array(a)
    return mask_array_iou(ma, _mask_array(b, ma.shape))


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
    """One-to-one matching of student to teacher objects of the same class with box IoU >= ``min_iou``,
    maximising their total box IoU (Hungarian, scipy ``linear_sum_assignment``).

    Returns ``(teacher_index, student_index, box_iou)`` triples.
    """
    t = [as_object(o) for o in teacher]
    s = [as_object(o) for o in student]
    if not t or not s:
        return []
    from scipy.optimize import linear_sum_assignment

    iou = box_iou([o.box for o in t], [o.box for o in s])
    same = np.array([[_same_class(a, b) for b in s] for a in t], dtype=bool)
    ok = same & (iou >= min_iou)  # a pair that cannot count never takes a partner from one that can
    rows, cols = linear_sum_assignment(-np.where(ok, iou, 0.0))
    return [(int(i), int(j), float(iou[i, j])) for i, j in zip(rows, cols, strict=True) if ok[i, j]]


def objects_f1(
    teacher: Sequence[ObjectOut | Mapping[str, Any]],
    student: Sequence[ObjectOut | Mapping[str, Any]],
    *,
    min_iou: float = DEFAULT_MATCH_IOU,
) -> float:
    """Object-match F1 of one output: 2 · matched pairs (:func:`match_objects`) / (teacher objects +
    student objects); 1 when both found nothing. Cheap enough per row, where mAP needs many rows."""
    n = len(teacher) + len(student)
    return 2 * len(match_objects(teacher, student, min_iou=min_iou)) / n if n else 1.0


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
    ious = [
        v
        for t_row, s_row in zip(teacher_objects, student_objects, strict=True)
        for v in mask_ious(t_row, s_row, min_iou=min_iou)
    ]
    return float(np.mean(ious)) if ious else None


def mask_ious(
    teacher: Sequence[ObjectOut | Mapping[str, Any]],
    student: Sequence[ObjectOut | Mapping[str, Any]],
    *,
    min_iou: float = DEFAULT_MATCH_IOU,
) -> list[float]:
    """One row's part of :func:`mask_miou`: the mask IoU of each teacher object that has a mask with its
    matched student object (0 when unmatched or the student gave no mask)."""
    t = [as_object(o) for o in teacher]
    s = [as_object(o) for o in student]
    matched = {ti: si for ti, si, _ in match_objects(t, s, min_iou=min_iou)}
    ious: list[float] = []
    for ti, obj in enumerate(t):
        if obj.mask is None:
            continue
        si = matched.get(ti)
        mask = s[si].mask if si is not None else None
        ious.append(0.0 if mask is None else mask_iou(obj.mask, mask))
    return ious


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
    per_class: bool = True,
) -> dict[str, Any]:
    """COCO box mAP of the student against the teacher's boxes, via torchmetrics ``MeanAveragePrecision``.

    Returns ``box_map`` (0.5:0.95), ``box_map50``, ``box_map75`` and ``box_ap_per_class`` ({label: AP
    0.5:0.95}; empty without ``per_class``, which costs one more COCO evaluation per class); a value is
    ``None`` where COCO evaluation leaves it undefined (no teacher objects).
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
    # sync_on_compute off: the caller holds every row; under torch.distributed (rank 0 validating while the
    # other training ranks wait) torchmetrics would otherwise all-gather from ranks that never call it
    metric = detection.MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        class_metrics=per_class,
        backend="faster_coco_eval",
        sync_on_compute=False,
    )
    metric.update(preds, targets)
    res = metric.compute()

    def val(x: Any) -> float | None:
        v = float(x)
        return None if v < 0 else v

    ap_of: dict[str, float | None] = {}
    classes = res["classes"].reshape(-1).tolist() if per_class else []
    aps = res["map_per_class"].reshape(-1).tolist() if per_class else []
    for cid, ap in zip(classes, aps, strict=False):
        label = labels_by_id.get(int(cid))
        if label is None and class_names is not None and 0 <= int(cid) < len(class_names):
            label = class_names[int(cid)]
        ap_of[label or str(cid)] = None if ap < 0 else float(ap)
    return {
        "box_map": val(res["map"]),
        "box_map50": val(res["map_50"]),
        "box_map75": val(res["map_75"]),
        "box_ap_per_class": ap_of,
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
    pairs = list(zip(teacher_sources, student_sources, strict=True))
    recalls = [r for t, s in pairs if (r := source_recall(t, s, k=k)) is not None]
    precisions = [source_precision(t, s) for t, s in pairs]
    return {
        "sources_recall": float(np.mean(recalls)) if recalls else None,
        "sources_precision": float(np.mean(precisions)) if precisions else None,
    }


def source_recall(teacher: Sequence[str], student: Sequence[str], *, k: int | None = None) -> float | None:
    """One row's recall@k (k defaults to the number the teacher retrieved); None when the teacher
    retrieved nothing."""
    t_set = set(teacher)
    if not t_set:
        return None
    kk = len(teacher) if k is None else k
    return len(t_set & set(list(student)[:kk])) / len(t_set)


def source_precision(teacher: Sequence[str], student: Sequence[str]) -> float:
    """One row's precision: 0 for an empty student list (1 when the teacher's is empty too)."""
    if not student:
        return float(not teacher)
    return len(set(teacher) & set(student)) / len(set(student))


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


# --------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------------------------------------

# the headline fidelity figures (each gets an interval)
FIDELITY_KEYS = (
    "answer_exact",
    "answer_f1",
    "answer_semantic",
    "box_map50",
    "box_map",
    "mask_miou",
    "sources_recall",
)
# Resamples per interval. Box mAP is recomputed by torchmetrics on every resample and is nearly all the
# cost (the masks' IoUs are computed once, not per resample); at the demo's size a thousand take seconds
# (README, "Measuring fidelity").
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def cluster_resamples(clusters: Sequence[Any], resamples: int, *, seed: int = 0) -> list[np.ndarray]:
    """Row indices of ``resamples`` two-stage bootstrap resamples of rows grouped by ``clusters`` (one key
    per row: its photo): draw as many clusters as there are, with replacement, then within each drawn
    cluster as many of its rows as it has, with replacement. Rows about one photo share its objects and its
    teacher outputs, so they are not independent draws: the photos are what was sampled, and resampling the
    rows alone would give intervals too narrow. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(clusters):
        groups.setdefault(c, []).append(i)
    members = [np.asarray(v, dtype=np.int64) for v in groups.values()]  # in order of first appearance
    out: list[np.ndarray] = []
    for _ in range(resamples):
        picks = rng.integers(len(members), size=len(members))
        parts = [members[p][rng.integers(len(members[p]), size=len(members[p]))] for p in picks]
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return out


class RowScores:
    """Every row's part of the fidelity figures of :data:`FIDELITY_KEYS`, computed once by the functions above
    (:func:`answer_scores`, :func:`mask_ious`, :func:`source_recall`; the objects are kept for
    :func:`box_map`), so that :meth:`figures` scores any resample of the rows with the same code and no
    model or embedder runs again."""

    def __init__(
        self,
        reference: Sequence[Output],
        predicted: Sequence[Output],
        *,
        embedder: Embedder | Any | None = None,
        semantic: bool = True,
        semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
        k: int | None = None,
        kinds: Mapping[str, Any] | None = None,
    ) -> None:
        if len(reference) != len(predicted):
            raise ValueError(f"{len(reference)} reference outputs but {len(predicted)} predicted outputs")
        if kinds is not None:
            reference = [canonical_output(r, kinds) for r in reference]
            predicted = [canonical_output(p, kinds) for p in predicted]
        self.n = len(reference)
        self.answers: dict[str, np.ndarray] = {}
        if any("answer" in r for r in reference):
            self.answers = answer_scores(
                [str(r.get("answer") or "") for r in reference],
                [str(p.get("answer") or "") for p in predicted],
                embedder=embedder,
                semantic=semantic,
                semantic_threshold=semantic_threshold,
            )
        self.objects: tuple[list[list[ObjectOut]], list[list[ObjectOut]]] | None = None
        self.masks: list[list[float]] = []
        if any("objects" in r for r in reference):
            t = [[as_object(o) for o in r.get("objects") or []] for r in reference]
            s = [[as_object(o) for o in p.get("objects") or []] for p in predicted]
            self.objects = (t, s)
            self.masks = [mask_ious(a, b) for a, b in zip(t, s, strict=True)]
        self.recalls: list[float | None] | None = None
        if any("sources" in r for r in reference):
            self.recalls = [
                source_recall(list(r.get("sources") or []), list(p.get("sources") or []), k=k)
                for r, p in zip(reference, predicted, strict=True)
            ]

    def figures(self, idx: Sequence[int] | np.ndarray | None = None) -> dict[str, float | None]:
        """The :data:`FIDELITY_KEYS` figures of the rows ``idx`` (repeats count again; default every row) that
        this comparison has: :func:`compare_outputs`' values when ``idx`` is every row."""
        rows = np.arange(self.n) if idx is None else np.asarray(idx, dtype=np.int64)
        out: dict[str, float | None] = {}
        for key in ("answer_exact", "answer_f1", "answer_semantic"):
            if key in self.answers:
                out[key] = float(np.mean(self.answers[key][rows])) if rows.size else None
        if self.objects is not None:
            t, s = self.objects
            maps = box_map([t[i] for i in rows], [s[i] for i in rows], per_class=False)
            out["box_map50"], out["box_map"] = maps["box_map50"], maps["box_map"]
            ious = [v for i in rows for v in self.masks[i]]
            out["mask_miou"] = float(np.mean(ious)) if ious else None
        if self.recalls is not None:
            recalls = [r for i in rows if (r := self.recalls[i]) is not None]
            out["sources_recall"] = float(np.mean(recalls)) if recalls else None
        return out


def fidelity_intervals(
    reference: Sequence[Output],
    predicted: Sequence[Output],
    clusters: Sequence[Any] | None = None,
    *,
    embedder: Embedder | Any | None = None,
    semantic: bool = True,
    semantic_threshold: float = DEFAULT_SEMANTIC_THRESHOLD,
    k: int | None = None,
    kinds: Mapping[str, Any] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """A percentile bootstrap interval ``[lo, hi]`` at ``level`` for each fidelity figure of
    :data:`FIDELITY_KEYS` that the comparison has, resampling photos then rows (:func:`cluster_resamples`;
    ``clusters`` gives each row's photo, default: every row its own) and scoring each resample with the
    same metric functions as :func:`compare_outputs` (:class:`RowScores`; box mAP recomputed by
    torchmetrics every time). A figure undefined on every resample (no teacher objects, say) is ``None``;
    resamples on which it is undefined are left out of its interval. Deterministic for a seed."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rows = RowScores(
        reference,
        predicted,
        embedder=embedder,
        semantic=semantic,
        semantic_threshold=semantic_threshold,
        k=k,
        kinds=kinds,
    )
    keys = list(rows.figures(np.zeros(0, dtype=np.int64)))
    if not rows.n:
        return dict.fromkeys(keys)
    groups = list(clusters) if clusters is not None else list(range(rows.n))
    if len(groups) != rows.n:
        raise ValueError(f"{len(groups)} cluster keys for {rows.n} rows")
    values: dict[str, list[float]] = {key: [] for key in keys}
    for idx in cluster_resamples(groups, resamples, seed=seed):
        for key, v in rows.figures(idx).items():
            if v is not None:
                values[key].append(v)
    tail = (1 - level) / 2
    return {
        key: [float(x) for x in np.quantile(vs, [tail, 1 - tail])] if vs else None
        for key, vs in values.items()
    }
