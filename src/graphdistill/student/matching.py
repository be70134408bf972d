"""Box geometry and DETR-style Hungarian matching of the student's object slots to the teacher's objects.

Why set matching rather than a dense (anchor/grid) assignment: the student predicts a fixed set of Q slots
and the teacher's objects come in an arbitrary order (detector score order, which changes with tiny image
changes). Matching each teacher object to the slot that already predicts it best (class + L1 + GIoU cost,
``scipy.optimize.linear_sum_assignment``) gives one stable target per slot and no duplicate-suppression
step at inference. Q and the number of objects are small (≤ ~10), so the exact assignment is cheap.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def pairwise_iou_giou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """xyxy boxes a [N,4], b [M,4] -> (IoU [N,M], GIoU [N,M])."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union.clamp(min=1e-9)
    lt_c = torch.min(a[:, None, :2], b[None, :, :2])
    rb_c = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou, iou - (hull - union) / hull.clamp(min=1e-9)


@torch.no_grad()
def hungarian_match(
    boxes: Tensor,
    class_logits: Tensor,
    tgt_boxes: Tensor,
    tgt_classes: Tensor,
    n_targets: Tensor,
    *,
    w_class: float = 1.0,
    w_l1: float = 5.0,
    w_giou: float = 2.0,
) -> list[tuple[Tensor, Tensor]]:
    """Per image: (slot indices, target indices) of the minimum-cost assignment.

    boxes [B,Q,4] cxcywh, class_logits [B,Q,C+1], tgt_boxes [B,N,4] cxcywh (padded), tgt_classes [B,N],
    n_targets [B] (how many of the N are real). Costs follow DETR: −p(class) + L1 + −GIoU.
    """
    from scipy.optimize import linear_sum_assignment

    out: list[tuple[Tensor, Tensor]] = []
    prob = class_logits.softmax(-1)
    for i in range(boxes.shape[0]):
        n = int(n_targets[i])
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
            out.append((empty, empty))
            continue
        tb, tc = tgt_boxes[i, :n], tgt_classes[i, :n]
        c_cls = -prob[i][:, tc]  # [Q,n]
        c_l1 = torch.cdist(boxes[i], tb, p=1)
        _, giou = pairwise_iou_giou(cxcywh_to_xyxy(boxes[i]), cxcywh_to_xyxy(tb))
        cost = w_class * c_cls + w_l1 * c_l1 - w_giou * giou
        rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
        out.append(
            (
                torch.as_tensor(rows, dtype=torch.long, device=boxes.device),
                torch.as_tensor(cols, dtype=torch.long, device=boxes.device),
            )
        )
    return out
