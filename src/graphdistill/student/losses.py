"""Distillation losses, returned BY NAME so each can be logged and weighted.

- ``answer_ce``: cross-entropy on the consensus answer's tokens (sequence-level distillation: the consensus
  of the teacher's K samples is the target text).
- ``answer_kl``: KL(teacher top-k ‖ student) per answer step, only where the loader produced soft targets.
  The teacher's ids live in the teacher LLM's vocabulary (SmolLM2's 49 k tokens), not the student's BPE,
  so the loader maps them across (:func:`graphdistill.student.loader.align_soft_targets`): at each answer
  step where both tokenizers cut the answer at the same character and produce the same piece, the
  teacher's top-k pieces become the student tokens with exactly that text (the rest are dropped); other
  steps get no soft target. With the teacher's own tokenizer the ids are used as they are. The top-k mass is
  renormalised on both sides (the teacher's tail beyond k is unknown).
- ``class``, ``box_l1``, ``box_giou``: DETR set losses after Hungarian matching (see
  :mod:`graphdistill.student.matching` for why); unmatched slots learn "no object" (down-weighted).
- ``mask_bce``, ``mask_dice``: on matched slots, against the teacher's RLE letterboxed to ``mask_size``
  over the whole image (same frame as the prediction, so no per-box crop/paste step exists at inference).
- ``sources``: multi-label BCE over the knowledge-base documents.
- ``embedding:<name>``: 1 − cosine, when the batch carries that target.

Weights are set by loss name (:meth:`LossWeights.from_names`, ``TrainConfig.loss_weights``,
``graphdistill train --loss-weight NAME=W``); an unknown name is an error, never silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from graphdistill.student.matching import cxcywh_to_xyxy, hungarian_match, pairwise_iou_giou


@dataclass
class LossWeights:
    answer_ce: float = 1.0
    answer_kl: float = 0.5
    class_: float = 1.0
    box_l1: float = 5.0
    box_giou: float = 2.0
    mask_bce: float = 2.0
    mask_dice: float = 2.0
    sources: float = 1.0
    embedding: float = 1.0
    no_object: float = 0.1  # relative class weight of "no object" (DETR's eos_coef)
    extra: dict[str, float] = field(default_factory=dict)  # per-embedding weights: "embedding:<name>"

    @classmethod
    def names(cls) -> list[str]:
        """The settable names: each loss as :func:`compute_losses` names it (``class``, not ``class_``),
        ``embedding`` (every embedding loss), ``no_object``; plus ``embedding:<name>`` for one embedding."""
        return [f.name.rstrip("_") for f in fields(cls) if f.name != "extra"]

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
                setattr(w, "class_" if name == "class" else name, value)
            else:
                raise ValueError(
                    f"unknown loss weight {name!r}; known: {', '.join(known)}, embedding:<output name>"
                )
        return w

    def of(self, name: str) -> float:
        if name in self.extra:
            return self.extra[name]
        if name == "class":
            return self.class_
        if name.startswith("embedding:"):
            return self.embedding
        return float(getattr(self, name))


def answer_kl(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, valid: Tensor) -> Tensor:
    """KL(teacher‖student) over the teacher's top-k at each valid step, both renormalised over those k."""
    if not bool(valid.any()):
        return logits.sum() * 0.0
    lp_s = logits.log_softmax(-1).gather(-1, topk_ids)  # [B,La,k]
    finite = torch.isfinite(topk_logprobs)
    lp_t = torch.where(finite, topk_logprobs, torch.full_like(topk_logprobs, -1e9)).log_softmax(-1)
    lp_s = torch.where(finite, lp_s, torch.full_like(lp_s, -1e9)).log_softmax(-1)
    kl = (lp_t.exp() * (lp_t - lp_s)).where(finite, torch.zeros_like(lp_t)).sum(-1)  # [B,La]
    return kl[valid].mean()


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


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
        losses["answer_ce"] = F.cross_entropy(
            logits.flatten(0, 1), batch["answer_target"].flatten(), ignore_index=-100
        )
        if "topk_valid" in batch:
            losses["answer_kl"] = answer_kl(
                logits, batch["topk_ids"], batch["topk_logprobs"], batch["topk_valid"]
            )

    if "boxes" in out and "class_logits" in out and "boxes" in batch:
        cls_logits = out["class_logits"]
        b, q, c1 = cls_logits.shape
        matches = hungarian_match(
            out["boxes"], cls_logits, batch["boxes"], batch["classes"], batch["n_objects"]
        )
        tgt_cls = torch.full((b, q), c1 - 1, dtype=torch.long, device=cls_logits.device)
        bi = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)])
        si = torch.cat([src for src, _ in matches])
        ti = torch.cat([tgt for _, tgt in matches])
        tgt_cls[bi, si] = batch["classes"][bi, ti]
        cw = torch.ones(c1, device=cls_logits.device)
        cw[-1] = w.no_object
        losses["class"] = F.cross_entropy(cls_logits.flatten(0, 1), tgt_cls.flatten(), weight=cw)
        n = max(int(si.numel()), 1)
        pb, tb = out["boxes"][bi, si], batch["boxes"][bi, ti]
        losses["box_l1"] = F.l1_loss(pb, tb, reduction="sum") / n
        if si.numel():
            _, giou = pairwise_iou_giou(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(tb))
            losses["box_giou"] = (1 - giou.diagonal()).sum() / n
        else:
            losses["box_giou"] = pb.sum() * 0.0
        if "mask_logits" in out and "masks" in batch:
            pm = out["mask_logits"][bi, si]
            tm = batch["masks"][bi, ti]
            if tm.shape[-2:] != pm.shape[-2:]:
                tm = F.interpolate(tm[:, None], size=pm.shape[-2:], mode="bilinear", align_corners=False)[
                    :, 0
                ]
            if si.numel():
                losses["mask_bce"] = F.binary_cross_entropy_with_logits(pm, tm)
                losses["mask_dice"] = dice_loss(pm, tm)
            else:
                losses["mask_bce"] = losses["mask_dice"] = out["mask_logits"].sum() * 0.0

    if "source_logits" in out and "sources" in batch:
        k = out["source_logits"].shape[1]
        losses["sources"] = F.binary_cross_entropy_with_logits(out["source_logits"], batch["sources"][:, :k])

    for key, value in out.items():
        if key.startswith("embedding:") and key in batch:
            # rows without this embedding carry an all-zero target and a False ``<key>:valid`` flag
            cos = 1 - F.cosine_similarity(value, batch[key], dim=-1)  # [B]
            valid = batch.get(f"{key}:valid")
            if valid is None:
                losses[key] = cos.mean()
            elif bool(valid.any()):
                losses[key] = cos[valid].mean()
            else:
                losses[key] = value.sum() * 0.0

    losses["total"] = sum((w.of(k) * v for k, v in losses.items()), torch.zeros((), device=device))
    return losses
