"""The student model, tokenizer, loader and losses: shapes, KV-cache equivalence, preprocessing, matching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("tokenizers")

from graphdistill.student.loader import (  # noqa: E402
    StudentDataset,
    collate,
    letterbox_mask,
    preprocess_image,
    preprocess_spec,
)
from graphdistill.student.losses import answer_kl, compute_losses  # noqa: E402
from graphdistill.student.matching import hungarian_match  # noqa: E402
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

SMALL = dict(
    image_size=96,
    mask_size=12,
    d_model=64,
    n_heads=2,
    enc_layers=1,
    dec_layers=2,
    num_queries=4,
    num_classes=3,
    num_sources=3,
    vocab_size=120,
    max_question_len=10,
    max_answer_len=16,
)


def _inputs(cfg: StudentConfig, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    q = torch.randint(4, cfg.vocab_size, (b, cfg.max_question_len), generator=g)
    qm = torch.ones(b, cfg.max_question_len, dtype=torch.bool)
    qm[1:, 6:] = False
    q[~qm] = PAD_ID
    return img, q, qm


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
    assert 256 <= preset("tiny").image_size <= 320 and 256 <= preset("small").image_size <= 320


def test_config_round_trips_and_rejects_bad_values() -> None:
    cfg = preset("tiny", embedding_dims={"clip": 16})
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        StudentConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown StudentConfig fields"):
        StudentConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_output_shapes_follow_the_config(model: Student) -> None:
    cfg = model.config
    img, q, qm = _inputs(cfg)
    answer_in = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        out = model(img, q, qm, answer_in)
    assert out["answer_logits"].shape == (2, 7, cfg.vocab_size)
    assert out["boxes"].shape == (2, cfg.num_queries, 4)
    assert float(out["boxes"].min()) >= 0 and float(out["boxes"].max()) <= 1
    assert out["class_logits"].shape == (2, cfg.num_queries, cfg.num_classes + 1)
    assert out["mask_logits"].shape == (2, cfg.num_queries, cfg.mask_size, cfg.mask_size)
    assert out["source_logits"].shape == (2, cfg.num_sources)
    assert isinstance(model, StudentProtocol)


def test_embedding_heads_come_from_the_config() -> None:
    m = Student(StudentConfig(**{**SMALL, "embedding_dims": {"clip": 8}}))  # type: ignore[arg-type]
    img, q, qm = _inputs(m.config)
    with torch.no_grad():
        out = m.heads(m.encode(img, q, qm))
    assert out["embedding:clip"].shape == (2, 8)


def test_question_padding_does_not_change_the_answer(model: Student) -> None:
    cfg = model.config
    img, q, qm = _inputs(cfg)
    q2 = q.clone()
    q2[~qm] = 7  # garbage under the mask must be ignored
    with torch.no_grad():
        a = model.encode(img, q, qm)
        b = model.encode(img, q2, qm)
    torch.testing.assert_close(a, b)


def test_decode_step_matches_full_recompute_at_every_position(model: Student) -> None:
    cfg = model.config
    img, q, qm = _inputs(cfg)
    seq = torch.randint(4, cfg.vocab_size, (2, cfg.max_answer_len))
    seq[:, 0] = BOS_ID
    with torch.no_grad():
        memory = model.encode(img, q, qm)
        full = model.decode_full(seq, memory)
        cache = model.empty_cache(2)
        eager_cache, cross = model.empty_cache(2), model.cross_kv(memory)
        for t in range(cfg.max_answer_len):
            pos = torch.tensor([t])
            before = cache.clone()
            logits, new = model.decode_step(seq[:, t : t + 1], pos, memory, cache)
            assert torch.equal(cache, before)  # the step reads the cache; storing kv_new is the caller's job
            assert new.shape == (cfg.dec_layers, 2, 2, cfg.n_heads, 1, cfg.head_dim)
            torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4)
            # generate()'s in-place, unmasked eager step is the same function and writes the same cache slot
            eager = model._decode_eager(seq[:, t : t + 1], t, eager_cache, cross)
            torch.testing.assert_close(eager, logits, atol=1e-5, rtol=1e-5)
            fast, fast_new = model.decode_step(seq[:, t : t + 1], pos, memory, cache, model.cross_kv(memory))
            torch.testing.assert_close(fast, logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast_new, new, atol=1e-5, rtol=1e-5)
            cache = model.write_kv(cache, new, pos)
            torch.testing.assert_close(cache[:, :, :, :, : t + 1], eager_cache[:, :, :, :, : t + 1])
            assert not cache[:, :, :, :, t + 1 :].any()  # nothing written past this position
        assert cache.shape == (cfg.dec_layers, 2, 2, cfg.n_heads, cfg.max_answer_len, cfg.head_dim)
        # per-row positions ([B,1]) give the same result as a shared one ([1])
        c1, _ = model.decode_step(seq[:, :1], torch.tensor([[0], [0]]), memory, model.empty_cache(2))
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
        cached = model.generate(img, q, qm, 12)
        plain = model.generate(img, q, qm, 12, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, plain)


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


def test_loader_items_batch_with_a_plain_dataloader(tmp_path: Path) -> None:
    from graphdistill.datasets.dataset import make_synthetic_dataset

    ds = make_synthetic_dataset(tmp_path / "ds", n=6, seed=1, fractions=(1, 0, 0))
    rows = ds.rows("train")
    tok = StudentTokenizer.train([t for r in rows for t in (r["question"], r["answer"])], vocab_size=400)
    cfg = StudentConfig(**{**SMALL, "vocab_size": tok.vocab_size, "max_answer_len": 48})  # type: ignore[arg-type]
    sd = StudentDataset(ds, "train", tok, cfg)
    batch = next(iter(torch.utils.data.DataLoader(sd, batch_size=3, collate_fn=collate)))
    assert batch["image"].shape == (3, 3, 96, 96)
    assert batch["answer_in"].shape == (3, cfg.max_answer_len)
    for i in range(3):
        n = int(batch["n_objects"][i])
        assert n == len(rows[i]["objects"])
        o = rows[i]["objects"][0]
        x1, y1, x2, y2 = o.box
        side = 96 / float(batch["scale"][i])
        torch.testing.assert_close(
            batch["boxes"][i, 0], torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) / side
        )
        assert int(batch["classes"][i, 0]) == ds.class_names.index(o.label)
        assert (batch["classes"][i, n:] == -1).all()
        assert float(batch["masks"][i, 0].sum()) > 0
        want = {ds.documents.index(d) for d in ds.documents if d["id"] in rows[i]["sources"]}
        assert set(torch.nonzero(batch["sources"][i]).flatten().tolist()) == want
        assert tok.decode(batch["answer_in"][i].tolist()) == rows[i]["answer"]
    assert not batch["topk_valid"].any()  # these synthetic rows carry no teacher log-probs


def test_hungarian_match_recovers_a_permutation() -> None:
    tgt = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.2, 0.4]]])
    perm = [2, 0, 1]  # slot s predicts target perm[s]; slot 3 predicts nothing
    boxes = torch.cat([tgt[:, perm], torch.tensor([[[0.9, 0.9, 0.05, 0.05]]])], dim=1)
    logits = torch.zeros(1, 4, 4)
    ((src, t),) = hungarian_match(boxes, logits, tgt, torch.tensor([[0, 1, 2]]), torch.tensor([3]))
    assert dict(zip(src.tolist(), t.tolist(), strict=True)) == {0: 2, 1: 0, 2: 1}


def test_losses_are_zero_ish_for_a_perfect_prediction_and_named() -> None:
    b, q, c, la, v = 1, 3, 2, 4, 10
    tgt_boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0, 0, 0, 0]]])
    masks = torch.zeros(b, q, 8, 8)
    masks[0, 0, :4, :4] = 1
    masks[0, 1, 4:, 4:] = 1
    target = torch.tensor([[5, 6, EOS_ID, -100]])
    answer_logits = torch.full((b, la, v), -30.0)
    for t, tok in enumerate([5, 6, EOS_ID, 0]):
        answer_logits[0, t, tok] = 30.0
    class_logits = torch.full((b, q, c + 1), -30.0)
    class_logits[0, 0, 1] = class_logits[0, 1, 0] = class_logits[0, 2, c] = 30.0
    out = {
        "answer_logits": answer_logits,
        "boxes": tgt_boxes[:, [0, 1, 2]].clone(),
        "class_logits": class_logits,
        "mask_logits": masks * 60 - 30,
        "source_logits": torch.tensor([[30.0, -30.0]]),
    }
    batch = {
        "answer_target": target,
        "boxes": tgt_boxes,
        "classes": torch.tensor([[1, 0, -1]]),
        "masks": masks,
        "n_objects": torch.tensor([2]),
        "sources": torch.tensor([[1.0, 0.0]]),
    }
    losses = compute_losses(out, batch)
    for name in ("answer_ce", "class", "box_l1", "box_giou", "mask_bce", "sources"):
        assert float(losses[name]) < 1e-3, name
    assert float(losses["mask_dice"]) < 0.05
    out["boxes"] = out["boxes"] + 0.05
    worse = compute_losses(out, batch)
    assert float(worse["box_l1"]) > 0.1 and float(worse["total"]) > float(losses["total"])


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


# ---- heads derived from the teacher graph's output schema ------------------------------------------------


def _schema(*outputs: tuple[str, str]) -> dict[str, Any]:
    return {
        "name": "g",
        "inputs": [{"name": "image", "kind": "image"}, {"name": "question", "kind": "text"}],
        "outputs": [{"name": n, "kind": k} for n, k in outputs],
    }


OBJECT_PARAMS = ("queries", "det_", "box_head", "class_head")
MASK_PARAMS = ("mask_embed", "pixel_proj", "fine_")
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
        memory = m.encode(img, q, qm)
        assert memory.shape[1] == m.memory_len == m.n_ctx  # no fine pixel tokens without a mask head
        assert m.heads(memory) == {}
        out = m(img, q, qm, torch.randint(0, cfg.vocab_size, (2, 5)))
        assert set(out) == {"answer_logits"}
        assert m.generate(img, q, qm, max_len=4).shape == (2, 4)
    # the config (with its outputs) round-trips through config.json
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg


def test_a_schema_without_text_has_no_decoder_and_generate_says_why() -> None:
    from graphdistill.student.model import config_from_schema

    cfg = config_from_schema(_schema(("dets", "detections"), ("sources", "sources")), **SMALL)
    m = Student(cfg).eval()
    assert not _has(m, TEXT_PARAMS + MASK_PARAMS)
    img, q, qm = _inputs(cfg)
    with torch.no_grad():
        out = m(img, q, qm, torch.zeros(2, 3, dtype=torch.long))
    assert set(out) == {"boxes", "class_logits", "source_logits"}  # DETECTIONS: boxes without masks
    for call in (
        lambda: m.generate(img, q, qm),
        lambda: m.decode_step(
            torch.zeros(2, 1, dtype=torch.long), torch.tensor([0]), out["boxes"], out["boxes"]
        ),
    ):
        with pytest.raises(RuntimeError, match="no text head"):
            call()


def test_the_full_visual_rag_schema_gives_todays_heads_and_weights() -> None:
    from graphdistill.datasets.dataset import synthetic_graph_schema
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
    assert a.memory_len == a.n_ctx + a.grid_f**2
    img, q, qm = _inputs(cfg)
    with torch.no_grad():
        assert set(a.heads(a.encode(img, q, qm))) == {"boxes", "class_logits", "mask_logits", "source_logits"}


def test_embedding_outputs_get_a_regression_head_and_bad_schemas_fail_clearly() -> None:
    from graphdistill.student.model import config_from_schema

    schema = _schema(("answer", "text"), ("clip", "embedding"), ("raw", "json"))
    cfg = config_from_schema(schema, embedding_dims={"clip": 6}, **SMALL)
    assert cfg.outputs == {"answer": "text", "clip": "embedding"}  # JSON has no head: skipped
    m = Student(cfg).eval()
    img, q, qm = _inputs(cfg)
    with torch.no_grad():
        assert set(m.heads(m.encode(img, q, qm))) == {"embedding:clip"}
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
