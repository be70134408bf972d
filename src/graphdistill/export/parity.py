"""The export gate's measurements: exported vs PyTorch (float), and fidelity to the teacher (int8)."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphdistill.eval.metrics import mask_array_iou, objects_f1, token_f1
from graphdistill.export.programs import Sample
from graphdistill.runner.bundle import Raw, decode_objects
from graphdistill.runner.preprocess import canvas_size
from graphdistill.runner.tta import View, fuse_views, has_near_miss, near_floor, unsure


def parity_float(
    refs: list[Raw],
    got: list[Raw],
    *,
    box_tol: float,
    mask_iou_min: float,
    logit_tol: float = 1e-3,
    has_text: bool = True,
) -> dict[str, Any]:
    """Per input, for the outputs the student has (``has_text``: it decodes an answer): answer tokens identical, max |box difference|, min
    per-query IoU of (mask_logits > 0), max |source logit / embedding difference|. A measure whose head is
    absent is left out of the result."""
    pairs = list(zip(refs, got, strict=True))
    present = set(refs[0].outputs) if refs else set()
    result: dict[str, Any] = {}
    failures = []
    if has_text:
        answers_equal = [r.answer_ids == g.answer_ids for r, g in pairs]
        result["answer_tokens_equal"] = sum(answers_equal) / len(refs)
        if not all(answers_equal):
            failures.append(
                f"answer tokens differ from PyTorch's on {answers_equal.count(False)}/{len(refs)} inputs"
            )
    if "boxes" in present:  # the objects each side keeps: the same slots, classes, boxes and masks
        same, box_diff, ious = 0, [0.0], [1.0]
        for r, g in pairs:
            rk, gk = r.outputs["keep"].astype(bool), g.outputs["keep"].astype(bool)
            if not (
                np.array_equal(rk, gk) and np.array_equal(r.outputs["classes"][rk], g.outputs["classes"][gk])
            ):
                continue
            same += 1
            if rk.any():
                box_diff.append(float(np.abs(r.outputs["boxes"][rk] - g.outputs["boxes"][gk]).max()))
            if "mask_logits" in present:
                ious += [
                    mask_array_iou(rm > 0, gm > 0)
                    for rm, gm in zip(r.outputs["mask_logits"][rk], g.outputs["mask_logits"][gk], strict=True)
                ]
        result["objects_equal"] = same / len(pairs)
        result["box_max_abs_diff"] = max(box_diff)
        if same < len(pairs):
            failures.append(
                f"kept objects (slots, classes) differ from PyTorch's on {len(pairs) - same}/{len(pairs)} inputs"
            )
        if max(box_diff) > box_tol:
            failures.append(f"boxes differ by up to {max(box_diff):.2e} > {box_tol}")
        if "mask_logits" in present:
            result["mask_iou_min"] = min(ious)
            if min(ious) < mask_iou_min:
                failures.append(f"mask IoU down to {min(ious):.4f} < {mask_iou_min}")
    for name in sorted(present):
        if name == "source_logits" or name.startswith("embedding:"):
            diff = max(float(np.abs(r.outputs[name] - g.outputs[name]).max(initial=0.0)) for r, g in pairs)
            result[f"{name}_max_abs_diff"] = diff
            if diff > logit_tol:
                failures.append(f"{name} differs by up to {diff:.2e} > {logit_tol}")
    result["failures"] = failures
    return result


def fidelity(
    loaded: Any, samples: list[Sample], raws: list[Raw], n_views: int = 1, below: float | None = None
) -> dict[str, float]:
    """Mean answer token F1 (with a text head) and box F1 (with an object head: object-match F1, class and
    box IoU >= 0.5) of decoded predictions against the dataset's (teacher) targets; both are
    :mod:`graphdistill.eval.metrics`' measures, as evaluation and training report them.

    ``n_views`` (a bundle with test-time augmentation, :func:`graphdistill.runner.tta.view_images`):
    ``samples`` and ``raws`` hold each input's views one after another (``Sample.view``: how to map each
    back), and each input is scored on its views fused as the runner fuses them (``below``: the runner's
    adaptive policy, :func:`graphdistill.runner.tta.unsure`, decides from the photo's own answer)."""
    size = canvas_size(loaded.preprocessing)
    decoding = dict(loaded.thresholds)
    has_text, has_boxes = loaded.config.has_text, "boxes" in loaded.encode_outputs
    decoded: list[dict[str, Any]] = [
        {
            "answer": loaded.tokenizer.decode(raw.answer_ids) if has_text else None,
            "objects": decode_objects(raw.outputs, s.letterbox, decoding, loaded.class_names, size)
            if has_boxes
            else [],
        }
        for s, raw in zip(samples, raws, strict=True)
    ]
    if n_views > 1:
        kinds = {"answer": "text", "objects": "objects"}
        floor = near_floor(loaded.config.score_threshold)
        decoded = [
            decoded[i]
            if below is not None
            and not unsure(decoded[i], kinds, below, has_near_miss(raws[i].outputs, floor))
            else fuse_views(
                decoded[i : i + n_views],
                [s.view or View() for s in samples[i : i + n_views]],
                kinds,
                (samples[i].letterbox.height, samples[i].letterbox.width),
            )
            for i in range(0, len(decoded), n_views)
        ]
        samples = samples[::n_views]
    f1s, bf1s = [], []
    for s, pred in zip(samples, decoded, strict=True):
        if has_text:
            f1s.append(token_f1(pred["answer"] or "", s.row.answer if s.row is not None else ""))
        if has_boxes:
            bf1s.append(objects_f1(s.row.objects if s.row is not None else (), pred["objects"]))
    out: dict[str, float] = {}
    if has_text:
        out["answer_token_f1"] = float(np.mean(f1s))
    if has_boxes:
        out["box_f1"] = float(np.mean(bf1s))
    out["n"] = len(samples)
    return out
