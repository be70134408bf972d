"""The distillation losses: task-aligned assignment, the dense detection and mask losses (and the rows they
ignore), the detector's per-cell soft targets, the text and summary losses, and their weights by name."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from _fixtures import TINY_STUDENT  # noqa: E402
from graphdistill.student.losses import (  # noqa: E402
    KD_MIN_SCORE,
    LossWeights,
    answer_kl,
    assign,
    compute_losses,
    detection_losses,
    kd_losses,
)
from graphdistill.student.model import EOS_ID, Student, StudentConfig  # noqa: E402
from graphdistill.student.trunks import make_anchors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S = 64  # canvas side: 8x8 + 4x4 + 2x2 = 84 cells
ANCHORS, STRIDES = make_anchors(S)
A = ANCHORS.shape[0]
C = 3


def _inside(box: list[float]) -> torch.Tensor:
    x1, y1, x2, y2 = box
    return (ANCHORS[:, 0] > x1) & (ANCHORS[:, 0] < x2) & (ANCHORS[:, 1] > y1) & (ANCHORS[:, 1] < y2)


def _assign(pred: torch.Tensor, gt: list[list[float]], labels: list[int], **kw: Any) -> Any:
    scores = torch.full((1, A, C), 0.5)
    return assign(
        scores,
        pred[None],
        ANCHORS,
        torch.tensor([labels]),
        torch.tensor([gt], dtype=torch.float32),
        torch.ones(1, len(gt), dtype=torch.bool),
        **kw,
    )


# ---- task-aligned assignment ---------------------------------------------------------------------------------


def test_assign_takes_the_best_aligned_cells_inside_the_box_up_to_topk() -> None:
    box = [0.0, 0.0, 32.0, 32.0]
    inside = _inside(box)
    assert int(inside.sum()) == 16 + 4 + 1
    pred = torch.tensor(box).repeat(A, 1) + 6.0  # every cell predicts the box, shifted: IoU 0.48
    best = int(torch.nonzero(inside)[5])
    pred[best] = torch.tensor(box)  # one cell predicts it exactly
    asg = _assign(pred, [box], [1], topk=1)
    assert torch.nonzero(asg.fg[0]).flatten().tolist() == [best]
    assert float(asg.scores[0, best, 1]) == pytest.approx(1.0, abs=1e-4)  # the best cell's target: its IoU
    assert float(asg.scores[0, best, [0, 2]].abs().sum()) == 0.0  # one-hot on the object's class
    asg = _assign(pred, [box], [1], topk=5)
    fg = asg.fg[0]
    assert int(fg.sum()) == 5 and bool(fg[best]) and not bool((fg & ~inside).any())
    torch.testing.assert_close(asg.boxes[0, fg], torch.tensor(box).repeat(5, 1))
    # the soft targets scale with how well each cell predicts the object: the exact cell gets the most
    targets = asg.scores[0, fg, 1]
    assert float(targets.max()) == pytest.approx(float(asg.scores[0, best, 1])) and float(targets.min()) < 0.5
    assert not bool(asg.scores[0, ~fg].any())  # background cells: all zeros
    # a cell whose centre lies outside the box is never assigned, however well it predicts the box
    outside = int(torch.nonzero(~inside)[0])
    pred[outside] = torch.tensor(box)
    assert not bool(_assign(pred, [box], [1], topk=30).fg[0, outside])


def test_a_cell_claimed_by_two_objects_goes_to_the_one_it_overlaps_most() -> None:
    a, b = [0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 40.0, 40.0]
    both = _inside(a) & _inside(b)
    only_a = _inside(a) & ~_inside(b)
    assert int(both.sum()) == 11 and int(only_a.sum()) > 0
    for pred_box, winner in ((b, 1), (a, 0)):
        asg = _assign(torch.tensor(pred_box).repeat(A, 1), [a, b], [0, 2], topk=100)
        fg, target = asg.fg[0], asg.target[0]
        assert bool(fg[both].all()) and bool((target[both] == winner).all()), pred_box
        assert bool((target[only_a] == 0).all())
        cls = asg.scores[0, both].argmax(-1)  # the class target follows the winner
        assert bool((cls == (2 if winner == 1 else 0)).all())


def test_no_objects_give_zero_targets() -> None:
    pred = torch.tensor([0.0, 0.0, 32.0, 32.0]).repeat(A, 1)
    for gt_boxes, valid in (
        (torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool)),
        (torch.tensor([[[0.0, 0.0, 32.0, 32.0]]]), torch.zeros(1, 1, dtype=torch.bool)),  # an empty slot
    ):
        labels = torch.zeros(1, gt_boxes.shape[1], dtype=torch.long)
        asg = assign(torch.full((1, A, C), 0.9), pred[None], ANCHORS, labels, gt_boxes, valid)
        assert not bool(asg.fg.any()) and not bool(asg.scores.any())


# ---- dense detection and mask losses -------------------------------------------------------------------------


def _dense(b: int, seed: int = 0, m: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "det_dist": torch.randn(b, 64, A, generator=g),
        "det_cls": torch.randn(b, C, A, generator=g) - 3,
        "det_coef": torch.randn(b, m, A, generator=g),
        "protos": torch.randn(b, m, S // 4, S // 4, generator=g),
    }
    out = {k: v.requires_grad_() for k, v in out.items()}
    return {**out, "det_anchors": ANCHORS, "det_strides": STRIDES}


def _targets(b: int, boxes: list[list[float]], classes: list[int], k: int = 3) -> dict[str, torch.Tensor]:
    n = len(boxes)
    px = torch.zeros(b, k, 4)
    px[:, :n] = torch.tensor(boxes)
    cls = torch.full((b, k), -1, dtype=torch.long)
    cls[:, :n] = torch.tensor(classes)
    masks = torch.zeros(b, k, S // 4, S // 4)
    for j, (x1, y1, x2, y2) in enumerate(boxes):  # the object's mask: the left half of its box
        masks[:, j, int(y1) // 4 : int(y2) // 4, int(x1) // 4 : int(x1 + x2) // 8] = 1.0
    return {
        "obj_boxes_px": px,
        "obj_classes": cls,
        "obj_valid": cls >= 0,
        "obj_masks": masks,
        "obj_has_mask": cls >= 0,
        "vision_ok": torch.ones(b, dtype=torch.bool),
    }


def test_detection_losses_leave_out_rows_whose_objects_do_not_describe_the_image() -> None:
    """A counterfactual replay's objects were edited (``vision_ok`` False): whatever they are, its row changes
    no detection or mask loss and gets no gradient; a real row's objects do matter."""
    out = _dense(2)
    batch = _targets(2, [[4.0, 4.0, 30.0, 36.0], [34.0, 20.0, 60.0, 50.0]], [0, 2])
    batch["vision_ok"] = torch.tensor([True, False])
    base = detection_losses(out, batch)
    assert set(base) == {"det_cls", "det_box", "det_dfl", "mask_bce"}
    edited = {k: v.clone() for k, v in batch.items()}
    edited["obj_boxes_px"][1] = torch.tensor([[0.0, 0.0, 60.0, 60.0], [1.0, 1.0, 9.0, 9.0], [20, 20, 40, 40]])
    edited["obj_classes"][1] = torch.tensor([1, 1, 1])
    edited["obj_valid"][1] = True
    edited["obj_masks"][1] = 1.0
    for name, value in detection_losses(out, edited).items():
        assert torch.equal(value, base[name]), name
    sum(base.values()).backward()  # type: ignore[union-attr]
    for key in ("det_dist", "det_cls", "det_coef"):
        grad = out[key].grad
        assert grad is not None and not bool(grad[1].any()) and bool(grad[0].any()), key
    real = {k: v.clone() for k, v in batch.items()}
    real["obj_boxes_px"][0, 0] = torch.tensor([30.0, 30.0, 62.0, 62.0])
    moved = detection_losses(out, real)
    assert all(not torch.equal(moved[k], base[k]) for k in base)


def test_dense_losses_pull_a_cell_onto_the_teachers_object_and_mask() -> None:
    """Minimising det_cls + det_box + det_dfl + mask_bce from random dense outputs: each loss falls, and the
    student's own selection then reports the teacher's object (class, box, mask)."""
    # the tiny student at this test's canvas and classes, with the 4 masks _dense() draws; only its selection runs
    cfg = StudentConfig(
        **{
            **TINY_STUDENT,
            "image_size": S,
            "num_classes": C,
            "num_masks": 4,
            "outputs": {"objects": "objects"},
        }
    )
    student = Student(cfg).eval()
    out = _dense(1, seed=1)
    box = [10.0, 14.0, 42.0, 50.0]
    batch = _targets(1, [box], [1])
    params = [out[k] for k in ("det_dist", "det_cls", "det_coef", "protos")]
    opt = torch.optim.Adam(params, lr=0.05)
    history = []
    for _ in range(150):
        losses = compute_losses(out, batch)
        history.append({k: float(v.detach()) for k, v in losses.items()})
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
    first, last = history[0], history[-1]
    assert set(first) == {"det_cls", "det_box", "det_dfl", "mask_bce", "total"}
    for name in first:
        assert last[name] < 0.5 * first[name], (name, first[name], last[name])
    with torch.no_grad():
        sel = student.select({k: v.detach() for k, v in out.items()})
    assert bool(sel["keep"][0, 0]) and int(sel["classes"][0, 0]) == 1 and float(sel["scores"][0, 0]) > 0.5
    cx, cy, w, h = (sel["boxes"][0, 0] * S).tolist()
    got = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    from graphdistill.eval.metrics import box_iou

    assert float(box_iou([got], [box])[0, 0]) > 0.85, got
    mask = sel["mask_logits"][0, 0] > 0  # inside the box (where masks are pasted) it is the teacher's mask
    y0, y1, x0, x1 = int(box[1]) // 4, int(box[3]) // 4, int(box[0]) // 4, int(box[2]) // 4
    want = batch["obj_masks"][0, 0].bool()
    inside = mask[y0:y1, x0:x1], want[y0:y1, x0:x1]
    iou = float((inside[0] & inside[1]).sum() / (inside[0] | inside[1]).sum())
    assert iou > 0.8, iou


def test_the_detectors_own_outputs_are_matched_on_valid_rows_and_confident_cells_only() -> None:
    g = torch.Generator().manual_seed(0)
    n = 80  # the cells the detector's targets cover (strides 8 and 16 of the student)
    t_cls = torch.rand(2, C, n, generator=g) * 0.05
    t_cls[:, 1, :5] = 0.9  # five confident cells per row
    t_dist = torch.randn(2, 64, n, generator=g)
    batch = {"kd_cls": t_cls, "kd_dist": t_dist, "kd_valid": torch.tensor([True, False])}
    logit = torch.log(t_cls / (1 - t_cls))
    out = {
        "det_cls": torch.cat([logit, torch.zeros(2, C, A - n)], 2).requires_grad_(),
        "det_dist": torch.cat([t_dist, torch.zeros(2, 64, A - n)], 2).requires_grad_(),
    }
    losses = kd_losses(out, batch)
    assert set(losses) == {"kd_cls", "kd_box"}
    assert float(losses["kd_box"].detach()) == pytest.approx(
        0.0, abs=1e-6
    )  # the detector's own distributions
    (losses["kd_cls"] + losses["kd_box"]).backward()
    grad_cls, grad_dist = out["det_cls"].grad, out["det_dist"].grad
    assert grad_cls is not None and grad_dist is not None
    assert float(grad_cls.abs().max()) < 1e-6  # sigmoid(student) = detector: the BCE's minimum
    assert not bool(grad_cls[:, :, n:].any())  # the stride-32 cells have no counterpart
    # box distillation reads cells the detector is confident on, in valid rows only
    moved = {k: v.detach().clone() for k, v in out.items()}
    moved["det_dist"][0, :, 10:20] += 3.0  # unconfident cells of a valid row
    moved["det_dist"][1] += 3.0  # everything in the row without targets
    moved["det_cls"][1] += 3.0
    assert bool((t_cls[0, :, 10:20].amax(0) < KD_MIN_SCORE).all())
    again = kd_losses(moved, batch)
    assert float(again["kd_box"]) == pytest.approx(0.0, abs=1e-6)
    assert float(again["kd_cls"]) == pytest.approx(float(losses["kd_cls"].detach()), rel=1e-6)
    moved["det_dist"][0, :, :5] += torch.randn(64, 5, generator=g)
    assert float(kd_losses(moved, batch)["kd_box"]) > 0.01


# ---- text and summary heads, the total --------------------------------------------------------------------


def test_text_and_summary_losses_are_named_and_near_zero_for_a_perfect_prediction() -> None:
    la, v = 4, 10
    target = torch.tensor([[5, 6, EOS_ID, -100]])
    logits = torch.full((1, la, v), -30.0)
    for t, tok in enumerate([5, 6, EOS_ID, 0]):
        logits[0, t, tok] = 30.0
    out = {"answer_logits": logits.log_softmax(-1), "source_logits": torch.tensor([[30.0, -30.0]])}
    batch = {"answer_target": target, "sources": torch.tensor([[1.0, 0.0]])}
    losses = compute_losses(out, batch)
    assert set(losses) == {"answer_ce", "sources", "total"}
    for name in ("answer_ce", "sources", "total"):
        assert float(losses[name]) < 1e-3, name
    out["answer_logits"] = torch.roll(out["answer_logits"], 1, dims=-1)
    worse = compute_losses(out, batch)
    assert float(worse["answer_ce"]) > 10 and float(worse["total"]) > float(losses["total"])


def test_a_batch_with_no_answer_tokens_gives_a_zero_answer_loss_not_nan() -> None:
    logits = torch.randn(2, 4, 10, requires_grad=True)
    out = {"answer_logits": logits.log_softmax(-1), "source_logits": torch.tensor([[3.0, -3.0]] * 2)}
    batch = {"answer_target": torch.full((2, 4), -100), "sources": torch.tensor([[1.0, 0.0]] * 2)}
    losses = compute_losses(out, batch)
    assert float(losses["answer_ce"].detach()) == 0.0 and torch.isfinite(losses["total"].detach())
    losses["total"].backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    # with tokens it is the mean over them, as cross_entropy's own mean
    batch["answer_target"] = torch.tensor([[1, 2, -100, -100], [3, -100, -100, -100]])
    want = torch.nn.functional.cross_entropy(
        out["answer_logits"].detach().flatten(0, 1), batch["answer_target"].flatten()
    )
    assert float(compute_losses(out, batch)["answer_ce"].detach()) == pytest.approx(float(want), rel=1e-6)


def test_the_total_is_the_weighted_sum_by_name() -> None:
    out = {**_dense(1), "source_logits": torch.zeros(1, 2)}
    batch = {**_targets(1, [[4.0, 4.0, 30.0, 36.0]], [0]), "sources": torch.tensor([[1.0, 0.0]])}
    w = LossWeights.from_names({"det_box": 0, "det_cls": 3, "sources": 0.25})
    losses = compute_losses(out, batch, w)
    parts = {k: v for k, v in losses.items() if k != "total"}
    assert set(parts) == {"det_cls", "det_box", "det_dfl", "mask_bce", "sources"}
    want = 3 * parts["det_cls"] + w.det_dfl * parts["det_dfl"] + w.mask_bce * parts["mask_bce"]
    torch.testing.assert_close(losses["total"], want + 0.25 * parts["sources"])


def test_answer_kl_is_zero_when_the_student_matches_the_teacher_top_k() -> None:
    logits = torch.randn(1, 2, 12)
    top = logits.log_softmax(-1).topk(3)
    valid = torch.tensor([[True, False]])
    kl = answer_kl(logits, top.indices, top.values, valid)
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    shifted = top.values.clone()
    shifted[..., 0] -= 3.0
    assert float(answer_kl(logits, top.indices, shifted, valid)) > 0.01
    assert float(answer_kl(logits, top.indices, top.values, valid & False)) == 0.0
    # log-probabilities in, as the copy path gives them: the same KL as from the logits
    assert float(answer_kl(logits.log_softmax(-1), top.indices, shifted, valid)) == pytest.approx(
        float(answer_kl(logits, top.indices, shifted, valid)), rel=1e-5
    )


def test_embedding_loss_is_one_minus_cosine_over_rows_that_have_the_target() -> None:
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    batch = {
        "embedding:e": torch.tensor([[2.0, 0.0], [1.0, 0.0]]),
        "embedding:e:valid": torch.tensor([True, False]),
    }
    losses = compute_losses({"embedding:e": pred}, batch)
    assert float(losses["embedding:e"]) == pytest.approx(0.0, abs=1e-6)  # row 2 has no target
    batch["embedding:e:valid"] = torch.tensor([True, True])
    assert float(compute_losses({"embedding:e": pred}, batch)["embedding:e"]) == pytest.approx(0.5)
    assert set(compute_losses({"embedding:e": pred}, batch)) == {"embedding:e", "total"}


def test_loss_weights_are_set_by_loss_name_and_unknown_names_are_refused() -> None:
    w = LossWeights.from_names({"det_cls": 3, "det_box": 0, "kd_cls": 0.3, "embedding:clip": 2})
    assert (w.of("det_cls"), w.of("det_box"), w.of("det_dfl"), w.kd_cls) == (3, 0, LossWeights().det_dfl, 0.3)
    assert w.of("embedding:clip") == 2 and w.of("embedding:other") == LossWeights().embedding
    with pytest.raises(ValueError, match="unknown loss weight 'box_l1'; known: answer_ce, .*det_box") as e:
        LossWeights.from_names({"box_l1": 0})  # the set-prediction head's loss: gone
    for name in ("answer_kl", "det_cls", "det_dfl", "kd_cls", "kd_box", "mask_bce", "sources", "embedding"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="unknown loss weight 'extra'"):
        LossWeights.from_names({"extra": 1})  # a field of the dataclass, not a loss
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        LossWeights.from_names({"mask_bce": -1})
    with pytest.raises(ValueError, match="no embedding output 'clip'"):
        LossWeights.from_names({"embedding:clip": 1}, embeddings={"image_embedding": 8})


def test_sources_loss_spreads_the_target_over_the_retrieved_documents_and_skips_rows_without_any() -> None:
    from graphdistill.student.losses import sources_loss

    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    good = torch.tensor([[9.0, 9.0, -9.0, -9.0], [0.0, 0.0, 0.0, 0.0]])
    # each retrieved document holds half the mass: two equal winning logits are the optimum
    assert float(sources_loss(good, targets)) == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-3)
    one_sided = torch.tensor([[9.0, -9.0, -9.0, -9.0], [5.0, 0.0, 0.0, 0.0]])
    assert float(sources_loss(one_sided, targets)) > float(sources_loss(good, targets)) + 1.0
    # the second row retrieved nothing: changing its logits changes nothing
    assert float(
        sources_loss(good + torch.tensor([[0.0], [3.0]]) * torch.arange(4.0), targets)
    ) == pytest.approx(float(sources_loss(good, targets)))
    assert float(sources_loss(good, torch.zeros(2, 4))) == 0.0
