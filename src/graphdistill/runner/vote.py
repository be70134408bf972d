"""Voting across several predictions of one query: the one implementation behind the filter's vote over a
teacher's K samples (:mod:`graphdistill.filter.vote`) and the runners' fusion of a student's test-time
augmented views (:mod:`graphdistill.runner.tta`). numpy and the stdlib only, like the rest of
:mod:`graphdistill.runner`: a phone app ports it with the runner.

- answers: clustered by meaning (identical normalised text, or embedding cosine >= a threshold when an
  embedder is given); the largest cluster wins (ties: the one holding the earliest answer) and its most
  central answer is the target (:func:`vote_answers`);
- objects: matched across predictions by class and box IoU with the cluster's fused box, one object per
  prediction in a cluster (:func:`cluster_objects`); the clusters a quorum found are kept, with boxes fused
  weighted by score (:func:`fused_box`) and masks by pixel majority (:func:`fused_mask`):
  :func:`fuse_objects`;
- sources: kept when a quorum of predictions retrieved them, by how many did, then by mean rank
  (:func:`vote_sources`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphdistill.runner.preprocess import rle_majority

Embedder = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, d] vectors

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a/an/the), single spaces. What two
    answers (or two questions, for dedup) must share to count as the same text."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


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


def box_iou_pair(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two xyxy boxes (0 when their union is empty): :func:`box_iou` of one pair."""
    return float(box_iou([a], [b])[0, 0])


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def vote_answers(
    answers: Sequence[str], k: int, embedder: Embedder | None, threshold: float = 0.85
) -> tuple[int | None, float, list[list[int]]]:
    """Cluster answers by meaning; returns (index of the target answer, agreement = the winning cluster's
    share of ``k``, clusters). Without an embedder only identical normalised texts cluster."""
    n = len(answers)
    if n == 0:
        return None, 0.0, []
    norms = [normalize_text(a) for a in answers]
    parent = list(range(n))
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] == norms[j]:
                parent[_find(parent, j)] = _find(parent, i)
    sims: np.ndarray | None = None
    if embedder is not None and len(set(norms)) > 1:
        vecs = np.asarray(embedder(list(answers)), dtype=np.float64)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        sims = vecs @ vecs.T
        for i in range(n):
            for j in range(i + 1, n):
                if sims[i, j] >= threshold:
                    parent[_find(parent, j)] = _find(parent, i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(_find(parent, i), []).append(i)
    clusters = sorted(groups.values(), key=lambda c: (-len(c), c[0]))
    best = clusters[0]

    def centrality(i: int) -> tuple[float, int, int]:
        same_text = sum(norms[j] == norms[i] for j in best)
        mean_sim = float(np.mean([sims[i, j] for j in best])) if sims is not None else 0.0
        return (mean_sim, same_text, -i)

    chosen = max(best, key=centrality)
    return chosen, len(best) / max(k, 1), clusters


def fused_box(boxes: Sequence[Sequence[float]], scores: Sequence[float]) -> list[float]:
    """The score-weighted mean of xyxy boxes (:func:`weighted_mean`: identical boxes fuse to themselves)."""
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return [float(v) for v in weighted_mean(b, [max(float(s), 1e-6) for s in scores])]


def weighted_mean(values: np.ndarray | Sequence[float], weights: Sequence[float] | None = None) -> np.ndarray:
    """The (weighted) mean over the first axis, computed as the first value plus the mean difference from it,
    so that identical values come back exactly (a plain weighted sum divided by its weights may not)."""
    v = np.asarray(values, dtype=np.float64)
    w = np.ones(len(v)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w.reshape((-1,) + (1,) * (v.ndim - 1))
    return np.asarray(v[0] + ((v - v[0]) * w).sum(0) / w.sum())


def cluster_objects(
    per_prediction: Sequence[Sequence[tuple[str, Sequence[float], float]]], iou: float = 0.5
) -> list[list[tuple[int, int]]]:
    """Objects ``(label, xyxy box, score)`` of several predictions of one input -> clusters of
    ``(prediction, index)``: each prediction's objects, best first, join the cluster of their label that
    holds none of that prediction's yet and whose fused box (:func:`fused_box`) they overlap most, by IoU
    >= ``iou``; otherwise they start one. Clusters in the order they were started."""
    clusters: list[list[tuple[int, int]]] = []
    members: list[list[tuple[str, Sequence[float], float]]] = []
    for p, objs in enumerate(per_prediction):
        for i in sorted(range(len(objs)), key=lambda j: -objs[j][2]):
            label, box, _ = objs[i]
            best, best_iou = None, iou
            for c, (cl, ms) in enumerate(zip(clusters, members, strict=True)):
                if ms[0][0] != label or any(q == p for q, _ in cl):
                    continue
                v = box_iou_pair(fused_box([m[1] for m in ms], [m[2] for m in ms]), box)
                if v >= best_iou:
                    best, best_iou = c, v
            if best is None:
                clusters.append([(p, i)])
                members.append([objs[i]])
            else:
                clusters[best].append((p, i))
                members[best].append(objs[i])
    return clusters


def fused_mask(masks: Sequence[Mapping[str, Any]]) -> dict[str, list[int]] | None:
    """The pixel majority of the masks (COCO RLE dicts) of the first one's size, None without any
    (:func:`~graphdistill.runner.preprocess.rle_majority`; one mask is itself)."""
    if not masks:
        return None
    same = [m for m in masks if list(m["size"]) == list(masks[0]["size"])]
    return (
        rle_majority(same)
        if len(same) > 1
        else {"size": list(same[0]["size"]), "counts": list(same[0]["counts"])}
    )


def fuse_objects(
    per_prediction: Sequence[Sequence[Mapping[str, Any]]], quorum: int, iou: float = 0.5
) -> list[tuple[dict[str, Any], int]]:
    """Objects (``{label, class_id, score, box, mask}``, the mask a COCO RLE dict or None) of several
    predictions of one input -> for each cluster (:func:`cluster_objects`) at least ``quorum`` predictions
    found: the fused object (the first member's label, the most common class id, the mean score, the
    score-weighted box, the pixel-majority mask) and how many predictions found it; best first."""
    clusters = cluster_objects(
        [[(str(o["label"]), o["box"], float(o["score"])) for o in objs] for objs in per_prediction], iou
    )
    fused: list[tuple[dict[str, Any], int]] = []
    for c in clusters:
        if len(c) < quorum:
            continue
        objs = [per_prediction[p][i] for p, i in c]
        scores = [float(o["score"]) for o in objs]
        obj = {
            "label": objs[0]["label"],
            "class_id": int(most_common([int(o["class_id"]) for o in objs])),
            "score": float(weighted_mean(scores)),
            "box": fused_box([o["box"] for o in objs], scores),
            "mask": fused_mask([o["mask"] for o in objs if o.get("mask") is not None]),
        }
        fused.append((obj, len(c)))
    return sorted(fused, key=lambda f: -f[0]["score"])


def vote_sources(per_sample: Sequence[Sequence[str]], k: int, quorum: int) -> tuple[list[str], float]:
    """Documents retrieved by at least ``quorum`` of the predictions, by how many did, then by mean rank (then
    id); agreement: the kept documents' mean share of ``k``."""
    counts: Counter[str] = Counter()
    rank_sum: Counter[str] = Counter()
    for ids in per_sample:
        for r, sid in enumerate(dict.fromkeys(ids)):
            counts[sid] += 1
            rank_sum[sid] += r
    kept = [s for s, c in counts.items() if c >= quorum]
    kept.sort(key=lambda s: (-counts[s], rank_sum[s] / counts[s], s))
    if not any(per_sample):
        agreement = 1.0
    elif kept:
        agreement = float(np.mean([counts[s] / max(k, 1) for s in kept]))
    else:
        agreement = sum(1 for ids in per_sample if not ids) / max(k, 1)
    return kept, agreement


def most_common(values: Sequence[Any]) -> Any:
    """The most common value, the earliest on ties."""
    return Counter(values).most_common(1)[0][0]
