"""Voting across the K samples of one input: answers by meaning, objects by IoU, masks by pixel vote,
sources by count, TTA samples mapped back to the original frame."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from _fixtures import H, W, make_trace, obj, rect_mask
from graphdistill.eval.metrics import normalize_text
from graphdistill.filter.vote import (
    vote_answers,
    vote_group,
)
from graphdistill.recording.tta import TTA, untta_object
from graphdistill.trace import TokenLogprobs


def fake_embedder(table: Mapping[str, Sequence[float]]) -> Any:
    """An injected embedder: known vectors per text (unit-normalised)."""
    calls: list[list[str]] = []

    def embed(texts: Sequence[str]) -> np.ndarray:
        calls.append(list(texts))
        v = np.array([table[t] for t in texts], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    embed.calls = calls  # type: ignore[attr-defined]
    return embed


def test_normalize_text_strips_case_punctuation_articles() -> None:
    assert normalize_text("A Cat, on THE mat!") == "cat on mat"
    assert normalize_text("  an   apple.") == "apple"


def test_answers_cluster_by_normalised_text_majority_wins() -> None:
    answers = ["A cat.", "a cat", "The dog!", "the CAT"]
    idx, agreement, clusters = vote_answers(answers, k=4, embedder=None)
    assert idx is not None and normalize_text(answers[idx]) == "cat"
    assert agreement == pytest.approx(3 / 4)
    assert sorted(len(c) for c in clusters) == [1, 3]


def test_answers_cluster_by_injected_embedder_and_pick_the_central_one() -> None:
    # three paraphrases that share no normalised text; the embedder says two are close, one is far
    table = {
        "There is a cat on a sofa.": [1.0, 0.0, 0.0],
        "A cat sits on the couch.": [0.95, 0.2, 0.0],
        "I see a kitten on a sofa.": [0.9, -0.1, 0.1],
        "A red bus.": [0.0, 0.0, 1.0],
    }
    emb = fake_embedder(table)
    answers = list(table)
    idx, agreement, _ = vote_answers(answers, k=4, embedder=emb, threshold=0.85)
    assert agreement == pytest.approx(3 / 4)
    assert idx == 0  # the most central of the three cat answers
    assert emb.calls  # the embedder was really consulted
    # with a threshold nothing passes, every answer is its own cluster
    _, agreement_strict, clusters = vote_answers(answers, k=4, embedder=emb, threshold=0.999)
    assert agreement_strict == pytest.approx(1 / 4)
    assert len(clusters) == 4


def test_group_vote_fuses_boxes_masks_and_sources_by_majority() -> None:
    blobs: dict[str, bytes] = {}
    # three samples see the cat (slightly different boxes/masks); one sees a spurious dog
    m1 = rect_mask([10, 10, 30, 30])
    m2 = rect_mask([10, 10, 30, 30])
    m3 = rect_mask([12, 12, 32, 32])
    logp = TokenLogprobs(tokenizer="t", token_ids=[5], topk_ids=[[5, 6]], topk_logprobs=[[-0.1, -2.0]])
    traces = [
        make_trace("g", 0, "a cat", [obj("cat", [10, 10, 30, 30], 0.9, m1)], ["d1", "d2"], blobs=blobs),
        make_trace(
            "g",
            1,
            "A cat.",
            [obj("cat", [10, 10, 30, 30], 0.9, m2), obj("dog", [40, 5, 55, 20])],
            ["d1"],
            blobs=blobs,
            logprobs=logp,
        ),
        make_trace("g", 2, "a dog", [obj("cat", [12, 12, 32, 32], 0.45, m3)], ["d2", "d3"], blobs=blobs),
    ]
    c = vote_group(traces)
    assert normalize_text(c.answer or "") == "cat"
    assert c.agreement["answer"] == pytest.approx(2 / 3)
    assert [o.label for o in c.objects] == ["cat"]  # the dog (1 of 3) is below quorum 2
    # score-weighted box: (0.9*10 + 0.9*10 + 0.45*12) / 2.25 = 10.4
    assert c.objects[0].box == pytest.approx([10.4, 10.4, 30.4, 30.4])
    fused = c.objects[0].mask.decode()  # type: ignore[union-attr]
    expected = (m1.astype(int) + m2 + m3) * 2 > 3
    assert np.array_equal(fused, expected)
    assert fused[11, 11] and not fused[31, 31]  # pixels only the outlier mask had are voted out
    assert c.agreement["objects"] == pytest.approx(1.0)  # the kept cat is supported by 3/3
    assert c.sources == ["d1", "d2"]  # d3 (1 vote) dropped; d1 ranks first on mean rank
    assert c.agreement["sources"] == pytest.approx(2 / 3)
    assert c.question == "What is in the picture?"
    assert c.k == 3 and c.n_ok == 3
    # the chosen answer's trace is sample 0 or 1; sample 1 carries the logprobs
    assert c.chosen_trace in (traces[0].id, traces[1].id)
    if c.chosen_trace == traces[1].id:
        assert c.llm_topk == logp


def test_llm_logprobs_come_from_the_chosen_trace() -> None:
    logp = TokenLogprobs(tokenizer="t", token_ids=[7], topk_ids=[[7]], topk_logprobs=[[-0.5]])
    traces = [
        make_trace("g", 0, "a bus", logprobs=None),
        make_trace("g", 1, "a cat", logprobs=logp),
        make_trace("g", 2, "the cat", logprobs=logp),
    ]
    c = vote_group(traces)
    assert c.chosen_trace in (traces[1].id, traces[2].id)
    assert c.llm_topk == logp


def test_failed_samples_count_in_k_but_do_not_vote() -> None:
    traces = [
        make_trace("g", 0, "a cat", sources=["d1"]),
        make_trace("g", 1, "a cat", sources=["d1"], status="error"),
        make_trace("g", 2, "a dog", sources=["d1"], node_error="chroma down"),
    ]
    c = vote_group(traces)
    assert c.n_ok == 1 and c.k == 3
    assert set(c.failures) == {traces[1].id, traces[2].id}
    assert c.agreement["answer"] == pytest.approx(1 / 3)
    assert c.sources == []  # one vote is below the quorum of 2


def test_no_objects_anywhere_is_full_agreement() -> None:
    c = vote_group([make_trace("g", i, "nothing here") for i in range(3)])
    assert c.objects == [] and c.agreement["objects"] == 1.0 and c.agreement["sources"] == 1.0


def test_tta_flip_and_scale_map_back_to_the_original_frame() -> None:
    tta = {"flip": True, "scale": 2.0, "orig_size": [H, W]}
    # in the original frame the cat is at [10, 5, 20, 15]; scaled x2 -> [20, 10, 40, 30] on a 120-wide
    # image; flipped -> [80, 10, 100, 30]
    aug_mask = np.zeros((H * 2, W * 2), dtype=bool)
    aug_mask[10:30, 80:100] = True
    seen = obj("cat", [80, 10, 100, 30], mask=aug_mask)
    back = untta_object(seen, TTA.from_metadata(tta))
    assert back.box == pytest.approx([10, 5, 20, 15])
    assert back.mask is not None and back.mask.size == [H, W]
    assert np.array_equal(back.mask.decode(), rect_mask([10, 5, 20, 15]))

    traces = [
        make_trace("g", 0, "a cat", [obj("cat", [10, 5, 20, 15])]),
        make_trace("g", 1, "a cat", [seen], tta=tta),
        make_trace("g", 2, "a cat", [obj("cat", [10, 5, 20, 15])], tta={"flip": False, "scale": 1.0}),
    ]
    c = vote_group(traces)
    assert len(c.objects) == 1
    assert c.objects[0].box == pytest.approx([10, 5, 20, 15])
    assert c.agreement["objects"] == pytest.approx(1.0)
    # without the mapping the flipped box would not match: check the vote really used it
    raw = vote_group([traces[0], make_trace("g", 1, "a cat", [seen]), traces[2]])
    assert raw.agreement["objects"] < 1.0


def test_consensus_refers_to_the_unaugmented_input() -> None:
    blobs: dict[str, bytes] = {}
    orig = np.zeros((H, W, 3), dtype=np.uint8)
    aug = np.ones((H * 2, W * 2, 3), dtype=np.uint8)
    tta = {"flip": True, "scale": 2.0, "orig_size": [H, W]}
    t_aug = make_trace("g", 0, "a cat", blobs=blobs, image=aug, tta=tta)
    t_orig = make_trace("g", 1, "a cat", blobs=blobs, image=orig)
    c = vote_group([t_aug, t_orig])
    assert c.image is not None and not isinstance(c.image, str)
    assert c.image.shape == [H, W, 3]
