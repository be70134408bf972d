"""Distillation losses, returned BY NAME so each can be logged and weighted.

Text:
- ``answer_ce``: cross-entropy on the consensus answer's tokens (sequence-level distillation). The student's
  ``answer_logits`` may be log-probabilities (its copy path mixes two distributions); cross-entropy's
  log-softmax leaves those unchanged.
- ``answer_kl``: KL(teacher top-k ‖ student) per answer step, only where the loader produced soft targets
  (:func:`graphdistill.student.loader.align_soft_targets` maps the teacher LLM's top-k onto student tokens).

Objects, densely, as the detector itself was trained (anchor-free, one-to-many; Ultralytics' recipe), on
rows whose objects describe the image (not counterfactual replays, whose objects were edited):
- :func:`assign` gives each teacher object the cells that already predict it best (task-aligned: class
  score^0.5 × IoU^6 among the cells whose centre lies in the box, top 10), with a soft class target scaled by
  how well the cell predicts it;
- ``det_cls``: BCE of every cell's class logits against those targets (all other cells: background);
- ``det_box``: 1 − GIoU of the assigned cells' decoded boxes; ``det_dfl``: the distribution focal loss that
  puts each side's distribution on the two bins around the target distance.
The detector's own per-cell outputs, where the trainer computed them (a student started from a YOLO detector:
the detector run at twice the student's input size, whose strides 16/32 cells line up exactly with the
student's strides 8/16 cells and measure distances in the same units):
- ``kd_cls``: BCE of the student's class logits against the detector's class probabilities, every cell;
- ``kd_box``: KL of each side's box distribution against the detector's, on cells the detector scores ≥ 0.1.
Masks:
- ``mask_bce``: per assigned cell, ``coef · protos`` against the teacher's (SAM) mask of its object, inside that
  object's box only (masks are class-agnostic and cut to the box at inference).

Summary heads: ``sources`` (a listwise softmax cross-entropy: the teacher's retrieved documents share the
target mass, every other document is a negative; the student returns its top ``sources_k`` as the retriever
does), ``embedding:<name>`` (1 − cosine). Retrieval distillation (:mod:`graphdistill.student.retrieval_kd`):
``retrieval`` (the sources loss on synthetic queries the teacher's retriever ranked) and, for a head in the
retriever's own space, ``retrieval_embed`` (1 − cosine of its query vector with the retriever's).

Weights are set by loss name (:meth:`LossWeights.from_names`, ``TrainConfig.loss_weights``,
``graphdistill train --loss-weight NAME=W``); an unknown name is an error, never silently ignored.

Every denominator (token counts, weight sums, row counts) goes through
:func:`graphdistill.student.ranks.normaliser` or :func:`~graphdistill.student.ranks.mean`: the global batch's
when a step is split over several processes, so their gradients average to the one-process gradient. Those are
collectives: each is reached on every rank whatever the rank's rows hold (no early return skips one). Across
ranks a loss whose rows on this rank hold nothing is still reached from every head output it would read
(:func:`graphdistill.student.ranks.reach`: zero, with zero gradients), so that the backward collectives of the
batch norms in those heads run on every rank; one process keeps its losses and gradients bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from graphdistill.student.ranks import mean, normaliser, reach, split
from graphdistill.student.trunks import PROTO_STRIDE, dfl_decode

KD_MIN_SCORE = 0.1  # cells where the detector's best class probability is this or more get box distillation


@dataclass
class LossWeights:
    answer_ce: float = 1.0
    answer_kl: float = 0.5
    det_cls: float = 0.5  # Ultralytics' default gains: cls 0.5, box 7.5, dfl 1.5
    det_box: float = 7.5
    det_dfl: float = 1.5
    kd_cls: float = 0.5
    kd_box: float = 1.5
    mask_bce: float = 2.0
    sources: float = 1.0
    retrieval: float = 1.0  # the sources head on synthetic queries ranked by the teacher's retriever
    # its query vector against the retriever's own (a head in the retriever's space)
    retrieval_embed: float = 1.0
    embedding: float = 1.0
    extra: dict[str, float] = field(default_factory=dict)  # per-embedding weights: "embedding:<name>"

    @classmethod
    def names(cls) -> list[str]:
        """The settable names: each loss as :func:`compute_losses` names it, ``embedding`` (every embedding
        loss); plus ``embedding:<name>`` for one embedding."""
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def from_names(
        cls, weights: Mapping[str, float], *, embeddings: Mapping[str, int] | None = None
    ) -> LossWeights:
        """Defaults overridden by ``{loss name: weight}``. Raises ``ValueError`` naming an unknown loss (and
        listing the known ones) or a negative / non-finite weight; with ``embeddings`` (the student's
        embedding outputs), ``embedding:<name>`` must name one of them."""
        known = cls.names()
        w = cls()
        for name, value in weights.items():
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"loss weight {name}={value}: must be a finite number >= 0")
            if name.startswith("embedding:"):
                emb = name.split(":", 1)[1]
                if embeddings is not None and emb not in embeddings:
                    raise ValueError(
                        f"loss weight {name!r}: this student has no embedding output {emb!r} "
                        f"(its embedding outputs: {sorted(embeddings) or 'none'})"
                    )
                w.extra[name] = value
            elif name in known:
                setattr(w, name, value)
            else:
                raise ValueError(
                    f"unknown loss weight {name!r}; known: {', '.join(known)}, embedding:<output name>"
                )
        return w

    def of(self, name: str) -> float:
        if name in self.extra:
            return self.extra[name]
        if name.startswith("embedding:"):
            return self.embedding
        return float(getattr(self, name))


# --------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------


def answer_kl(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, valid: Tensor) -> Tensor:
    """KL(teacher‖student) over the teacher's top-k at each valid step, both renormalised over those k."""
    if not bool(valid.any()) and not split():
        return logits.sum() * 0.0
    lp_s = logits.log_softmax(-1).gather(-1, topk_ids)  # [B,La,k]
    finite = torch.isfinite(topk_logprobs)
    lp_t = torch.where(finite, topk_logprobs, torch.full_like(topk_logprobs, -1e9)).log_softmax(-1)
    lp_s = torch.where(finite, lp_s, torch.full_like(lp_s, -1e9)).log_softmax(-1)
    kl = (lp_t.exp() * (lp_t - lp_s)).where(finite, torch.zeros_like(lp_t)).sum(-1)  # [B,La]
    return mean(kl[valid])


# --------------------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------------------


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """xyxy a [B,N,4], b [B,M,4] -> IoU [B,N,M]."""
    from graphdistill.student.model import box_iou_matrix

    return box_iou_matrix(a, b)


def giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of matching xyxy boxes [N,4], [N,4] -> [N]."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = (area_a + area_b - inter).clamp(min=1e-6)
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    iou = inter / union
    return iou - (hull - union) / hull.clamp(min=1e-6)


@dataclass
class Assignment:
    fg: Tensor  # [B,A] bool: the cell is assigned an object
    target: Tensor  # [B,A] int64: the object's index among the row's objects (meaningful where fg)
    boxes: Tensor  # [B,A,4] xyxy px of the assigned object
    scores: Tensor  # [B,A,C] soft class targets (0 for background cells)


@torch.no_grad()
def assign(
    scores: Tensor,
    boxes: Tensor,
    anchors: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    *,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
) -> Assignment:
    """Task-aligned one-to-many assignment (TOOD; what Ultralytics' detectors are trained with).

    scores [B,A,C] (probabilities), boxes [B,A,4] xyxy px (decoded predictions), anchors [A,2] px, gt_labels
    [B,M], gt_boxes [B,M,4] xyxy px, gt_valid [B,M]. Each object takes the ``topk`` cells whose centre lies
    inside its box with the highest ``score^alpha · IoU^beta`` (score of the object's class, IoU of the cell's
    predicted box with the object's); a cell claimed by several objects goes to the one its box overlaps most.
    A cell's class target is its alignment, normalised so the object's best cell gets that cell's IoU."""
    b, a, c = scores.shape
    m = gt_boxes.shape[1]
    if m == 0 or not bool(gt_valid.any()):
        z = torch.zeros(b, a, dtype=torch.bool, device=scores.device)
        return Assignment(z, torch.zeros(b, a, dtype=torch.long, device=scores.device), boxes * 0, scores * 0)
    rel = torch.cat(
        [anchors[None, None] - gt_boxes[:, :, None, :2], gt_boxes[:, :, None, 2:] - anchors[None, None]], -1
    )
    inside = (rel.amin(-1) > 1e-9) & gt_valid[:, :, None]  # [B,M,A]
    iou = pairwise_iou(gt_boxes, boxes).clamp(min=0)  # [B,M,A]
    cls_score = scores.gather(2, gt_labels.clamp(min=0)[:, None, :].expand(b, a, m)).transpose(
        1, 2
    )  # [B,M,A]
    align = cls_score.pow(alpha) * iou.pow(beta) * inside
    top = align.topk(min(topk, a), dim=-1).indices
    chosen = torch.zeros_like(inside).scatter_(-1, top, True) & inside  # [B,M,A]
    several = chosen.sum(1) > 1  # [B,A]
    target = torch.where(several, (iou * chosen).argmax(1), chosen.to(torch.uint8).argmax(1))  # [B,A]
    fg = chosen.any(1)
    pos = F.one_hot(target, m).transpose(1, 2).bool() & fg[:, None, :]  # [B,M,A]
    align_pos, iou_pos = align * pos, iou * pos
    norm = (align_pos * iou_pos.amax(-1, keepdim=True) / (align_pos.amax(-1, keepdim=True) + 1e-9)).amax(1)
    labels = gt_labels.gather(1, target).clamp(min=0)
    tboxes = gt_boxes.gather(1, target[..., None].expand(-1, -1, 4))
    tscores = F.one_hot(labels, c).to(scores.dtype) * (norm * fg)[..., None]
    return Assignment(fg, target, tboxes, tscores)


def dfl_loss(dist: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss: ``dist`` [N,4,R] logits, ``target`` [N,4] distances in bins (0..R-1.01) ->
    [N] (the cross-entropy on the two bins around each target, weighted by nearness; mean of the 4 sides)."""
    left = target.long()
    w_right = target - left
    lp = dist.log_softmax(-1)
    ce_l = -lp.gather(-1, left[..., None])[..., 0]
    ce_r = -lp.gather(-1, (left + 1)[..., None])[..., 0]
    return (ce_l * (1 - w_right) + ce_r * w_right).mean(-1)


def detection_losses(out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``det_cls``, ``det_box``, ``det_dfl`` and (with a mask head and masks) ``mask_bce``; see the module
    docstring. Only rows with ``vision_ok`` (their objects describe their image) take part."""
    dist, cls = out["det_dist"], out["det_cls"]  # [B,4R,A], [B,C,A]
    anchors, strides = out["det_anchors"], out["det_strides"]
    b, _c, a = cls.shape
    r = dist.shape[1] // 4
    rows = (
        batch["vision_ok"].bool()
        if "vision_ok" in batch
        else torch.ones(b, dtype=torch.bool, device=cls.device)
    )
    logits = cls.transpose(1, 2)  # [B,A,C]
    bins = torch.arange(r, dtype=dist.dtype, device=dist.device).view(1, r)
    pred_boxes = dfl_decode(dist, anchors, strides, bins)  # [B,A,4]
    gt_valid = batch["obj_valid"].bool() & rows[:, None]
    asg = assign(
        logits.detach().sigmoid(),
        pred_boxes.detach(),
        anchors,
        batch["obj_classes"],
        batch["obj_boxes_px"],
        gt_valid,
    )
    zero = cls.sum() * 0.0
    weight_sum = normaliser(asg.scores.sum(), floor=1.0)
    bce = F.binary_cross_entropy_with_logits(logits, asg.scores, reduction="none").sum((1, 2))  # [B]
    losses = {"det_cls": (bce * rows).sum() / weight_sum}
    fg = asg.fg
    masks = "det_coef" in out and "obj_masks" in batch
    if not bool(fg.any()):
        # across ranks the box distributions' graph runs backward here too (another rank's cells train it)
        empty = zero + reach(dist) if split() else zero
        losses.update(det_box=empty, det_dfl=empty)
        if masks:  # across ranks mask_loss still takes part in its denominator's all-reduce
            losses["mask_bce"] = mask_loss(out, batch, asg, asg.scores.sum(-1)[fg]) if split() else zero
        return losses
    w = asg.scores.sum(-1)[fg]  # [N]
    losses["det_box"] = ((1 - giou(pred_boxes[fg], asg.boxes[fg])) * w).sum() / weight_sum
    anc = anchors[None].expand(b, -1, -1)[fg]
    st = strides[None].expand(b, -1, -1)[fg]
    tb = asg.boxes[fg]
    ltrb = torch.cat([anc - tb[:, :2], tb[:, 2:] - anc], -1) / st
    d = dist.view(b, 4, r, a).permute(0, 3, 1, 2)[fg]  # [N,4,R]
    losses["det_dfl"] = (dfl_loss(d, ltrb.clamp(0, r - 1.01)) * w).sum() / weight_sum
    if masks:
        losses["mask_bce"] = mask_loss(out, batch, asg, w)
    return losses


def mask_loss(out: dict[str, Tensor], batch: dict[str, Tensor], asg: Assignment, w: Tensor) -> Tensor:
    """BCE of each assigned cell's ``coef · protos`` against its object's mask, inside the object's box. One
    matrix product per image (its cells' coefficients × its prototypes): gathering the prototypes per cell
    instead materialised a copy of them for every assigned cell."""
    protos = out["protos"]  # [B,M,Hp,Wp]
    b, m, hp, wp = protos.shape
    fg = asg.fg
    coef = out["det_coef"].transpose(1, 2)  # [B,A,M]
    has_mask = batch.get("obj_has_mask")
    xs = torch.arange(wp, device=protos.device, dtype=protos.dtype) + 0.5
    ys = torch.arange(hp, device=protos.device, dtype=protos.dtype) + 0.5
    total = protos.sum() * 0.0
    if split():  # across ranks the coefficients' graph runs backward even with no mask to learn here
        total = total + reach(coef)
    weight = protos.new_zeros(())
    w_rows = torch.zeros_like(asg.scores[..., 0])
    w_rows[fg] = w  # each assigned cell's weight, in [B,A]
    for i in range(b):
        cells = fg[i].nonzero()[:, 0]
        if not len(cells):
            continue
        target_obj = asg.target[i, cells]  # [n]
        keep = (
            has_mask[i, target_obj].bool()
            if has_mask is not None
            else torch.ones_like(cells, dtype=torch.bool)
        )
        if not bool(keep.any()):
            continue
        cells, target_obj = cells[keep], target_obj[keep]
        pred = (coef[i, cells] @ protos[i].view(m, hp * wp)).view(-1, hp, wp)  # [n,Hp,Wp]
        target = batch["obj_masks"][i, target_obj]
        box = asg.boxes[i, cells] / PROTO_STRIDE  # xyxy in prototype cells
        inside = (
            (xs[None, None, :] >= box[:, 0, None, None])
            & (xs[None, None, :] <= box[:, 2, None, None])
            & (ys[None, :, None] >= box[:, 1, None, None])
            & (ys[None, :, None] <= box[:, 3, None, None])
        ).to(pred.dtype)
        per = (F.binary_cross_entropy_with_logits(pred, target, reduction="none") * inside).sum((1, 2))
        per = per / inside.sum((1, 2)).clamp(min=1.0)
        wi = w_rows[i, cells]
        total = total + (per * wi).sum()
        weight = weight + wi.sum()
    return total / normaliser(weight, floor=1e-6)


def kd_losses(out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``kd_cls`` and ``kd_box`` against the detector's own per-cell outputs (``kd_cls`` [B,C,N] probabilities and
    ``kd_dist`` [B,4·R,N] logits for the student's first N cells, ``kd_valid`` [B]); see the module docstring."""
    t_cls, t_dist = batch["kd_cls"].float(), batch["kd_dist"].float()
    n = t_cls.shape[2]
    rows = batch["kd_valid"].bool()
    s_cls = out["det_cls"][:, :, :n]
    bce = F.binary_cross_entropy_with_logits(s_cls, t_cls, reduction="none").sum((1, 2))
    mass = normaliser((t_cls.sum((1, 2)) * rows).sum(), floor=1.0)
    losses = {"kd_cls": (bce * rows).sum() / mass}
    b = s_cls.shape[0]
    r = t_dist.shape[1] // 4
    best = t_cls.amax(1) * rows[:, None]  # [B,N]
    on = best >= KD_MIN_SCORE
    w = best[on]
    w_sum = normaliser(w.sum())
    if not bool(on.any()):
        losses["kd_box"] = s_cls.sum() * 0.0
        if split():  # across ranks the box distributions' graph runs backward here too
            losses["kd_box"] = losses["kd_box"] + reach(out["det_dist"])
        return losses
    s_d = out["det_dist"][:, :, :n].view(b, 4, r, n).permute(0, 3, 1, 2)[on]  # [K,4,R]
    t_d = t_dist.view(b, 4, r, n).permute(0, 3, 1, 2)[on]
    lt = t_d.log_softmax(-1)
    kl = (lt.exp() * (lt - s_d.log_softmax(-1))).sum(-1).mean(-1)  # [K]
    losses["kd_box"] = (kl * w).sum() / w_sum
    return losses


# --------------------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------------------


def sources_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Listwise cross-entropy of the document scores [B,N] against the teacher's retrieved set [B,N] (0/1):
    each retrieved document holds an equal share of the target distribution. Rows that retrieved nothing
    are left out (zero when none retrieved anything)."""
    targets = targets[:, : logits.shape[1]].float()
    mass = targets.sum(-1)
    rows = mass > 0
    if not bool(rows.any()) and not split():
        return logits.sum() * 0.0
    dist = targets[rows] / mass[rows].unsqueeze(-1)
    return mean(-(dist * F.log_softmax(logits[rows].float(), dim=-1)).sum(-1))


def compute_losses(
    out: dict[str, Tensor], batch: dict[str, Tensor], weights: LossWeights | None = None
) -> dict[str, Tensor]:
    """Every applicable loss by name, plus ``total`` (their weighted sum). Only the heads present in
    ``out`` are supervised (a student built from a graph without e.g. SOURCES has no ``source_logits``)."""
    w = weights or LossWeights()
    losses: dict[str, Tensor] = {}
    if not out:
        raise ValueError("compute_losses: the model returned no outputs")
    device = next(iter(out.values())).device
    if "answer_logits" in out:
        logits = out["answer_logits"]
        target = batch["answer_target"].flatten()
        # the mean over the global batch's answer tokens; 0 (zero gradient) for a batch with none, where
        # cross_entropy's own mean is 0/0 = NaN and stopped training
        ce = F.cross_entropy(logits.flatten(0, 1), target, ignore_index=-100, reduction="sum")
        losses["answer_ce"] = ce / normaliser((target != -100).sum(), floor=1.0)
        if "topk_valid" in batch:
            losses["answer_kl"] = answer_kl(
                logits, batch["topk_ids"], batch["topk_logprobs"], batch["topk_valid"]
            )
    if "det_dist" in out and "obj_boxes_px" in batch:
        losses.update(detection_losses(out, batch))
    if "det_dist" in out and "kd_cls" in batch:
        losses.update(kd_losses(out, batch))
    if "source_logits" in out and "sources" in batch:
        losses["sources"] = sources_loss(out["source_logits"], batch["sources"])
    if "retrieval_logits" in out and "retrieval_targets" in batch:  # see graphdistill.student.retrieval_kd
        losses["retrieval"] = sources_loss(out["retrieval_logits"], batch["retrieval_targets"])
    if "retrieval_query" in out and "retrieval_vectors" in batch:  # both unit length in the retriever's space
        cos = F.cosine_similarity(out["retrieval_query"], batch["retrieval_vectors"], dim=-1)
        losses["retrieval_embed"] = mean(1 - cos)

    for key, value in out.items():
        if key.startswith("embedding:") and key in batch:
            # rows without this embedding carry an all-zero target and a False ``<key>:valid`` flag
            cos = 1 - F.cosine_similarity(value, batch[key], dim=-1)  # [B]
            valid = batch.get(f"{key}:valid")
            if valid is None:
                losses[key] = mean(cos)
            elif bool(valid.any()) or split():
                losses[key] = mean(cos[valid])
            else:
                losses[key] = value.sum() * 0.0

    total = sum((w.of(k) * v for k, v in losses.items()), torch.zeros((), device=device))
    if split():  # every output reaches every rank's loss: the same backward collectives run on every rank
        total = total + reach(*out.values())
    losses["total"] = total
    return losses
