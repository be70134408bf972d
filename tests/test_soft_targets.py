"""Cross-tokenizer soft targets: the teacher LLM's top-k, recorded in its own vocabulary, mapped by characters
onto the student's BPE, and the KL loss they feed."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("tokenizers")

from _fixtures import TINY_STUDENT, tiny_train_config  # noqa: E402
from graphdistill.student.loader import StudentDataset, align_soft_targets, collate  # noqa: E402
from graphdistill.student.losses import compute_losses  # noqa: E402
from graphdistill.student.model import EOS_ID, Student, StudentConfig  # noqa: E402
from graphdistill.student.tokenizer import StudentTokenizer  # noqa: E402
from graphdistill.trace import TokenLogprobs  # noqa: E402

TEXTS = [
    "There are 2 cats.",
    "There are 3 dogs.",
    "There is 1 cat.",
    "There is 1 dog.",
    "Is there a cat?",
    "How many cats are there?",
] * 4
ANSWER = "There are 2 cats."
TEACHER_EOS = 99
MAX_LEN = 12
INF = float("inf")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> StudentTokenizer:
    return StudentTokenizer.train(TEXTS, vocab_size=300)


def teacher_record() -> TokenLogprobs:
    """What the LLM recorded for "\\nThere are 2 cats." + EOS, in a made-up teacher vocabulary whose
    segmentation differs from the student's at " cats" (teacher: " cat" + "s")."""
    steps: list[tuple[int, str, list[tuple[int, str, float]]]] = [
        (10, "\n", [(10, "\n", -0.1), (11, "There", -2.5)]),
        (11, "There", [(11, "There", -0.2), (12, "Xyz", -1.9), (13, " Xyz", -3.0)]),  # Xyz: no student token
        (14, " are", [(14, " are", -0.3), (15, " is", -1.5), (TEACHER_EOS, "", -4.0)]),
        (16, " 2", [(16, " 2", -0.4), (17, " 3", -1.2), (18, " 2", -2.0)]),  # two teacher ids, one text
        (19, " cat", [(19, " cat", -0.5), (20, " dog", -1.0)]),
        (21, "s", [(21, "s", -0.1), (22, ".", -2.4)]),
        (22, ".", [(22, ".", -0.05), (23, "!", -3.1)]),
        (TEACHER_EOS, "", [(TEACHER_EOS, "", -0.01), (24, "\n", -4.6)]),
    ]
    return TokenLogprobs(
        tokenizer="teacher/llm",
        token_ids=[t for t, _, _ in steps],
        topk_ids=[[a for a, _, _ in alts] for _, _, alts in steps],
        topk_logprobs=[[lp for _, _, lp in alts] for _, _, alts in steps],
        token_texts=[text for _, text, _ in steps],
        topk_texts=[[s for _, s, _ in alts] for _, _, alts in steps],
        eos_ids=[TEACHER_EOS],
    )


def test_teacher_pieces_map_onto_student_tokens_where_both_segment_alike(tok: StudentTokenizer) -> None:
    p = tok.piece_ids
    ids, offsets = tok.encode_offsets(ANSWER)
    assert [ANSWER[s:e] for s, e in offsets] == ["There", " are", " 2", " cats", "."]  # the premise
    assert ids == [p["There"], p[" are"], p[" 2"], p[" cats"], p["."]]
    assert "Xyz" not in p and " Xyz" not in p
    soft = align_soft_targets(teacher_record(), ANSWER, tok, MAX_LEN, k=3)
    assert soft is not None
    topk_ids, topk_lp, valid = soft
    assert topk_ids.shape == topk_lp.shape == (MAX_LEN, 3) and valid.shape == (MAX_LEN,)
    # " cats" (position 3) starts where the teacher wrote " cat": different pieces, no soft target there
    assert valid.tolist() == [True, True, True, False, True, True] + [False] * (MAX_LEN - 6)

    def at(pos: int) -> list[tuple[int, float]]:
        return [(int(i), float(lp)) for i, lp in zip(topk_ids[pos], topk_lp[pos], strict=True)]

    assert at(0)[0] == (p["There"], pytest.approx(-0.2))
    assert at(0)[1][1] == -INF and at(0)[2][1] == -INF  # "Xyz", " Xyz": no student token
    assert at(1) == [(p[" are"], pytest.approx(-0.3)), (p[" is"], pytest.approx(-1.5)), (EOS_ID, -4.0)]
    assert at(2)[:2] == [
        (p[" 2"], pytest.approx(math.log(math.exp(-0.4) + math.exp(-2.0)))),
        (p[" 3"], pytest.approx(-1.2)),
    ]
    assert at(2)[2][1] == -INF  # the second teacher " 2" joined the first
    assert at(4)[:2] == [(p["."], pytest.approx(-0.05)), (p["!"], pytest.approx(-3.1))]
    assert at(4)[2][1] == -INF  # the teacher recorded 2 alternatives, the loader asked for 3
    # the target after the answer is <eos>: the teacher's EOS step, its "\n" alternative mapped too
    assert at(5)[:2] == [(EOS_ID, pytest.approx(-0.01)), (p["\n"], pytest.approx(-4.6))]
    assert [int(i) for i in topk_ids[valid][:, 0]] == [p["There"], p[" are"], p[" 2"], p["."], EOS_ID]


def test_an_llm_that_continued_the_graphs_opening_aligns_its_own_part_only(tok: StudentTokenizer) -> None:
    """visual_rag writes an answer's first words and the LLM continues them: the record holds the LLM's part
    only (" are 2 cats."); the answer's tokens there get the same soft targets as when the LLM wrote it all,
    the opening's none, and the <eos> target still aligns with the teacher's EOS step."""
    whole = teacher_record()
    rest = TokenLogprobs(
        tokenizer=whole.tokenizer,
        token_ids=whole.token_ids[2:],
        topk_ids=whole.topk_ids[2:],
        topk_logprobs=whole.topk_logprobs[2:],
        token_texts=whole.token_texts[2:],
        topk_texts=whole.topk_texts[2:],
        eos_ids=whole.eos_ids,
    )
    assert "".join(rest.token_texts) == " are 2 cats."
    full = align_soft_targets(whole, ANSWER, tok, MAX_LEN, k=3)
    cont = align_soft_targets(rest, ANSWER, tok, MAX_LEN, k=3)
    assert full is not None and cont is not None
    # "There" was the graph's: no soft target; " are", " 2", ".", <eos> as before (" cats" never aligned)
    assert cont[2].tolist() == [False, True, True, False, True, True] + [False] * (MAX_LEN - 6)
    for got, want in zip(cont[:2], full[:2], strict=True):
        torch.testing.assert_close(got[1:6], want[1:6])
    # the LLM's text must end the answer: in the middle of it, or another text, it aligns nothing
    assert align_soft_targets(rest, ANSWER + " Cats sleep.", tok, MAX_LEN, k=3) is None
    assert align_soft_targets(rest, "There are 3 dogs.", tok, MAX_LEN, k=3) is None


def test_no_soft_targets_for_another_answer_a_truncated_eos_or_a_record_without_texts(
    tok: StudentTokenizer,
) -> None:
    rec = teacher_record()
    assert align_soft_targets(rec, "There are 3 dogs.", tok, MAX_LEN, k=3) is None  # not this text
    # truncated to 3 targets: no <eos> target, so the teacher's EOS step is not used
    short = align_soft_targets(rec, ANSWER, tok, 4, k=3)
    assert short is not None and short[2].tolist() == [True, True, True, False]
    # a prefix of the teacher's text: its tokens align, but the teacher did not end there
    prefix = align_soft_targets(rec, "There are 2", tok, MAX_LEN, k=3)
    assert prefix is not None and prefix[2].tolist()[:4] == [True, True, True, False]
    old = TokenLogprobs.model_validate_json(
        '{"kind": "token_logprobs", "tokenizer": "teacher/llm", "token_ids": [11],'
        ' "topk_ids": [[11, 12]], "topk_logprobs": [[-0.2, -1.9]]}'
    )
    assert old.token_texts == [] and old.topk_texts == [] and old.eos_ids == []
    assert align_soft_targets(old, ANSWER, tok, MAX_LEN, k=3) is None
    with pytest.raises(ValueError, match="token_texts"):
        TokenLogprobs(
            tokenizer="t", token_ids=[1], topk_ids=[[1]], topk_logprobs=[[0.0]], token_texts=["a", "b"]
        )
    with pytest.raises(ValueError, match="topk_texts"):
        TokenLogprobs(
            tokenizer="t", token_ids=[1], topk_ids=[[1, 2]], topk_logprobs=[[0.0, -1]], topk_texts=[["a"]]
        )


def _dataset(path: Path, records: list[TokenLogprobs | dict[str, Any] | None]) -> Any:
    from graphdistill.dataset import (
        SYNTHETIC_CLASSES,
        SYNTHETIC_DOCUMENTS,
        DatasetWriter,
        open_dataset,
        synthetic_graph_schema,
    )

    manifest = {
        "graph": synthetic_graph_schema().model_dump(mode="json"),
        "class_names": list(SYNTHETIC_CLASSES),
        "documents": list(SYNTHETIC_DOCUMENTS),
        "source_store": None,
        "filter": {"test": True},
    }
    writer = DatasetWriter(path, manifest)
    for i, rec in enumerate(records):
        writer.add(
            {
                "id": f"row-{i}",
                "question": "How many cats are there?",
                "answer": ANSWER,
                "objects": [],
                "sources": [],
                "agreement_answer": 1.0,
                "agreement_objects": 1.0,
                "agreement_sources": 1.0,
                "provenance_photos": [f"test/{i}"],
                "llm_topk": rec,
                "trace_ids": [],
            },
            np.full((32, 48, 3), 40 * i, dtype=np.uint8),
            "train",
        )
    return open_dataset(writer.close())


def _config(tok: StudentTokenizer) -> StudentConfig:
    """The tiny student sized for this test's dataset: three classes and documents, ``tok``'s vocabulary, short
    questions and MAX_LEN answer positions."""
    return StudentConfig(
        **{
            **TINY_STUDENT,
            "num_classes": 3,
            "num_sources": 3,
            "vocab_size": tok.vocab_size,
            "max_question_len": 8,
            "max_answer_len": MAX_LEN,
        }
    )


def test_loader_emits_aligned_soft_targets_by_default_and_none_for_old_records(
    tmp_path: Path, tok: StudentTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    old = teacher_record().model_dump(exclude={"token_texts", "topk_texts", "eos_ids"})  # as recorded before
    ds = _dataset(tmp_path / "ds", [teacher_record(), old, None])
    rows = ds.rows("train")
    old_topk = rows[1].llm_topk
    assert old_topk is not None and old_topk.token_ids == teacher_record().token_ids
    assert not old_topk.token_texts
    with caplog.at_level(logging.INFO, logger="graphdistill.student.loader"):
        sd = StudentDataset(ds, "train", tok, _config(tok), topk=3)  # the trainer's defaults otherwise
    batch = collate([sd[i] for i in range(3)])
    want = align_soft_targets(teacher_record(), ANSWER, tok, MAX_LEN, 3)
    assert want is not None
    for got, expected in zip(
        (batch["topk_ids"][0], batch["topk_logprobs"][0], batch["topk_valid"][0]), want, strict=True
    ):
        assert torch.equal(got, expected)
    assert int(batch["topk_valid"][0].sum()) == 5
    assert not batch["topk_valid"][1:].any()  # an old record and a row without log-probs: nothing
    coverage = [r.getMessage() for r in caplog.records if "soft targets" in r.getMessage()]
    assert len(coverage) == 1
    assert (
        "on 5 of 18 answer positions" in coverage[0]
        and "1 of those were recorded without token texts" in coverage[0]
    )


def test_answer_kl_on_aligned_soft_targets_is_positive_and_falls(tok: StudentTokenizer) -> None:
    torch.manual_seed(0)
    cfg = _config(tok)
    model = Student(cfg)
    soft = align_soft_targets(teacher_record(), ANSWER, tok, MAX_LEN, 3)
    assert soft is not None
    a_in, a_tgt = tok.encode_answer(ANSWER, MAX_LEN)
    q_ids, q_mask = tok.encode_question("How many cats are there?", cfg.max_question_len)
    batch = {
        "answer_target": torch.tensor([a_tgt, a_tgt]),
        "topk_ids": torch.stack([soft[0]] * 2),
        "topk_logprobs": torch.stack([soft[1]] * 2),
        "topk_valid": torch.stack([soft[2]] * 2),
    }
    inputs = (
        torch.randn(2, 3, cfg.image_size, cfg.image_size),
        torch.tensor([q_ids, q_ids]),
        torch.tensor([q_mask, q_mask]),
        torch.tensor([a_in, a_in]),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(8):
        kl = compute_losses(model(*inputs), batch)["answer_kl"]
        history.append(kl.item())
        opt.zero_grad()
        kl.backward()
        opt.step()
    assert history[0] > 0.05 and all(math.isfinite(h) for h in history)
    assert history[-1] < 0.5 * history[0]


def test_the_trainer_distils_the_aligned_top_k_without_extra_flags(tmp_path: Path) -> None:
    from graphdistill.student.train import train

    ds = _dataset(tmp_path / "ds", [teacher_record()] * 3)
    torch.manual_seed(0)
    cfg = tiny_train_config(ds.root, tmp_path / "run", epochs=2, batch_size=3)
    history = train(cfg)["history"]
    assert history[0]["train_loss"]["answer_kl"] > 0.01  # the trainer's own BPE, the teacher's top-k mapped
