"""Fidelity metrics on hand-built cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from _fixtures import bag_embedder, rect_mask
from graphdistill.eval import metrics
from graphdistill.trace import RLE


def _obj(
    label: str, cid: int, box: list[float], score: float = 0.9, size: tuple[int, int] = (100, 100)
) -> dict:
    x1, y1, x2, y2 = (int(v) for v in box)
    return {
        "label": label,
        "class_id": cid,
        "score": score,
        "box": box,
        "mask": RLE.encode(rect_mask([x1, y1, x2, y2], *size)).model_dump(),
    }


def _teacher_outputs() -> list[dict]:
    return [
        {
            "answer": "There is a dog on the grass.",
            "objects": [_obj("dog", 16, [10, 10, 50, 50]), _obj("person", 0, [60, 20, 90, 90])],
            "sources": ["dog_facts", "grass_facts", "park"],
        },
        {
            "answer": "A red bus.",
            "objects": [_obj("bus", 5, [5, 5, 95, 60])],
            "sources": ["bus_facts", "city"],
        },
    ]


def test_normalisation_and_token_f1_known_pair() -> None:
    assert metrics.normalize_text("The  Cat, sat!") == "cat sat"
    assert metrics.exact_match("A dog.", "dog") == 1.0
    assert metrics.exact_match("a dog", "a cat") == 0.0
    # pred tokens: red bus parked (3); ref: bus is red (3); common 2 -> P = R = 2/3 -> F1 = 2/3
    assert metrics.token_f1("the red bus parked", "a bus is red") == pytest.approx(2 / 3)
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("", "x") == 0.0


def test_semantic_agreement_uses_injected_embedder_and_threshold() -> None:
    res = metrics.answer_metrics(
        ["a dog on grass", "a red bus"], ["grass dog", "a blue car"], embedder=bag_embedder
    )
    assert res["answer_semantic"] == pytest.approx(0.5)  # first pair identical bags, second disjoint
    assert res["answer_exact"] == 0.0
    assert 0.0 < res["answer_cosine"] < 1.0  # type: ignore[operator]


def test_box_iou_of_a_shifted_box() -> None:
    # a 40x40 box shifted right by 10: intersection 30*40 = 1200, union 2*1600 - 1200 = 2000 -> 0.6
    iou = metrics.box_iou([[10, 10, 50, 50]], [[20, 10, 60, 50]])
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(0.6)
    assert metrics.box_iou([[0, 0, 1, 1]], [[5, 5, 6, 6]])[0, 0] == 0.0


def test_mask_iou_of_half_overlapping_masks() -> None:
    a = RLE.encode(rect_mask([0, 0, 10, 20], 20, 20))  # left half, 200 px
    b = RLE.encode(rect_mask([5, 0, 15, 20], 20, 20))  # shifted by 5: overlap 100, union 300
    assert metrics.mask_iou(a, b) == pytest.approx(1 / 3)
    c = RLE.encode(rect_mask([0, 0, 10, 10], 20, 20))  # half of a
    assert metrics.mask_iou(a, c) == pytest.approx(0.5)


def test_perfect_student_scores_one_everywhere() -> None:
    t = _teacher_outputs()
    res = metrics.fidelity(t, t, embedder=bag_embedder)
    for key in ("answer_exact", "answer_f1", "answer_semantic", "box_map50", "box_map", "box_map75"):
        assert res[key] == pytest.approx(1.0), key
    assert res["mask_miou"] == pytest.approx(1.0)
    assert res["sources_recall"] == pytest.approx(1.0)
    assert res["sources_precision"] == pytest.approx(1.0)
    assert set(res["box_ap_per_class"]) == {"dog", "person", "bus"}
    assert all(v == pytest.approx(1.0) for v in res["box_ap_per_class"].values())
    assert "ground_truth" not in res


def test_empty_student_scores_zero() -> None:
    t = _teacher_outputs()
    empty = [{"answer": "", "objects": [], "sources": []} for _ in t]
    res = metrics.fidelity(t, empty, embedder=bag_embedder)
    for key in (*metrics.FIDELITY_KEYS, "sources_precision"):
        assert res[key] == 0.0, key


def test_shifted_box_passes_map50_but_not_map75() -> None:
    teacher = [[_obj("dog", 16, [10, 10, 50, 50])]]
    shifted = [[_obj("dog", 16, [20, 10, 60, 50])]]  # IoU 0.6
    res = metrics.box_map(teacher, shifted)
    assert res["box_map50"] == pytest.approx(1.0)
    assert res["box_map75"] == pytest.approx(0.0)
    # IoU 0.6 clears the thresholds 0.50 and 0.55 of the ten 0.50:0.05:0.95 -> mAP 0.2
    assert res["box_map"] == pytest.approx(0.2, abs=0.01)
    # the wrong class never matches, however well the box fits
    wrong = [[_obj("cat", 15, [10, 10, 50, 50])]]
    assert metrics.box_map(teacher, wrong)["box_map50"] == 0.0


def test_mask_miou_counts_unmatched_teacher_objects_as_zero() -> None:
    t = _teacher_outputs()[0]["objects"]  # dog + person
    only_dog = [t[0]]
    assert metrics.mask_miou([t], [only_dog]) == pytest.approx(0.5)
    # a student dog shifted by 10 px: box IoU 0.6 (matched), mask IoU 0.6 too for rectangles
    shifted = [_obj("dog", 16, [20, 10, 60, 50]), t[1]]
    assert metrics.mask_miou([t], [shifted]) == pytest.approx((0.6 + 1.0) / 2)
    # Hungarian matching keeps pairs one-to-one: two student dogs cannot both take the teacher dog
    pairs = metrics.match_objects([t[0]], [t[0], t[0]])
    assert len(pairs) == 1


def test_sources_recall_at_k_and_precision() -> None:
    teacher = [["a", "b", "c"], ["d", "e"]]
    student = [["a", "x", "b"], ["e", "d"]]
    res = metrics.source_metrics(teacher, student)
    assert res["sources_recall"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert res["sources_precision"] == pytest.approx((2 / 3 + 1.0) / 2)
    at1 = metrics.source_metrics(teacher, student, k=1)
    assert at1["sources_recall"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_ground_truth_rows_are_scored_side_by_side() -> None:
    t = _teacher_outputs()
    student = [dict(t[0]), {**t[1], "answer": "a blue car"}]
    gt = [None, {"answer": "a blue car", "objects": t[1]["objects"], "sources": ["bus_facts"]}]
    res = metrics.fidelity(t, student, ground_truth=gt, embedder=bag_embedder)
    assert res["answer_exact"] == pytest.approx(0.5)
    side = res["ground_truth"]
    assert side["n"] == 1
    assert side["student"]["answer_exact"] == 1.0
    assert side["teacher"]["answer_exact"] == 0.0
    assert side["teacher"]["sources_recall"] == 1.0


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="reference outputs"):
        metrics.compare_outputs(_teacher_outputs(), [], embedder=bag_embedder)


# --------------------------------------------------------------------------------------------------------
# One implementation of each measure
# --------------------------------------------------------------------------------------------------------


def test_gate_training_and_eval_give_one_token_f1() -> None:
    """ "The cat." against "cat" once scored 0.667 in the int8 export gate and in training's validation, 1.0
    in evaluation. Now each of the three reports 1.0: the gate's measurement run on a decoded answer, eval's
    per-row and mean scores, and the function training validates with."""
    import inspect
    from types import SimpleNamespace

    pytest.importorskip("torch")
    from graphdistill.dataset import DatasetRow
    from graphdistill.eval.evaluate import row_scores
    from graphdistill.export import parity as export_parity
    from graphdistill.student import train

    # TrainRecipe.validate reports answer_f1 (and every fidelity figure) through metrics.compare_outputs
    assert "compare_outputs" in inspect.unwrap(train.TrainRecipe.validate).__code__.co_names
    assert not hasattr(train, "token_f1")
    loaded = SimpleNamespace(
        preprocessing={"size": 32},
        config=SimpleNamespace(num_classes=80, has_text=True),
        thresholds={},
        encode_outputs=["memory"],  # no object head: only the answer is scored
        tokenizer=SimpleNamespace(decode=lambda ids: "The cat."),
    )
    sample = SimpleNamespace(row=DatasetRow(answer="cat"), letterbox=None)
    raw = SimpleNamespace(answer_ids=[5, 6], outputs={})
    gate = export_parity.fidelity(loaded, [sample], [raw])  # type: ignore[arg-type]
    assert gate["answer_token_f1"] == 1.0
    assert row_scores({"answer": "cat"}, {"answer": "The cat."})["answer_f1"] == 1.0
    assert metrics.answer_metrics(["cat"], ["The cat."], semantic=False)["answer_f1"] == 1.0


def test_one_box_iou_and_object_f1_for_vote_gate_and_eval() -> None:
    # the pairwise and the one-pair form are one computation
    assert metrics.box_iou_pair([10, 10, 50, 50], [20, 10, 60, 50]) == pytest.approx(0.6)
    assert metrics.box_iou_pair([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union
    t = _teacher_outputs()[0]["objects"]  # dog + person
    assert metrics.objects_f1(t, t) == 1.0 and metrics.objects_f1([], []) == 1.0
    assert metrics.objects_f1(t, [t[0]]) == pytest.approx(2 / 3)  # 2 * 1 matched / (2 + 1)
    # a pair under the IoU threshold never takes the partner of one over it. Teacher dogs A, B; student dogs
    # X, Y: IoU A-X 0.513, A-Y 0.392, B-X 0.375, B-Y 0.220. Maximising the total IoU of all pairs picks
    # A-Y + B-X (0.767 > 0.733) and then drops both (< 0.5): no match. Only pairs that can count compete
    a, b = _obj("dog", 16, [45, 35, 80, 60]), _obj("dog", 16, [50, 35, 90, 75])
    x, y = _obj("dog", 16, [55, 40, 85, 60]), _obj("dog", 16, [35, 35, 65, 65])
    assert [(ti, si) for ti, si, _ in metrics.match_objects([a, b], [x, y])] == [(0, 0)]
    assert metrics.objects_f1([a, b], [x, y]) == pytest.approx(2 * 1 / 4)


# --------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------------------------------------


def _photo_rows(n_photos: int, per_photo: int, *, seed: int = 0) -> tuple[list[dict], list[dict], list[str]]:
    """Rows about ``n_photos`` photos, ``per_photo`` questions each; the student gets about half the answers
    and objects right, differently per photo."""
    rng = np.random.default_rng(seed)
    teacher, student, photos = [], [], []
    for p in range(n_photos):
        objs = [_obj("dog", 16, [10, 10, 50, 50]), _obj("person", 0, [60, 20, 90, 90])]
        for q in range(per_photo):
            teacher.append({"answer": "a dog and a person", "objects": objs, "sources": ["dogs", "people"]})
            right = rng.random() < 0.5
            student.append(
                {
                    "answer": "a dog and a person" if right else "a cat",
                    "objects": objs if right else objs[:1],
                    "sources": ["dogs"] if q % 2 else ["dogs", "people"],
                }
            )
            photos.append(f"photo{p}")
    return teacher, student, photos


def test_row_scores_give_compare_outputs_figures() -> None:
    teacher, student, _ = _photo_rows(3, 4)
    point = metrics.compare_outputs(teacher, student, embedder=bag_embedder)
    figures = metrics.RowScores(teacher, student, embedder=bag_embedder).figures()
    assert set(figures) == set(metrics.FIDELITY_KEYS)
    for key in metrics.FIDELITY_KEYS:
        assert figures[key] == pytest.approx(point[key]), key


def test_bootstrap_interval_contains_the_point_estimate_and_is_seeded() -> None:
    teacher, student, photos = _photo_rows(5, 4)
    point = metrics.compare_outputs(teacher, student, embedder=bag_embedder)
    ci = metrics.fidelity_intervals(teacher, student, photos, embedder=bag_embedder, resamples=300)
    assert set(ci) == set(metrics.FIDELITY_KEYS)
    for key, interval in ci.items():
        assert interval is not None, key
        lo, hi = interval
        assert 0.0 <= lo <= point[key] <= hi <= 1.0, (key, point[key], interval)
    assert ci["answer_f1"][1] - ci["answer_f1"][0] > 0.05  # about half right: a real spread
    again = metrics.fidelity_intervals(teacher, student, photos, embedder=bag_embedder, resamples=300)
    assert again == ci
    other = metrics.fidelity_intervals(teacher, student, photos, embedder=bag_embedder, resamples=300, seed=1)
    assert other != ci


def test_bootstrap_interval_is_degenerate_for_identical_predictions() -> None:
    teacher, _, photos = _photo_rows(4, 3)
    ci = metrics.fidelity_intervals(teacher, teacher, photos, embedder=bag_embedder, resamples=100)
    assert ci == {key: [pytest.approx(1.0), pytest.approx(1.0)] for key in metrics.FIDELITY_KEYS}


def test_bootstrap_interval_widens_with_fewer_rows() -> None:
    def width(n_photos: int, per_photo: int) -> float:
        teacher, student, photos = _photo_rows(n_photos, per_photo, seed=2)
        lo, hi = metrics.fidelity_intervals(teacher, student, photos, semantic=False, resamples=300)[
            "answer_f1"
        ]
        return hi - lo

    assert width(4, 2) > width(12, 6) > 0


def test_resampling_draws_whole_photos_then_rows_within_them() -> None:
    clusters = ["a"] + ["b"] * 5  # photo a has one row, photo b five
    resamples = metrics.cluster_resamples(clusters, 200, seed=0)
    assert [list(r) for r in resamples] == [list(r) for r in metrics.cluster_resamples(clusters, 200, seed=0)]
    sizes = set()
    for r in resamples:
        from_a = int(np.sum(r == 0))
        from_b = len(r) - from_a
        assert set(r[r > 0]) <= {1, 2, 3, 4, 5}
        # a photo drawn k times brings k times its own number of rows, all of them its own
        assert from_b % 5 == 0 and from_a + from_b // 5 == 2
        sizes.add(len(r))
    assert sizes == {2, 6, 10}  # a twice, a and b, b twice
    # rows of one photo move together: one photo all right and one all wrong is two observations, not
    # forty, so the interval spans (nearly) everything; with each row its own cluster it is narrow
    teacher = [{"answer": "a dog"}] * 40
    student = [{"answer": "a dog"}] * 20 + [{"answer": "a cat"}] * 20
    photos = ["right"] * 20 + ["wrong"] * 20
    by_photo = metrics.fidelity_intervals(teacher, student, photos, semantic=False, resamples=400)
    by_row = metrics.fidelity_intervals(teacher, student, None, semantic=False, resamples=400)
    assert by_photo["answer_exact"] == [0.0, 1.0]
    lo, hi = by_row["answer_exact"]  # type: ignore[misc]
    assert 0.3 < lo < 0.5 < hi < 0.7
