"""The student model, tokenizer and loader: shapes, KV-cache equivalence, the in-graph object selection, the
copy path, preprocessing, and the heads a teacher graph's schema asks for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("tokenizers")

from _fixtures import TINY_STUDENT_96  # noqa: E402
from graphdistill.student.loader import (  # noqa: E402
    MEAN,
    STD,
    UNIT,
    StudentDataset,
    collate,
    letterbox_mask,
    normalisation,
    preprocess_image,
    preprocess_spec,
    spec_of,
)
from graphdistill.student.model import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Student,
    StudentConfig,
    StudentProtocol,
    count_parameters,
    preset,
)
from graphdistill.student.tokenizer import StudentTokenizer  # noqa: E402
from graphdistill.student.trunks import make_anchors  # noqa: E402

# the tiny student at 96 px (CELLS_96 and the memory-length checks count its 3 x 3 stride-32 grid) with two
# decoder layers (the KV cache's layer axis is not trivial), and by hand what the trainer would derive from a
# dataset: three classes and documents, the vocabulary and the texts' lengths
SMALL = {
    **TINY_STUDENT_96,
    "dec_layers": 2,
    "num_classes": 3,
    "class_token_ids": [100, 101, 102],
    "num_sources": 3,
    "vocab_size": 120,
    "max_question_len": 10,
    "max_answer_len": 16,
}
CELLS_96 = (96 // 8) ** 2 + (96 // 16) ** 2 + (96 // 32) ** 2  # every cell of strides 8, 16, 32


def _inputs(cfg: StudentConfig, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    q = torch.randint(4, cfg.vocab_size, (b, cfg.max_question_len), generator=g)
    qm = torch.ones(b, cfg.max_question_len, dtype=torch.bool)
    qm[1:, 6:] = False
    q[~qm] = PAD_ID
    return img, q, qm


def _objects(b: int, k: int, classes: list[int], valid: list[bool]) -> dict[str, torch.Tensor]:
    """Teacher-forced objects (the loader's ``obj_*`` keys): the same objects in every row."""
    n = len(classes)
    cls = torch.full((b, k), -1, dtype=torch.long)
    cls[:, :n] = torch.tensor(classes)
    ok = torch.zeros(b, k, dtype=torch.bool)
    ok[:, :n] = torch.tensor(valid)
    boxes = torch.tensor([0.3, 0.4, 0.2, 0.3]).repeat(b, k, 1)
    return {"obj_classes": cls, "obj_boxes": boxes, "obj_scores": torch.full((b, k), 0.9), "obj_valid": ok}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> Student:
    torch.manual_seed(0)
    return Student(StudentConfig(**SMALL)).eval()  # type: ignore[arg-type]


def test_presets_stay_within_their_parameter_budgets() -> None:
    tiny = count_parameters(Student(preset("tiny")))
    small = count_parameters(Student(preset("small")))
    assert 0.5e6 < tiny <= 3e6
    assert tiny < small <= 10e6
    # presets size the text side; both run at the measured default input size, below the detector's 640
    default = StudentConfig().image_size
    assert preset("tiny").image_size == preset("small").image_size == default and 256 <= default < 640


def test_config_round_trips_and_rejects_bad_values() -> None:
    cfg = preset("tiny", embedding_dims={"clip": 16})
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        StudentConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown StudentConfig fields"):
        StudentConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="trunk must be 'timm' or 'ultralytics'"):
        StudentConfig(trunk="resnet")
    with pytest.raises(ValueError, match="needs trunk_spec"):
        StudentConfig(trunk="ultralytics")
    with pytest.raises(ValueError, match=r"max_objects \(30\) must be between 1 and candidates \(20\)"):
        StudentConfig(max_objects=30, candidates=20)
    with pytest.raises(ValueError, match="class_token_ids has 2 ids for num_classes=3"):
        StudentConfig(num_classes=3, class_token_ids=[5, 6])


def test_a_config_of_the_old_set_prediction_student_is_refused_clearly() -> None:
    old = {**StudentConfig().to_dict(), "num_queries": 20, "det_layers": 2, "mask_size": 32}
    for gone in (
        "reg_max",
        "num_masks",
        "proto_channels",
        "max_objects",
        "candidates",
        "trunk",
        "trunk_spec",
    ):
        old.pop(gone)
    with pytest.raises(ValueError, match=r"set-prediction \(DETR-style\) object head.*train the run again"):
        StudentConfig.from_dict(old)


def test_output_shapes_follow_the_config(model: Student) -> None:
    cfg = model.config
    k, grid = cfg.max_objects, cfg.image_size // 4
    img, q, qm = _inputs(cfg)
    answer_in = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        out = model(img, q, qm, answer_in)
    # the answer is log-probabilities (the copy path mixes two distributions): each step sums to 1
    assert out["answer_logits"].shape == (2, 7, cfg.vocab_size)
    torch.testing.assert_close(out["answer_logits"].exp().sum(-1), torch.ones(2, 7))
    # the objects, selected in the graph: static shapes, a keep flag per slot
    assert out["boxes"].shape == (2, k, 4) and out["scores"].shape == (2, k)
    assert out["classes"].shape == (2, k) and out["classes"].dtype == torch.int64
    assert int(out["classes"].min()) >= 0 and int(out["classes"].max()) < cfg.num_classes
    assert out["keep"].shape == (2, k) and out["keep"].dtype == torch.bool
    assert float(out["scores"].min()) >= 0 and float(out["scores"].max()) <= 1
    for keep, scores in zip(out["keep"], out["scores"], strict=True):  # the kept objects first, best first
        n = int(keep.sum())
        assert bool(keep[:n].all()) and bool((scores[: max(n - 1, 0)] >= scores[1:n]).all())
    assert out["mask_logits"].shape == (2, k, grid, grid)
    assert out["source_logits"].shape == (2, cfg.num_sources)
    assert out["memory"].shape == (2, model.n_ctx, cfg.d_model)
    assert model.n_ctx == cfg.num_registers + (cfg.image_size // 32) ** 2 + k
    # the copy path's per-query inputs: every object slot, then every token of the sources_k best documents
    n = model.n_copy
    assert n == k + min(cfg.sources_k, cfg.num_sources) * 1  # SMALL's documents have no text: one pad each
    assert out["ptr_keys"].shape == (2, n, cfg.d_model) and out["ptr_bias"].shape == (2, n)
    assert out["ptr_vocab"].shape == (2, n, cfg.vocab_size)
    assert not any(key.startswith("det_") for key in out)  # dense outputs only in training
    assert isinstance(model, StudentProtocol)


def test_training_mode_returns_the_dense_outputs_and_reads_the_teachers_objects() -> None:
    torch.manual_seed(0)
    m = Student(StudentConfig(**SMALL)).train()  # type: ignore[arg-type]
    cfg = m.config
    img, q, qm = _inputs(cfg)
    objects = _objects(2, cfg.max_objects, [1, 2], [True, True])
    out = m(img, q, qm, torch.randint(0, cfg.vocab_size, (2, 5)), objects=objects)
    assert out["det_dist"].shape == (2, 4 * cfg.reg_max, CELLS_96)
    assert out["det_cls"].shape == (2, cfg.num_classes, CELLS_96)
    assert out["det_coef"].shape == (2, cfg.num_masks, CELLS_96)
    assert out["protos"].shape == (2, cfg.num_masks, 24, 24)
    assert out["det_anchors"].shape == (CELLS_96, 2) and out["det_strides"].shape == (CELLS_96, 1)
    assert "boxes" not in out  # teacher forcing: no selection from an untrained head
    # the object tokens are the teacher's: their class tokens feed the copy path
    assert torch.equal(out["ptr_vocab"][:, 0].argmax(-1), torch.tensor([101, 101]))
    k = cfg.max_objects  # the object slots come first; empty ones are never copied
    assert torch.equal(out["ptr_bias"][:, 2:k], torch.full((2, k - 2), -1e9))
    # without objects, training selects from its own head like inference does
    own = m(img, q, qm, torch.randint(0, cfg.vocab_size, (2, 5)))
    assert own["boxes"].shape == (2, cfg.max_objects, 4) and "det_cls" in own


def test_embedding_heads_come_from_the_config() -> None:
    m = Student(StudentConfig(**{**SMALL, "embedding_dims": {"clip": 8}})).eval()  # type: ignore[arg-type]
    img, q, qm = _inputs(m.config)
    with torch.no_grad():
        out = m.encode(img, q, qm)
    assert out["embedding:clip"].shape == (2, 8)


def test_question_padding_does_not_change_the_answer(model: Student) -> None:
    cfg = model.config
    img, q, qm = _inputs(cfg)
    q2 = q.clone()
    q2[~qm] = 7  # garbage under the mask must be ignored
    with torch.no_grad():
        a = model.encode(img, q, qm)
        b = model.encode(img, q2, qm)
        ids_a = model.generate(img, q, qm, 8, encoded=a)
        ids_b = model.generate(img, q2, qm, 8, encoded=b)
    torch.testing.assert_close(a, b)
    assert torch.equal(ids_a, ids_b)


def test_decode_step_matches_full_recompute_at_every_position(model: Student) -> None:
    cfg = model.config
    img, q, qm = _inputs(cfg)
    seq = torch.randint(4, cfg.vocab_size, (2, cfg.max_answer_len))
    seq[:, 0] = BOS_ID
    with torch.no_grad():
        # teacher-forced objects with class tokens: the copy path is live in every step compared here
        enc = model.encode(img, q, qm, _objects(2, cfg.max_objects, [0, 2], [True, True]))
        memory, ptr = enc["memory"], model.pointer_of(enc)
        assert ptr is not None and bool((ptr["ptr_bias"][:, :2] == 0).all())
        full = model.decode_full(seq, memory, ptr)
        cache = model.empty_cache(2)
        eager_cache, cross = model.empty_cache(2), model.cross_kv(memory)
        for t in range(cfg.max_answer_len):
            pos = torch.tensor([t])
            before = cache.clone()
            tok = seq[:, t : t + 1]
            prev = seq[:, t - 1 : t] if t else torch.full_like(tok, BOS_ID)  # the copy path reads it
            logits, new = model.decode_step(tok, pos, memory, cache, pointer=ptr, prev_token=prev)
            assert torch.equal(cache, before)  # the step reads the cache; storing kv_new is the caller's job
            assert new.shape == (cfg.dec_layers, 2, 2, cfg.n_heads, 1, cfg.head_dim)
            torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4)
            # generate()'s in-place, unmasked eager step is the same function and writes the same cache slot
            x = model.tok_emb(seq[:, t : t + 1]) + model.a_pos.weight[t]
            for layer, kv, cr in zip(model.dec, eager_cache, cross, strict=True):
                x = layer.step_eager(x, t, kv[0], kv[1], cr)
            eager = model.copy_mix(model.dec_norm(x), ptr, tok, prev)[:, 0]
            torch.testing.assert_close(eager, logits, atol=1e-5, rtol=1e-5)
            fast, fast_new = model.decode_step(tok, pos, memory, cache, cross, ptr, prev)
            torch.testing.assert_close(fast, logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast_new, new, atol=1e-5, rtol=1e-5)
            cache = model.write_kv(cache, new, pos)
            torch.testing.assert_close(cache[:, :, :, :, : t + 1], eager_cache[:, :, :, :, : t + 1])
            assert not cache[:, :, :, :, t + 1 :].any()  # nothing written past this position
        assert cache.shape == (cfg.dec_layers, 2, 2, cfg.n_heads, cfg.max_answer_len, cfg.head_dim)
        # per-row positions ([B,1]) give the same result as a shared one ([1])
        c1, _ = model.decode_step(
            seq[:, :1], torch.tensor([[0], [0]]), memory, model.empty_cache(2), pointer=ptr
        )
        torch.testing.assert_close(c1, full[:, 0], atol=1e-4, rtol=1e-4)


def test_write_kv_stores_each_row_at_its_own_position(model: Student) -> None:
    cfg = model.config
    cache = torch.zeros(cfg.dec_layers, 2, 2, cfg.n_heads, cfg.max_answer_len, cfg.head_dim)
    new = torch.randn(cfg.dec_layers, 2, 2, cfg.n_heads, 1, cfg.head_dim)
    out = model.write_kv(cache, new, torch.tensor([[3], [5]]))
    assert not cache.any()  # functional: the input is untouched
    torch.testing.assert_close(out[:, :, 0, :, 3], new[:, :, 0, :, 0])
    torch.testing.assert_close(out[:, :, 1, :, 5], new[:, :, 1, :, 0])
    out[:, :, 0, :, 3] = 0
    out[:, :, 1, :, 5] = 0
    assert not out.any()  # and nothing else was written


def test_generate_with_kv_cache_equals_generate_without(model: Student) -> None:
    img, q, qm = _inputs(model.config)
    with torch.no_grad():
        enc = model.encode(img, q, qm, _objects(2, model.config.max_objects, [1], [True]))
        cached = model.generate(img, q, qm, 12, encoded=enc)
        plain = model.generate(img, q, qm, 12, encoded=enc, use_cache=False)
        own = model.generate(img, q, qm, 12)  # encodes itself, with its own objects
    assert cached.shape == own.shape == (2, 12)
    assert torch.equal(cached, plain)


# ---- the in-graph selection --------------------------------------------------------------------------------


def _dist_for(xyxy: torch.Tensor, image_size: int, reg_max: int) -> torch.Tensor:
    """det_dist [1, 4·R, A] whose DFL expectation decodes to ``xyxy`` [A, 4] (px) at every cell exactly: each
    side's distance as a distribution over its two neighbouring bins."""
    anchors, strides = make_anchors(image_size)
    ltrb = torch.cat([anchors - xyxy[:, :2], xyxy[:, 2:] - anchors], -1) / strides
    assert bool((ltrb >= 0).all() and (ltrb <= reg_max - 1).all()), "each cell's centre must be in its box"
    left = ltrb.floor().clamp(max=reg_max - 2)
    right_w = ltrb - left
    probs = torch.zeros(*ltrb.shape, reg_max)
    probs.scatter_(-1, left.long()[..., None], (1 - right_w)[..., None])
    probs.scatter_add_(-1, left.long()[..., None] + 1, right_w[..., None])
    return probs.clamp(min=1e-12).log().permute(1, 2, 0).reshape(1, 4 * reg_max, -1)


def _cell(ix: int, iy: int, level: int = 0, image_size: int = 64) -> int:
    """The flat index of cell (ix, iy) of a level (0: stride 8, 1: stride 16, 2: stride 32)."""
    grids = [image_size // s for s in (8, 16, 32)]
    return sum(g * g for g in grids[:level]) + iy * grids[level] + ix


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_in_graph_selection_equals_a_reference_nms() -> None:
    """Duplicates of one class are one object, overlapping objects of different classes are two, a score
    under the threshold is no object, and at most max_objects are kept: what the detector's own NMS keeps."""
    tv = pytest.importorskip("torchvision")
    cfg = StudentConfig(  # type: ignore[arg-type]
        **{
            **SMALL,
            "image_size": 64,
            "max_objects": 3,
            "candidates": 10,
            "score_threshold": 0.25,
            "nms_iou": 0.7,
        }
    )
    m = Student(cfg).eval()
    anchors, _ = make_anchors(64)
    a = anchors.shape[0]
    #         cell               class score  box (px)
    cells = [
        (_cell(2, 2), 0, 0.90, [8, 8, 40, 40]),
        (_cell(3, 3), 0, 0.80, [9, 9, 41, 41]),  # the same object again (IoU 0.88): suppressed
        (_cell(1, 1, 1), 0, 0.70, [10, 10, 40, 40]),  # and again, from the stride-16 level
        (_cell(2, 3), 1, 0.85, [8, 8, 40, 41]),  # the same place, another class: kept
        (_cell(6, 6), 2, 0.10, [44, 44, 60, 60]),  # under the score threshold: dropped
        (_cell(6, 1), 0, 0.60, [44, 4, 60, 20]),
        (_cell(1, 6), 0, 0.50, [4, 44, 20, 60]),  # a fourth object: max_objects is 3
    ]
    rows = [cells, cells[:2]]  # the second image: one object and its duplicate
    dist, logits = [], []
    for row in rows:
        xyxy = torch.cat([anchors - 3.0, anchors + 3.0], -1)  # every other cell: a small box, no class
        cls = torch.full((cfg.num_classes, a), -12.0)
        for i, c, p, box in row:
            xyxy[i] = torch.tensor(box, dtype=torch.float32)
            cls[c, i] = _logit(p)
        dist.append(_dist_for(xyxy, 64, cfg.reg_max))
        logits.append(cls)
    g = torch.Generator().manual_seed(0)
    dense = {
        "det_dist": torch.cat(dist),
        "det_cls": torch.stack(logits),
        "det_coef": torch.randn(2, cfg.num_masks, a, generator=g),
        "protos": torch.randn(2, cfg.num_masks, 16, 16, generator=g),
    }
    with torch.no_grad():
        torch.testing.assert_close(
            m.decode_boxes(dense["det_dist"])[0, _cell(2, 2)], torch.tensor([8.0, 8, 40, 40])
        )
        out = m.select(dense)
    for r, row in enumerate(rows):
        boxes = torch.tensor([box for _, _, _, box in row], dtype=torch.float32)
        scores = torch.tensor([p for _, _, p, _ in row])
        labels = torch.tensor([c for _, c, _, _ in row])
        ok = scores >= cfg.score_threshold
        keep = tv.ops.batched_nms(boxes[ok], scores[ok], labels[ok], cfg.nms_iou)[: cfg.max_objects]
        want_xyxy, want_scores, want_labels = boxes[ok][keep], scores[ok][keep], labels[ok][keep]
        n = len(keep)
        assert n == (3 if r == 0 else 1)
        assert out["keep"][r].tolist() == [True] * n + [False] * (cfg.max_objects - n)
        assert out["classes"][r, :n].tolist() == want_labels.tolist()
        torch.testing.assert_close(out["scores"][r, :n], want_scores, atol=1e-5, rtol=1e-5)
        x1, y1, x2, y2 = (want_xyxy / 64).unbind(-1)
        want_boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
        torch.testing.assert_close(out["boxes"][r, :n], want_boxes, atol=1e-4, rtol=1e-4)
    # each object's mask is its own cell's coefficients times the prototypes
    for slot, cell in enumerate([_cell(2, 2), _cell(2, 3), _cell(6, 1)]):
        want = torch.einsum("m,mhw->hw", dense["det_coef"][0, :, cell], dense["protos"][0])
        torch.testing.assert_close(out["mask_logits"][0, slot], want, atol=1e-5, rtol=1e-5)


def test_the_slots_after_the_kept_objects_hold_the_best_near_misses_never_a_suppressed_duplicate() -> None:
    """A candidate under the threshold that no kept box covers is a near miss: the selection ranks it right
    after the kept objects (the adaptive policy reads its score); a duplicate NMS suppressed is never there,
    and the kept objects are what they were."""
    from graphdistill.runner.tta import near_floor, near_miss

    cfg = StudentConfig(  # type: ignore[arg-type]
        **{**SMALL, "image_size": 64, "max_objects": 3, "candidates": 10, "score_threshold": 0.25}
    )
    m = Student(cfg).eval()
    anchors, _ = make_anchors(64)
    a = anchors.shape[0]
    cells = [
        (_cell(2, 2), 0, 0.90, [8, 8, 40, 40]),  # kept
        (_cell(3, 3), 0, 0.80, [9, 9, 41, 41]),  # its duplicate: suppressed, whatever its score
        (_cell(6, 6), 2, 0.20, [44, 44, 60, 60]),  # a near miss: under the threshold, nothing covers it
        (_cell(6, 1), 1, 0.05, [44, 4, 60, 20]),  # a weaker one
    ]
    xyxy = torch.cat([anchors - 3.0, anchors + 3.0], -1)
    cls = torch.full((cfg.num_classes, a), -12.0)
    for i, c, p, box in cells:
        xyxy[i] = torch.tensor(box, dtype=torch.float32)
        cls[c, i] = _logit(p)
    g = torch.Generator().manual_seed(0)
    dense = {
        "det_dist": _dist_for(xyxy, 64, cfg.reg_max),
        "det_cls": cls[None],
        "det_coef": torch.randn(1, cfg.num_masks, a, generator=g),
        "protos": torch.randn(1, cfg.num_masks, 16, 16, generator=g),
    }
    with torch.no_grad():
        out = m.select(dense)
    assert out["keep"][0].tolist() == [True, False, False]
    torch.testing.assert_close(out["scores"][0], torch.tensor([0.90, 0.20, 0.05]), atol=1e-5, rtol=1e-5)
    assert out["classes"][0].tolist() == [0, 2, 1]
    best = near_miss(out["scores"][0].numpy(), out["keep"][0].numpy())
    assert abs(best - 0.20) < 1e-5 and best >= near_floor(0.25)  # 0.20 >= 0.168: the views would be spent
    assert near_miss(np.array([0.9, 0.5]), np.array([True, True])) == 0.0  # nothing dropped


# ---- the copy path -----------------------------------------------------------------------------------------


def test_the_copy_path_names_a_detected_class_that_the_vocabulary_path_cannot() -> None:
    """With the vocabulary path switched off (the generate slot's weight ~e^-30), the decoder still emits the
    class-name token of the one object the answer may name; an empty slot and a class without a token are
    never copied, and the answer is still a distribution."""
    torch.manual_seed(0)
    m = Student(StudentConfig(**SMALL)).eval()  # type: ignore[arg-type]
    cfg = m.config
    with torch.no_grad():
        m.ptr_gate.weight.zero_()
        m.ptr_gate.bias.fill_(-30.0)
    img, q, qm = _inputs(cfg)
    answer_in = torch.full((2, 5), BOS_ID)
    with torch.no_grad():
        # object 0 is a class 2 object (token 102); slot 1 holds a class-0 object that is not valid
        objects = _objects(2, cfg.max_objects, [2, 0], [True, False])
        out = m(img, q, qm, answer_in, objects=objects)
        assert bool((out["answer_logits"].argmax(-1) == 102).all())
        assert float(out["answer_logits"][..., 102].exp().min()) > 0.99
        assert float(out["answer_logits"][..., 100].exp().max()) < 1e-6  # the invalid slot's class
        torch.testing.assert_close(out["answer_logits"].exp().sum(-1), torch.ones(2, 5))
        enc = m.encode(img, q, qm, objects)
        assert m.generate(img, q, qm, 4, encoded=enc)[:, 0].tolist() == [102, 102]
        # a class whose name has no token (id 0) cannot be copied: the mass goes back to the vocabulary
        no_token = Student(StudentConfig(**{**SMALL, "class_token_ids": [100, 101, 0]})).eval()  # type: ignore[arg-type]
        no_token.load_state_dict(m.state_dict())
        enc = no_token.encode(img, q, qm, objects)
        mixed = no_token.decode_full(answer_in, enc["memory"], no_token.pointer_of(enc))
        vocabulary = no_token.decode_full(answer_in, enc["memory"], None)
        torch.testing.assert_close(mixed, vocabulary, atol=1e-5, rtol=1e-5)
        assert float(mixed[..., PAD_ID].exp().max()) < 0.5


def test_a_student_without_objects_has_no_copy_path_and_still_gives_log_probabilities() -> None:
    from graphdistill.student.model import config_from_schema

    cfg = config_from_schema(_schema(("reply", "text")), "tiny", **SMALL)
    m = Student(cfg).eval()
    assert not hasattr(m, "ptr_q") and not _has(m, ("ptr_", "cls_emb", "box_emb"))
    img, q, qm = _inputs(cfg)
    with torch.no_grad():
        out = m(img, q, qm, torch.randint(0, cfg.vocab_size, (2, 5)))
    torch.testing.assert_close(out["answer_logits"].exp().sum(-1), torch.ones(2, 5))


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_fixes_special_ids(tmp_path: Path) -> None:
    texts = ["How many circles are there?", "There are 2 circles.", "Is there a square?", "Yes."] * 5
    tok = StudentTokenizer.train(texts, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    tok2 = StudentTokenizer.load(tmp_path / "tokenizer.json")
    for t in [*texts, "ünïcode 🙂 never seen"]:
        assert tok2.decode(tok2.encode(t)) == t
    ids, mask = tok.encode_question("Is there a square?", 12)
    assert len(ids) == 12 and sum(mask) == len(tok.encode("Is there a square?"))
    inp, tgt = tok.encode_answer("Yes.", 8)
    n = len(tok.encode("Yes."))
    assert inp[0] == BOS_ID and inp[1 : n + 1] == tgt[:n] and tgt[n] == EOS_ID and tgt[n + 1] == -100
    assert tok.decode([*tok.encode("Yes."), EOS_ID, 9, 9]) == "Yes."


def test_every_class_name_is_one_token_even_one_no_text_names(tmp_path: Path) -> None:
    from graphdistill.teachers.coco import COCO_CLASSES

    texts = ["There is a cat.", "I see a dog and a cat.", "What is in this picture?"] * 5
    tok = StudentTokenizer.train(texts, vocab_size=300, class_names=COCO_CLASSES)
    tok.save(tmp_path / "tokenizer.json")
    tok = StudentTokenizer.load(tmp_path / "tokenizer.json")  # the class tokens survive saving
    ids = tok.class_token_ids(COCO_CLASSES)
    assert len(set(ids)) == 80 and min(ids) > 3  # one distinct, non-special token each
    for name, i in zip(COCO_CLASSES, ids, strict=True):
        text = f"There is a {name} here."
        enc = tok.encode(text)
        assert i in enc, name  # " traffic light", " hair drier": one token inside a sentence
        assert tok.decode(enc) == text
        assert tok.decode([i]) == " " + name
    assert tok.piece_ids[" traffic light"] == ids[COCO_CLASSES.index("traffic light")]
    assert tok.class_token_ids(["unicorn"]) == [PAD_ID]  # no token: never copied


# ---- preprocessing and the loader ------------------------------------------------------------------------


def test_letterbox_preprocessing_is_top_left_and_normalised() -> None:
    img = np.zeros((50, 100, 3), dtype=np.uint8)
    img[:, :, 0] = 255
    x, scale = preprocess_image(img, 64)
    spec = preprocess_spec(64)
    assert scale == pytest.approx(0.64)
    red = (1.0 - spec["mean"][0]) / spec["std"][0]
    pad = (114 / 255 - spec["mean"][0]) / spec["std"][0]
    assert x.shape == (3, 64, 64)
    assert float(x[0, 0, 0]) == pytest.approx(red, abs=1e-5)
    assert float(x[0, 63, 0]) == pytest.approx(pad, abs=1e-5)  # below the 32-row image: padding
    mask = np.zeros((50, 100), dtype=bool)
    mask[:, 50:] = True
    m = letterbox_mask(mask, 16)
    assert m.shape == (16, 16) and m[:8, 12:].min() > 0.99 and m[:8, :3].max() < 0.01 and m[8:].max() == 0
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        preprocess_image(img[:, :, 0], 64)


def test_a_trunk_started_from_a_detector_reads_the_image_as_the_detector_does() -> None:
    """A YOLO trunk was trained on x/255; a timm trunk from scratch on ImageNet-normalised input. The spec a
    run and a bundle carry says which."""
    yolo = StudentConfig(trunk="ultralytics", trunk_spec={"backbone": []}, image_size=64)
    timm_cfg = StudentConfig(image_size=64)
    assert normalisation(yolo) == UNIT and normalisation(timm_cfg) == (MEAN, STD)
    assert spec_of(yolo)["mean"] == [0.0, 0.0, 0.0] and spec_of(yolo)["std"] == [1.0, 1.0, 1.0]
    assert spec_of(timm_cfg) == preprocess_spec(64)
    img = np.full((10, 20, 3), 51, dtype=np.uint8)
    x, _ = preprocess_image(img, 64, mean=UNIT[0], std=UNIT[1])
    assert float(x[0, 0, 0]) == pytest.approx(0.2) and float(x[0, 63, 0]) == pytest.approx(114 / 255)


def test_loader_items_batch_with_a_plain_dataloader(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from graphdistill.dataset import make_synthetic_dataset, open_dataset

    make_synthetic_dataset(tmp_path / "ds", n=6, seed=1, fractions=(1, 0, 0))
    # the fourth row is a counterfactual replay: its objects were edited and do not describe its image
    table = pq.read_table(tmp_path / "ds" / "train.parquet")
    replay = [
        None,
        None,
        None,
        json.dumps({"parent_trace": "t", "from_node": "retrieve", "edit": {}}),
        None,
        None,
    ]
    i_col = table.column_names.index("replay")
    table = table.set_column(i_col, "replay", pa.array(replay, pa.string()))
    pq.write_table(table, tmp_path / "ds" / "train.parquet")
    ds = open_dataset(tmp_path / "ds")
    rows = ds.rows("train")
    tok = StudentTokenizer.train([t for r in rows for t in (r.question, r.answer)], vocab_size=400)
    cfg = StudentConfig(**{**SMALL, "vocab_size": tok.vocab_size, "max_answer_len": 48})  # type: ignore[arg-type]
    sd = StudentDataset(ds, "train", tok, cfg)
    batch = next(iter(torch.utils.data.DataLoader(sd, batch_size=4, collate_fn=collate)))
    k = cfg.max_objects
    assert batch["image"].shape == (4, 3, 96, 96)
    assert batch["answer_in"].shape == (4, cfg.max_answer_len)
    assert batch["obj_masks"].shape == (4, k, 24, 24)  # the prototype grid, stride 4
    assert batch["vision_ok"].tolist() == [True, True, True, False]
    for i in range(4):
        n = int(batch["obj_valid"][i].sum())
        assert n == len(rows[i].objects) and bool(batch["obj_valid"][i, :n].all())
        o = rows[i].objects[0]
        x1, y1, x2, y2 = o.box
        s = float(batch["scale"][i])
        side = 96 / s
        torch.testing.assert_close(
            batch["obj_boxes"][i, 0], torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) / side
        )
        torch.testing.assert_close(batch["obj_boxes_px"][i, 0], torch.tensor([x1, y1, x2, y2]) * s)
        assert int(batch["obj_classes"][i, 0]) == ds.class_names.index(o.label)
        assert (batch["obj_classes"][i, n:] == -1).all() and not batch["obj_valid"][i, n:].any()
        assert float(batch["obj_masks"][i, 0].sum()) > 0 and bool(batch["obj_has_mask"][i, :n].all())
        want = {ds.documents.index(d) for d in ds.documents if d["id"] in rows[i].sources}
        assert set(torch.nonzero(batch["sources"][i]).flatten().tolist()) == want
        assert tok.decode(batch["answer_in"][i].tolist()) == rows[i].answer
    assert not batch["topk_valid"].any()  # these synthetic rows carry no teacher log-probs


# ---- heads derived from the teacher graph's output schema ------------------------------------------------


def _schema(*outputs: tuple[str, str]) -> dict[str, Any]:
    return {
        "name": "g",
        "inputs": [{"name": "image", "kind": "image"}, {"name": "question", "kind": "text"}],
        "outputs": [{"name": n, "kind": k} for n, k in outputs],
    }


OBJECT_PARAMS = ("cls_emb", "box_emb", "obj_feat", "empty_obj", "ptr_")
MASK_PARAMS = ("proto.", "coef.")
TEXT_PARAMS = ("dec.", "dec_norm", "a_pos")


def _has(model: Student, prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in model.state_dict())


def test_a_text_only_schema_builds_no_detection_mask_or_sources_params() -> None:
    from graphdistill.student.model import config_from_schema

    cfg = config_from_schema(_schema(("reply", "text")), "tiny", **SMALL)
    assert cfg.outputs == {"reply": "text"}
    m = Student(cfg).eval()
    assert not _has(m, OBJECT_PARAMS + MASK_PARAMS + ("source_head",))
    assert _has(m, TEXT_PARAMS)
    full = Student(StudentConfig(**SMALL))  # type: ignore[arg-type]
    assert count_parameters(m) < count_parameters(full)
    img, q, qm = _inputs(cfg)
    with torch.no_grad():
        enc = m.encode(img, q, qm)
        assert set(enc) == {"memory"}  # no objects, no copy path, no sources
        assert enc["memory"].shape[1] == m.memory_len == m.n_ctx == cfg.num_registers + 9  # no object tokens
        out = m(img, q, qm, torch.randint(0, cfg.vocab_size, (2, 5)))
        assert set(out) == {"memory", "answer_logits"}
        assert m.generate(img, q, qm, max_len=4).shape == (2, 4)
    # the config (with its outputs) round-trips through config.json
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg


def test_a_schema_without_text_has_no_decoder_and_generate_says_why() -> None:
    from graphdistill.student.model import config_from_schema

    cfg = config_from_schema(_schema(("dets", "detections"), ("sources", "sources")), **SMALL)
    m = Student(cfg).eval()
    assert not _has(m, TEXT_PARAMS + MASK_PARAMS + ("ptr_",))
    img, q, qm = _inputs(cfg)
    with torch.no_grad():
        out = m(img, q, qm, torch.zeros(2, 3, dtype=torch.long))
    # DETECTIONS: boxes without masks
    assert set(out) == {"memory", "boxes", "scores", "classes", "keep", "source_logits"}
    for call in (
        lambda: m.generate(img, q, qm),
        lambda: m.decode_step(
            torch.zeros(2, 1, dtype=torch.long), torch.tensor([0]), out["memory"], out["boxes"]
        ),
    ):
        with pytest.raises(RuntimeError, match="no text head"):
            call()


def test_the_full_visual_rag_schema_gives_todays_heads_and_weights() -> None:
    from graphdistill.dataset import synthetic_graph_schema
    from graphdistill.student.model import DEFAULT_OUTPUTS, config_from_schema

    cfg = config_from_schema(synthetic_graph_schema(), **SMALL)
    old = dict(StudentConfig(**SMALL).to_dict())  # type: ignore[arg-type]
    old.pop("outputs")  # a config.json written before `outputs` existed
    legacy = StudentConfig.from_dict(old)
    assert cfg == legacy and cfg.outputs == DEFAULT_OUTPUTS
    torch.manual_seed(0)
    a = Student(cfg)
    torch.manual_seed(0)
    b = Student(legacy)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and count_parameters(a) == count_parameters(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.memory_len == a.n_ctx == cfg.num_registers + 9 + cfg.max_objects
    img, q, qm = _inputs(cfg)
    with torch.no_grad():
        heads = set(a.eval().encode(img, q, qm))
    assert heads == {
        "memory", "boxes", "scores", "classes", "keep", "mask_logits", "ptr_keys", "ptr_bias", "ptr_vocab",
        "ptr_next", "source_logits",
    }  # fmt: skip


def test_a_graph_whose_answer_reads_only_detections_gives_a_text_side_without_pixels() -> None:
    """visual_rag's LLM reads the detected labels and positions, the question and text-retrieved facts, never the
    pixels: the student's answer then reads object tokens (class, box, score) and the question only, so what it
    writes cannot follow the pixels of its few training photos. A graph that declares no dataflow keeps pixels."""
    from graphdistill.student.model import config_from_schema

    flow = {
        "detect": {"reads": ["image"], "writes": {"dets": "detections"}},
        "retrieve": {"reads": ["question", "dets"], "writes": {"docs": "documents"}},
        "reason": {"reads": ["question", "dets", "docs"], "writes": {"answer": "text"}},
        "compose": {"reads": ["dets", "docs"], "writes": {"objects": "objects", "sources": "sources"}},
    }
    schema = {**_schema(("answer", "text"), ("objects", "objects"), ("sources", "sources")), "dataflow": flow}
    cfg = config_from_schema(schema, **SMALL)
    assert cfg.text_pixels is False
    # a user may say otherwise
    assert config_from_schema(schema, **SMALL, text_pixels=True).text_pixels is True
    assert config_from_schema({**schema, "dataflow": {}}, **SMALL).text_pixels is True  # unknown: pixels
    vlm = {**flow, "reason": {"reads": ["image", "question", "docs"], "writes": {"answer": "text"}}}
    assert config_from_schema({**schema, "dataflow": vlm}, **SMALL).text_pixels is True
    m = Student(cfg).eval()
    assert not _has(m, ("img_proj", "img_pos", "obj_feat")) and _has(m, ("cls_emb", "box_emb"))
    assert m.memory_len == m.n_ctx == cfg.num_registers + cfg.max_objects  # registers and object slots only
    with_pixels = Student(StudentConfig(**{**cfg.to_dict(), "text_pixels": True}))
    assert count_parameters(m) < count_parameters(with_pixels)
    img, q, qm = _inputs(cfg)
    other = torch.randn_like(img)
    objects = _objects(2, cfg.max_objects, [0, 2], [True, True])
    answer = torch.randint(4, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        a = m(img, q, qm, answer, objects=objects)
        b = m(other, q, qm, answer, objects=objects)
        # the same objects and question, other pixels: the same memory and answer logits
        assert torch.equal(a["memory"], b["memory"]) and torch.equal(a["answer_logits"], b["answer_logits"])
        moved = _objects(2, cfg.max_objects, [1, 2], [True, True])  # another label: another answer
        assert not torch.allclose(m(img, q, qm, answer, objects=moved)["answer_logits"], a["answer_logits"])
        pa = with_pixels.eval()(img, q, qm, answer, objects=objects)["answer_logits"]
        assert not torch.allclose(pa, with_pixels(other, q, qm, answer, objects=objects)["answer_logits"])
        assert m.generate(img, q, qm, max_len=4).shape == (2, 4)  # its own detections at inference
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    assert StudentConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "text_pixels"}).text_pixels
    with pytest.raises(ValueError, match="text_pixels=False needs an objects or detections output"):
        StudentConfig(**{**SMALL, "outputs": {"answer": "text"}, "text_pixels": False})


def test_embedding_outputs_get_a_regression_head_and_bad_schemas_fail_clearly() -> None:
    from graphdistill.student.model import config_from_schema

    schema = _schema(("answer", "text"), ("clip", "embedding"), ("raw", "json"))
    cfg = config_from_schema(schema, embedding_dims={"clip": 6}, **SMALL)
    assert cfg.outputs == {"answer": "text", "clip": "embedding"}  # JSON has no head: skipped
    m = Student(cfg).eval()
    img, q, qm = _inputs(cfg)
    with torch.no_grad():
        assert set(m.encode(img, q, qm)) == {"memory", "embedding:clip"}
    # an embedding without a known size cannot be learnt: left out (with a warning)
    assert config_from_schema(schema, **SMALL).outputs == {"answer": "text"}
    with pytest.raises(ValueError, match="none of its outputs"):
        config_from_schema(_schema(("raw", "json")), **SMALL)
    with pytest.raises(ValueError, match="one such head"):
        StudentConfig(outputs={"a": "text", "b": "text"})
    with pytest.raises(ValueError, match="heads for kinds"):
        StudentConfig(outputs={"a": "number"})
    with pytest.raises(ValueError, match="no dimension"):
        StudentConfig(outputs={"e": "embedding"})


# ---- predict ---------------------------------------------------------------------------------------------


def test_predict_reports_the_kept_objects_and_a_score_threshold_only_drops_some() -> None:
    from graphdistill.student.predict import StudentPredictor

    tok = StudentTokenizer.train(["What is in this picture?"] * 3, vocab_size=300)
    torch.manual_seed(0)
    # score_threshold 0: the student keeps every object its NMS leaves (an untrained head scores ~0.04)
    cfg = StudentConfig(
        **{**SMALL, "vocab_size": tok.vocab_size, "class_token_ids": [], "score_threshold": 0.0}
    )  # type: ignore[arg-type]
    model = Student(cfg).eval()
    meta = {"class_names": ["circle", "square", "triangle"], "preprocessing": spec_of(cfg)}
    pred = StudentPredictor(model, tok, meta)
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    own = pred.predict(img, "What is in this picture?")["objects"]
    assert 2 <= len(own) <= cfg.max_objects
    scores = [o["score"] for o in own]
    assert scores == sorted(scores, reverse=True)  # best first
    for obj in own:
        x1, y1, x2, y2 = obj["box"]
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 60 and obj["mask"]["size"] == [60, 80]
        assert obj["label"] == meta["class_names"][obj["class_id"]]
    cut = (scores[0] + scores[-1]) / 2
    some = pred.predict(img, "What is in this picture?", score_threshold=cut)["objects"]
    assert some == [o for o in own if o["score"] >= cut] and 0 < len(some) < len(own)
    assert pred.predict(img, "What is in this picture?", score_threshold=1.0)["objects"] == []


def test_the_text_loss_reaches_the_trunk_only_when_no_detection_head_trains_it() -> None:
    """With a detection head, the trunk is the detector's: the answer loss never bends it. Without one,
    nothing else trains the trunk, so the text (and summary) losses must."""
    import torch.nn.functional as F

    for outputs, reaches in (({"answer": "text", "objects": "objects"}, False), ({"answer": "text"}, True)):
        torch.manual_seed(0)
        m = Student(StudentConfig(**{**SMALL, "outputs": outputs})).train()  # type: ignore[arg-type]
        img, q, qm = _inputs(m.config)
        answer = torch.randint(4, m.config.vocab_size, (2, 5))
        objects = _objects(2, m.config.max_objects, [1], [True]) if m.config.has_objects else None
        out = m(img, q, qm, answer, objects=objects)
        F.nll_loss(out["answer_logits"].flatten(0, 1), answer.flatten()).backward()
        reached = any(p.grad is not None and bool(p.grad.any()) for p in m.trunk.parameters())
        assert reached == reaches, outputs
        assert m.tok_emb.weight.grad is not None and bool(m.tok_emb.weight.grad.any())


def test_documents_rank_by_their_words_through_the_shared_token_embeddings() -> None:
    """A document's key is built from the student's own embeddings of its words, nothing per document: two
    documents made of the same tokens score alike, and moving one word's embedding moves exactly the documents
    that contain it (the word is in neither the question nor a class name here)."""
    cfg = StudentConfig(**{**SMALL, "source_token_ids": [[10, 11], [10, 11], [12, 13]]})
    m = Student(cfg).eval()
    img, q, qm = _inputs(cfg)
    q[q == 12] = 5
    with torch.no_grad():
        before = m.encode(img, q, qm)["source_logits"]
        assert before.shape == (2, 3)
        assert torch.allclose(before[:, 0], before[:, 1])
        m.tok_emb.weight[12] += 1.0  # a word only document 2 has
        after = m.encode(img, q, qm)["source_logits"]
    assert torch.allclose(after[:, :2], before[:, :2])
    assert not torch.allclose(after[:, 2], before[:, 2])
    with pytest.raises(ValueError, match="source_token_ids has 2 documents for num_sources=3"):
        StudentConfig(**{**SMALL, "source_token_ids": [[10], [11]]})


def test_before_training_the_sources_head_ranks_first_the_documents_sharing_the_querys_rare_words() -> None:
    """The retriever's query is the question and the detected labels: with fresh (random) word vectors the head
    is a TF-IDF-like retriever, so a question naming a class ranks that class's documents first, and a
    detected object's class word does the same with a question naming nothing."""
    docs = [[20, 30, 31], [21, 30, 31], [22, 30, 31]]  # each names one class (20..22); 30, 31 are in all
    cfg = StudentConfig(
        **{**SMALL, "num_sources": 3, "source_token_ids": docs, "class_token_ids": [20, 21, 22]}
    )
    m = Student(cfg).eval()
    img, _, _ = _inputs(cfg, b=1)
    q = torch.tensor([[40, 41, 21, 30] + [PAD_ID] * (cfg.max_question_len - 4)])
    qm = q != PAD_ID
    with torch.no_grad():
        logits = m.encode(img, q, qm)["source_logits"]
        assert int(logits[0].argmax()) == 1
        ids = torch.tensor([[40, 41] + [PAD_ID] * (cfg.max_question_len - 2)])
        objects = _objects(1, cfg.max_objects, [2], [True])
        heads = m.encode(img, ids, ids != PAD_ID, objects=objects)
    assert int(heads["source_logits"][0].argmax()) == 2


def test_the_copy_path_holds_the_words_of_the_teachers_documents_in_training_and_its_own_best_otherwise() -> (
    None
):
    """After the object slots, one copy slot per token of the sources_k documents: the teacher's retrieved ones
    when training (``objects["sources"]``), the best-ranked ones at inference; padding is never copied."""
    docs = [[20, 30], [21, 31, 32], [22, 33]]
    cfg = StudentConfig(
        **{**SMALL, "source_token_ids": docs, "sources_k": 1, "class_token_ids": [20, 21, 22]}
    )
    m = Student(cfg)
    img, q, qm = _inputs(cfg, b=1)
    k, width = cfg.max_objects, 3
    objects = _objects(1, k, [0], [True]) | {"sources": torch.tensor([[0.0, 0.0, 1.0]])}
    with torch.no_grad():
        out = m.train().encode(img, q, qm, objects=objects)
        assert out["ptr_vocab"][0, k:].argmax(-1).tolist()[:2] == [22, 33]  # the teacher's document 2
        assert out["ptr_bias"][0, k:].tolist() == [0.0, 0.0, -1e9]  # its padding slot is never copied
        m.eval()
        ev = m.encode(img, q, qm)
        best = int(ev["source_logits"][0].argmax())
        slots = ev["ptr_vocab"][0, k : k + width]
        assert slots.argmax(-1).tolist()[: len(docs[best])] == docs[best]


def test_the_object_and_the_documents_the_question_names_are_marked_and_nothing_else() -> None:
    """The question names class 1 (token 21): its object token and the keys of the document holding that word
    move with ``obj_mention`` / ``doc_mention``; the other objects, the other documents and a question naming
    nothing do not. Both start at zero, where the student is the one before these features (older runs load)."""
    from graphdistill.student.model import mentioned

    q = torch.tensor([[5, 21, 7, 0], [5, 6, 21, 21]])
    qm = q != PAD_ID
    words = torch.tensor([[20, 21, 0], [21, 22, 1]])
    assert mentioned(words, q, qm).tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert mentioned(torch.tensor([[0, 7]]), q[:1], torch.tensor([[True, True, False, False]])).tolist() == [
        [0.0, 0.0]  # <pad> never counts, nor a word the mask hides
    ]

    docs = [[20, 30], [21, 31, 32], [22, 33]]
    cfg = StudentConfig(
        **{**SMALL, "source_token_ids": docs, "sources_k": 3, "class_token_ids": [20, 21, 22]}
    )
    torch.manual_seed(0)
    m = Student(cfg).eval()  # type: ignore[arg-type]
    img, _, _ = _inputs(cfg, b=1)
    k = cfg.max_objects
    objects = _objects(1, k, [0, 1, 2], [True, True, True]) | {"sources": torch.tensor([[1.0, 1.0, 1.0]])}
    asks = torch.tensor([[5, 6, 21, 7] + [PAD_ID] * (cfg.max_question_len - 4)])
    plain = torch.tensor([[5, 6, 8, 7] + [PAD_ID] * (cfg.max_question_len - 4)])
    feats = m.trunk(img)
    p4 = feats[1]
    chosen = {key.removeprefix("obj_"): v for key, v in objects.items() if key != "sources"}
    with torch.no_grad():
        before = m.object_tokens(chosen, p4, asks, asks != PAD_ID)
        keys_before = m.train().encode(img, asks, asks != PAD_ID, objects=objects, features=feats)["ptr_keys"]
        m.obj_mention.fill_(1.0)
        m.doc_mention.fill_(1.0)
        after = m.object_tokens(chosen, p4, asks, asks != PAD_ID)
        moved = (after - before).abs().amax(-1)[0]
        assert moved[1] > 0.5 and float(moved[0]) == 0.0 and float(moved[2]) == 0.0
        untouched = m.object_tokens(chosen, p4, plain, plain != PAD_ID)
        torch.testing.assert_close(untouched, before)
        enc = m.encode(img, asks, asks != PAD_ID, objects=objects, features=feats)
        doc_keys = (enc["ptr_keys"] - keys_before)[
            0, k:
        ]  # the document slots, in the teacher's order 0, 1, 2
        width = doc_keys.shape[0] // 3
        shift = (doc_keys.abs().amax(-1) > 0.5).view(3, width)
        assert shift[1].all() and not shift[0].any() and not shift[2].any()
    m.eval()


def test_the_built_in_student_is_exportable_and_predict_takes_its_fast_path() -> None:
    from graphdistill.student.model import ExportableStudent, StudentProtocol
    from graphdistill.student.predict import config_of, has_fast_path

    model = Student(StudentConfig(**SMALL))  # type: ignore[arg-type]
    assert isinstance(model, StudentProtocol) and isinstance(model, ExportableStudent)
    assert has_fast_path(model) and config_of(model) is model.config

    class ForwardOnly(torch.nn.Module):  # StudentProtocol without the fast path
        def __init__(self) -> None:
            super().__init__()
            self.config = model.config

        def forward(self, *args: object) -> dict[str, torch.Tensor]:
            return {}

    assert not has_fast_path(ForwardOnly()) and not has_fast_path(object())
    with pytest.raises(TypeError, match="no `config`"):
        config_of(object())


def test_ptr_next_marks_the_slot_after_one_holding_the_token_within_its_document_only() -> None:
    """``ptr_next[b, v, j]`` is 1 exactly where document slot j follows a slot of the same document holding
    token v: never an object slot, never a document's first slot (its previous slot is another document's)."""
    docs = [[20, 30, 31], [31, 30, 22], [22, 33]]
    cfg = StudentConfig(
        **{**SMALL, "source_token_ids": docs, "sources_k": 2, "class_token_ids": [20, 21, 22]}
    )
    m = Student(cfg).train()
    img, q, qm = _inputs(cfg, b=1)
    k = cfg.max_objects
    objects = _objects(1, k, [0], [True]) | {"sources": torch.tensor([[1.0, 1.0, 0.0]])}
    with torch.no_grad():
        out = m.encode(img, q, qm, objects=objects)
    nxt = out["ptr_next"][0]  # [V, K]
    assert nxt.shape == (cfg.vocab_size, m.n_copy)
    marked = {(int(v), int(j) - k) for v, j in torch.nonzero(nxt)}
    # document 0 in slots 0..2 (20 30 31), document 1 in slots 3..5 (31 30 22)
    assert marked == {(20, 1), (30, 2), (31, 4), (30, 5)}


def test_a_copy_goes_on_where_it_left_off() -> None:
    """With the continuation on (``ptr_cont``) and every other score flat, the token after a copied word is
    the document's next word, also after a word the document holds twice (the two tokens read before say which
    one); without it (an older run's config: ``copy_continue`` False) nothing tells the slots apart. The step
    (``ptr_next`` looked up with the token and the one before it) gives the same scores as teacher forcing."""
    docs = [[40, 41, 42, 43, 44], [50, 51, 52, 51, 53]]
    base = {**SMALL, "num_sources": 2, "source_token_ids": docs, "sources_k": 1}
    torch.manual_seed(0)
    m = Student(StudentConfig(**base)).eval()
    assert StudentConfig.from_dict({k: v for k, v in m.config.to_dict().items() if k != "copy_continue"}) == (
        StudentConfig(**{**base, "copy_continue": False})
    )
    with torch.no_grad():
        m.ptr_gate.bias.fill_(-30.0)  # always copy
        m.ptr_gate.weight.zero_()
        m.ptr_q.weight.zero_()
        m.ptr_q.bias.zero_()  # every slot scores the same but for the continuation
        m.ptr_cont.weight.zero_()
        m.ptr_cont.bias.fill_(8.0)
    img, q, qm = _inputs(m.config, b=1)
    objects = _objects(1, m.config.max_objects, [], []) | {"sources": torch.tensor([[0.0, 1.0]])}
    with torch.no_grad():
        enc = m.train().encode(img, q, qm, objects=objects)
        m.eval()
        ptr = m.pointer_of(enc)
        answer_in = torch.tensor([[BOS_ID, 50, 51, 52, 51]])
        full = m.decode_full(answer_in, enc["memory"], ptr)
        # 51 comes twice: after "50 51" the document goes on with 52, after "52 51" with 53
        assert full[0, 1:].argmax(-1).tolist() == [51, 52, 51, 53]
        cache = m.empty_cache(1)
        prev = BOS_ID
        for pos, tok in enumerate(answer_in[0].tolist()):
            logp, new = m.decode_step(
                torch.tensor([[tok]]),
                torch.tensor([pos]),
                enc["memory"],
                cache,
                None,
                ptr,
                torch.tensor([[prev]]),
            )
            torch.testing.assert_close(logp, full[:, pos], atol=1e-5, rtol=1e-5)
            cache = m.write_kv(cache, new, torch.tensor([pos]))
            prev = tok
        m.ptr_cont.bias[1] = 0.0  # the word alone: both slots after a 51 are as likely
        uni = m.decode_full(answer_in, enc["memory"], ptr)[0, 2]
        assert float(uni[52] - uni[53]) == pytest.approx(0.0, abs=1e-5) and float(uni[52] - uni[50]) > 5
        m.ptr_cont.bias.fill_(0.0)  # no continuation: every slot of the document is as likely after 51
        flat = m.decode_full(answer_in, enc["memory"], ptr)[0, 2]
        assert float(flat[52] - flat[50]) == pytest.approx(0.0, abs=1e-5)
