"""Filtering recorded traces into a dataset: checks catch planted inconsistencies, user rules and agreement
thresholds drop what they should, near-duplicates go, splits never share a photo, kept + dropped = groups,
and the dataset (and its report) reads back."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _fixtures import H, W, ellipse_mask, make_trace, noise, obj
from graphdistill.dataset import (
    DatasetError,
    DatasetRow,
    DatasetWriter,
    make_synthetic_dataset,
    open_dataset,
)
from graphdistill.filter.checks import CheckConfig, GreedyAnswer, mentioned_classes, run_checks
from graphdistill.filter.dedup import dhash, hamming, near_duplicates
from graphdistill.filter.filtering import (
    FilterConfig,
    FilterError,
    decide_group,
    filter_store,
    teacher_measures,
)
from graphdistill.filter.report import teacher_line
from graphdistill.filter.rules import RuleError, load_rule, register_rule, unregister_rule
from graphdistill.filter.splits import Item, SplitLeakError, assign_splits, verify_no_leak
from graphdistill.filter.vote import vote_group
from graphdistill.trace import Document, ObjectOut, TokenLogprobs, Trace


def cat(box: Sequence[float] = (10, 10, 30, 30), score: float = 0.9) -> ObjectOut:
    return obj("cat", box, score, ellipse_mask(box))


def group(gid: str, answers: Sequence[str], **kw: Any) -> list[Trace]:
    objects = kw.pop("objects", [cat()])
    sources = kw.pop("sources", ["doc-cat"])
    return [make_trace(gid, i, a, objects, sources, **kw) for i, a in enumerate(answers)]


def checks_of(traces: Sequence[Trace], cfg: CheckConfig | None = None) -> dict[str, str]:
    return dict(run_checks(vote_group(traces), traces, cfg))


# --------------------------------------------------------------------------------------------------------
# the dataset format
# --------------------------------------------------------------------------------------------------------


def test_synthetic_dataset_reads_back_with_exact_targets(tmp_path: Path) -> None:
    ds = make_synthetic_dataset(tmp_path / "ds", n=12, seed=3)
    again = open_dataset(tmp_path / "ds")
    assert ds.splits == again.splits and sum(ds.splits.values()) == 12
    assert set(ds.splits) == {"train", "val", "test"} and all(v > 0 for v in ds.splits.values())
    assert again.manifest["format"] == "graphdistill-dataset/1"
    assert again.class_names == ["circle", "square", "triangle"]
    assert again.graph is not None and [f.name for f in again.graph.outputs] == [
        "answer",
        "objects",
        "sources",
    ]
    rows = again.all_rows()
    assert len({r.id for r in rows}) == 12
    photos = [p for r in rows for p in r.provenance_photos]
    assert len(photos) == len(set(photos))
    for r in rows:
        img = again.image(r)
        assert img.shape == (r.image_height, r.image_width, 3) and img.dtype == np.uint8
        for o in r.objects:
            assert isinstance(o, ObjectOut) and o.mask is not None
            m = o.mask.decode()
            ys, xs = np.nonzero(m)
            assert o.box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # exact box of the drawn mask
            assert (img[m] != img[0, 0]).any(axis=-1).all()  # the shape's pixels are painted
        assert list(r.sources) == [f"doc-{lab}" for lab in dict.fromkeys(o.label for o in r.objects)]
    # deterministic for a seed
    same = make_synthetic_dataset(tmp_path / "ds2", n=12, seed=3)
    assert [r.answer for r in same.all_rows()] == [r.answer for r in rows]


def test_writer_round_trips_every_column(tmp_path: Path) -> None:
    logp = TokenLogprobs(tokenizer="t", token_ids=[1, 2], topk_ids=[[1], [2]], topk_logprobs=[[-0.1], [-0.2]])
    w = DatasetWriter(tmp_path / "d", {"class_names": ["cat"], "documents": [{"id": "doc-cat", "text": "x"}]})
    img = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    w.add(
        {
            "id": "g1",
            "question": "q?",
            "answer": "A cat.",
            "objects": [cat()],
            "sources": ["doc-cat"],
            "agreement_answer": 2 / 3,
            "provenance_photos": ["p/a", "p/b"],
            "llm_topk": logp,
            "trace_ids": ["t1", "t2"],
        },
        img,
        "val",
    )
    w.close()
    ds = open_dataset(tmp_path / "d")
    (row,) = ds.rows("val")
    assert ds.rows("train") == [] and ds.splits == {"train": 0, "val": 1, "test": 0}
    assert row.objects == (cat(),) and row.llm_topk == logp
    assert row.agreement_answer == pytest.approx(2 / 3, abs=1e-6)
    assert row.provenance_photos == ("p/a", "p/b") and row.trace_ids == ("t1", "t2")
    assert np.array_equal(ds.image(row), img)
    assert ds.documents == [{"id": "doc-cat", "text": "x"}]


def test_the_writer_streams_rows_a_row_group_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    import graphdistill.dataset as dataset_mod

    monkeypatch.setattr(dataset_mod, "ROW_GROUP", 3)
    w = DatasetWriter(tmp_path / "d", {"class_names": ["cat"]})
    rng = np.random.default_rng(0)
    for i in range(10):
        img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        w.add({"id": f"r{i}", "question": f"q{i}?", "answer": "A cat.", "objects": [cat()]}, img, "train")
        assert len(w._pending["train"]) < 3  # never more than a row group waits in memory
    w.add({"id": "v0", "question": "v?", "answer": "A cat."}, img, "val")
    assert not (tmp_path / "d" / "manifest.json").exists()  # unfinished: no reader opens it
    w.close()
    assert pq.ParquetFile(tmp_path / "d" / "train.parquet").num_row_groups == 4  # 3 + 3 + 3 + 1
    ds = open_dataset(tmp_path / "d")
    assert ds.splits == {"train": 10, "val": 1, "test": 0}
    assert [r.id for r in ds.rows("train")] == [f"r{i}" for i in range(10)]
    assert [r.question for r in ds.rows("train")] == [f"q{i}?" for i in range(10)]
    assert all(r.objects == (cat(),) for r in ds.rows("train")) and ds.rows("test") == []


def test_a_dataset_row_is_checked_on_construction_and_on_replace() -> None:
    from dataclasses import FrozenInstanceError, replace

    row = DatasetRow.of(id="g1", question="q?", objects=[cat().model_dump()], sources=["doc-cat"])
    assert row.objects == (cat(),) and row.sources == ("doc-cat",) and row.split == "train"
    with pytest.raises(ValueError, match=r"dataset row 'g1': objects must be tuple\[ObjectOut, \.\.\.\]"):
        replace(row, objects=[cat()])
    with pytest.raises(ValueError, match="split must be one of"):
        replace(row, split="holdout")
    with pytest.raises(ValueError, match=r"unknown columns \['questoin'\]"):
        DatasetRow.of(id="g1", questoin="q?")
    with pytest.raises(FrozenInstanceError):
        row.answer = "A cat."  # type: ignore[misc]


def test_a_corrupt_row_names_the_file_and_the_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_synthetic_dataset(tmp_path / "ds", n=4, seed=0)
    path = tmp_path / "ds" / "train.parquet"
    table = pq.read_table(path)
    objects = table.column("objects").to_pylist()
    objects[0] = '[{"label": "cat"}]'  # an object with neither score nor box
    pq.write_table(
        table.set_column(table.schema.get_field_index("objects"), "objects", pa.array(objects)), path
    )
    rid = table.column("id")[0].as_py()
    with pytest.raises(DatasetError, match=rf"train\.parquet: row '{rid}' is corrupt"):
        open_dataset(tmp_path / "ds").rows("train")


def test_missing_or_corrupt_dataset_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"manifest\.json is missing"):
        open_dataset(tmp_path / "empty")
    ds = make_synthetic_dataset(tmp_path / "ds", n=4, seed=0)
    row = ds.rows("train")[0]
    blob = tmp_path / "ds" / "blobs" / row.image[:2] / row.image
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DatasetError, match=row.image):
        ds.image(row)
    (tmp_path / "ds" / "val.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"val\.parquet"):
        open_dataset(tmp_path / "ds").rows("val")
    (tmp_path / "ds" / "manifest.json").write_text("{broken")
    with pytest.raises(DatasetError, match=r"manifest\.json"):
        open_dataset(tmp_path / "ds")


# --------------------------------------------------------------------------------------------------------
# checks: each catches its planted inconsistency, and a clean group passes them all
# --------------------------------------------------------------------------------------------------------


def test_a_consistent_group_passes_every_check() -> None:
    assert checks_of(group("g", ["There is a cat.", "A cat is here.", "There is a cat."])) == {}


def test_answer_names_a_class_the_detector_did_not_find() -> None:
    found = checks_of(group("g", ["There is a dog on the sofa."] * 3))
    assert "answer_class_not_detected" in found and "dog" in found["answer_class_not_detected"]
    assert "couch" in found["answer_class_not_detected"]  # sofa -> couch synonym


def test_answer_denies_a_detected_class() -> None:
    found = checks_of(group("g", ["There is no cat here."] * 3))
    assert "answer_denies_detected" in found and "cat" in found["answer_denies_detected"]
    assert "answer_class_not_detected" not in found  # a denied class is not a claimed one
    assert mentioned_classes("two cats and no dogs", ["cat", "dog"]) == ({"cat"}, {"dog"})
    assert mentioned_classes("There isn't a dog, just a cat.", ["cat", "dog"]) == ({"cat"}, {"dog"})
    # naming is not denying: "the chair is not a dining table" does not say the table is absent
    assert mentioned_classes("the chair is not a dining table", ["chair", "dining table"])[1] == set()


@pytest.mark.parametrize("box,mask_box", [((5, 5, 55, 35), (5, 5, 7, 7)), ((10, 10, 30, 30), None)])
def test_mask_covering_too_little_or_too_much_of_its_box(
    box: tuple[int, ...], mask_box: tuple[int, ...] | None
) -> None:
    mask = np.zeros((H, W), dtype=bool)
    if mask_box is None:
        mask[10:30, 10:30] = True  # fills its box: 100 %
    else:
        mask[mask_box[1] : mask_box[3], mask_box[0] : mask_box[2]] = True  # 4 px of 1500
    found = checks_of(group("g", ["A cat."] * 3, objects=[obj("cat", box, 0.9, mask)]))
    assert "mask_box_coverage" in found


def test_source_retrieved_past_the_distance_threshold() -> None:
    docs = [Document(id="doc-cat", text="cats", distance=1.9)]
    found = checks_of(group("g", ["A cat."] * 3, documents=docs))
    assert "source_distance" in found and "1.900" in found["source_distance"]
    assert "source_distance" not in checks_of(
        group("g", ["A cat."] * 3, documents=docs), CheckConfig(max_source_distance=2.0)
    )


def test_empty_and_truncated_answers() -> None:
    assert "empty_answer" in checks_of(group("g", ["", "", "   "]))
    assert "truncated_answer" in checks_of(group("g", ["There is a cat sitting on"] * 3))
    by_reason = checks_of(group("g", ["A cat."] * 3, finish_reason="length"))
    assert "finish_reason 'length'" in by_reason["truncated_answer"]
    # a recorded "stop" trusts the model even without a full stop
    assert "truncated_answer" not in checks_of(group("g", ["a cat"] * 3, finish_reason="stop"))


def test_failed_traces_and_failed_nodes() -> None:
    traces = [
        make_trace("g", 0, "A cat.", [cat()], ["doc-cat"], status="error"),
        make_trace("g", 1, "A cat.", [cat()], ["doc-cat"], status="error"),
        make_trace("g", 2, "A cat.", [cat()], ["doc-cat"]),
    ]
    assert "failed_trace" in checks_of(traces)
    traces = [make_trace("g", i, "A cat.", [cat()], ["doc-cat"], node_error="chroma down") for i in range(2)]
    traces.append(make_trace("g", 2, "A cat.", [cat()], ["doc-cat"]))
    found = checks_of(traces)
    assert "failed_node" in found and "chroma down" in found["failed_node"]
    assert "failed_trace" not in found


# --------------------------------------------------------------------------------------------------------
# the teacher's answers, measured for the filter report
# --------------------------------------------------------------------------------------------------------


def test_teacher_measures_count_greedy_grounding_agreement_and_keep_rate() -> None:
    config = FilterConfig()
    groups = {
        # sample 0 grounded, all agree, kept
        "ok": group("ok", ["There is a cat."] * 3),
        # sample 0 names a dog nobody detected; the vote picks the cat answer (2 of 3), so the group is
        # kept, but the greedy answer counts as not grounded
        "dog": group("dog", ["There is a dog and a cat.", "There is a cat.", "There is a cat."]),
        # sample 0 cut by the token limit (4 words); dropped: the consensus answer is the cut one
        "cut": [
            make_trace("cut", 0, "There is a cat", [cat()], ["doc-cat"], finish_reason="length"),
            make_trace("cut", 1, "There is a cat", [cat()], ["doc-cat"], finish_reason="length"),
            make_trace("cut", 2, "A cat.", [cat()], ["doc-cat"], finish_reason="stop"),
        ],
        # sample 0 failed: no greedy answer to measure; the other two still vote
        "fail": [
            make_trace("fail", 0, "A cat.", [cat()], ["doc-cat"], status="error"),
            make_trace("fail", 1, "A cat.", [cat()], ["doc-cat"]),
            make_trace("fail", 2, "A cat.", [cat()], ["doc-cat"]),
        ],
    }
    decisions = [decide_group(traces, config, None) for traces in groups.values()]
    greedy = {d.group_id: d.greedy for d in decisions}
    assert greedy["fail"] is None
    assert greedy["ok"] == GreedyAnswer(grounded=True, cut_by_length=False, words=4)
    assert greedy["dog"] == GreedyAnswer(grounded=False, cut_by_length=False, words=7)
    assert greedy["cut"] == GreedyAnswer(grounded=True, cut_by_length=True, words=4)
    assert [d.kept for d in decisions] == [True, True, False, True]
    agreement = [d.consensus.agreement["answer"] for d in decisions]
    assert agreement == pytest.approx([1, 2 / 3, 2 / 3, 2 / 3])  # "fail" counts its failed sample in K
    # an input recorded once (a replay with one sample) agrees with itself: it says nothing of agreement
    once = decide_group([make_trace("once", 0, "A dog.", [cat()], ["doc-cat"])], config, None)
    assert once.consensus.k == 1 and once.consensus.agreement["answer"] == 1.0
    m = teacher_measures([*decisions, once])
    assert m == {
        "groups": 5,
        "greedy_n": 4,
        "greedy_grounded": pytest.approx(2 / 4),
        "greedy_cut_by_length": pytest.approx(1 / 4),
        "greedy_words": pytest.approx(17 / 4),
        "agreement_n": 4,
        "answer_agreement": pytest.approx(float(np.mean(agreement))),
        "keep_rate": pytest.approx(3 / 5),
    }
    assert teacher_measures([])["greedy_grounded"] is None
    assert teacher_measures([once])["answer_agreement"] is None
    line = teacher_line(m)
    assert "naming only detected classes 50% (of 4)" in line and "keep rate 60%" in line
    assert (
        "agreement across the K samples 0.75 (of 4 inputs with two or more)" in line and "4.2 words" in line
    )


# --------------------------------------------------------------------------------------------------------
# user rules, dedup, splits
# --------------------------------------------------------------------------------------------------------


def test_rules_register_and_load_from_a_file(tmp_path: Path) -> None:
    rule = register_rule("short_question", lambda t: len(t.inputs["question"]) < 10)
    try:
        assert load_rule("short_question") is rule
        t = make_trace("g", 0, "A cat.", question="Why?")
        assert rule.keeps(t) == (True, 1.0)
    finally:
        unregister_rule("short_question")
    f = tmp_path / "myrules.py"
    f.write_text("def answer_len(trace):\n    return len(trace.output.get('answer', '')) / 10\n")
    loaded = load_rule(f"{f}:answer_len", threshold=0.5)
    assert loaded.keeps(make_trace("g", 0, "A cat sat.")) == (True, 1.0)
    assert loaded.keeps(make_trace("g", 0, "Cat.")) == (False, pytest.approx(0.4))
    with pytest.raises(RuleError, match="nope"):
        load_rule("nope")
    with pytest.raises(RuleError, match="no callable"):
        load_rule(f"{f}:missing")


def test_dhash_sees_near_duplicates_and_not_different_images() -> None:
    rng = np.random.default_rng(0)
    base = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)[..., None].repeat(3, -1)
    base = np.ascontiguousarray(base + rng.integers(0, 60, base.shape).astype(np.uint8))
    noisy = np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 255, base.shape, dtype=np.uint8)
    assert hamming(dhash(base), dhash(noisy)) <= 4
    assert hamming(dhash(base), dhash(other)) > 10
    dropped = near_duplicates(
        [
            ("a", dhash(base), "Is there a cat?"),
            ("b", dhash(noisy), "is there a CAT"),
            ("c", dhash(noisy), "Why?"),
        ]
    )
    assert dropped == {"b": "a"}


def test_splits_tie_composites_and_never_share_a_photo() -> None:
    items = [Item(f"aug-{p}-{i}", (p,)) for p in "ABCDEFGH" for i in range(3)]
    items += [Item("comp-AB", ("A", "B")), Item("comp-BC", ("B", "C")), Item("held", ("Z",), heldout=True)]
    items += [Item("uses-held", ("Z", "H"))]
    splits = assign_splits(items, (0.6, 0.2, 0.2), seed=1)
    verify_no_leak(items, splits)
    assert splits["held"] == "test" and splits["uses-held"] == "test"
    assert all(splits[f"aug-H-{i}"] == "test" for i in range(3))  # H is tied to the held-out Z
    # with a held-out photo, test is exactly its component: nothing else is evaluated on
    assert {i for i, s in splits.items() if s == "test"} == {
        "held",
        "uses-held",
        *(f"aug-H-{i}" for i in range(3)),
    }
    abc = {splits[it.id] for it in items if set(it.photos) & {"A", "B", "C"}}
    assert len(abc) == 1  # A-B-C is one component
    assert set(splits.values()) == {"train", "val", "test"}
    rest = [s for s in splits.values() if s != "test"]
    assert rest.count("train") > rest.count("val") > 0  # 0.6 : 0.2 between train and val
    assert splits == assign_splits(items, (0.6, 0.2, 0.2), seed=1)  # deterministic
    # the same photos named held out by id, not marked: the same test split
    by_id = assign_splits(
        [Item(it.id, it.photos) for it in items], (0.6, 0.2, 0.2), heldout_photos=["Z"], seed=1
    )
    assert by_id == splits
    # without held-out photos every split gets a share of the components
    free = [Item(f"aug-{p}-{i}", (p,)) for p in "ABCDEFGHIJ" for i in range(3)]
    assert set(assign_splits(free, (0.6, 0.2, 0.2), seed=1).values()) == {"train", "val", "test"}
    with pytest.raises(SplitLeakError):
        verify_no_leak(items, {**splits, "comp-AB": "val" if splits["comp-AB"] != "val" else "train"})


def test_from_three_source_photos_the_test_split_is_never_empty() -> None:
    # five inputs about five photos at 0.8/0.1/0.1 once went 4/1/0: nothing to evaluate on
    five = [Item(f"in-{p}", (p,)) for p in "ABCDE"]
    splits = assign_splits(five, (0.8, 0.1, 0.1))
    counts = {s: list(splits.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 3, "val": 1, "test": 1}
    # the component moved is the smallest one of the split that had the most
    big = [Item(f"in-A-{i}", ("A",)) for i in range(4)] + [Item("in-B", ("B",)), Item("in-C", ("C",))]
    moved = assign_splits(big, (0.8, 0.2, 0.01))
    assert [i for i, s in moved.items() if s == "test"] in (["in-B"], ["in-C"])
    assert all(moved[f"in-A-{i}"] == moved["in-A-0"] != "test" for i in range(4))
    # two photos, or no test share: no test split is forced
    assert "test" not in assign_splits(five[:2], (0.8, 0.1, 0.1)).values()
    assert "test" not in assign_splits(five, (0.8, 0.2, 0.0)).values()


class _CountingStore:
    """A TraceStore that tracks how many of the traces it handed out are still alive (weak references)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.alive: dict[int, Any] = {}  # handed-out number -> a weak reference that removes itself
        self.handed = 0
        self.most_alive = 0

    def get(self, trace_id: str) -> Trace:
        import weakref

        t = self.store.get(trace_id)
        self.handed += 1
        self.alive[self.handed] = weakref.ref(t, lambda _, n=self.handed: self.alive.pop(n, None))
        self.most_alive = max(self.most_alive, len(self.alive))
        return t

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.mark.parametrize("schema", [True, False], ids=["recorded-schema", "inferred-kinds"])
def test_filtering_holds_one_group_of_traces_at_a_time(tmp_path: Path, schema: bool) -> None:
    from graphdistill.dataset import synthetic_graph_schema
    from graphdistill.store.trace_store import TraceStore

    store = TraceStore(tmp_path / "store")
    blobs: dict[str, bytes] = {}
    declared = synthetic_graph_schema().model_dump(mode="json")
    for g in range(12):  # each group retrieved its own document: the manifest must hold all twelve
        docs = [Document(id=f"doc-{g:02d}", text=f"fact number {g}")]
        traces = group(
            f"g{g:02d}",
            ["There is a cat."] * 3,
            image=noise(g),
            photos=[f"p/{g}"],
            blobs=blobs,
            documents=docs,
        )
        for t in traces:
            if schema:
                t.metadata["graph_schema"] = declared
            store.append(t, blobs)
    counting = _CountingStore(store)
    result = filter_store(counting, tmp_path / "ds", FilterConfig(), report=False)  # type: ignore[arg-type]
    assert result.summary()["kept"] == 12
    assert counting.most_alive <= 3 * 2, (
        counting.most_alive
    )  # one group (and the one read to find the schema)
    plain = filter_store(store, tmp_path / "ds2", FilterConfig(), report=False)
    assert plain.manifest["graph"] == result.manifest["graph"]
    assert [d["id"] for d in result.manifest["documents"]] == [f"doc-{g:02d}" for g in range(12)]
    assert result.manifest["class_names"][15] == "cat"  # COCO order: every label seen is a COCO class
    assert [o.name for o in open_dataset(tmp_path / "ds").graph.outputs] == ["answer", "objects", "sources"]


def test_the_filter_holds_each_consensus_slim_and_spools_the_rest(tmp_path: Path) -> None:
    from graphdistill.store.trace_store import TraceStore

    store = TraceStore(tmp_path / "store")
    blobs: dict[str, bytes] = {}
    logp = TokenLogprobs(tokenizer="t", token_ids=[1], topk_ids=[[1]], topk_logprobs=[[-0.1]])
    for g in range(6):
        for t in group(
            f"g{g}", ["There is a cat."] * 3, image=noise(g), photos=[f"p/{g}"], blobs=blobs, logprobs=logp
        ):
            store.append(t, blobs)
    result = filter_store(store, tmp_path / "out" / "ds", FilterConfig(fractions=(1.0, 0.0, 0.0)))
    assert result.summary()["kept"] == 6
    for d in result.decisions:  # in memory: what the splits, the summary and the report's words need
        c = d.consensus
        assert c.question and c.answer == "There is a cat." and c.agreement["answer"] == 1.0
        assert [o.label for o in c.objects] == ["cat"] and c.objects[0].box == pytest.approx(cat().box)
        assert all(o.mask is None for o in c.objects) and c.llm_topk is None and not c.embeddings
    rows = open_dataset(tmp_path / "out" / "ds").all_rows()  # on disk: the whole consensus
    assert len(rows) == 6 and all(o.mask is not None for r in rows for o in r.objects)
    assert all(np.array_equal(r.objects[0].mask.decode(), cat().mask.decode()) for r in rows)
    assert all(r.llm_topk is not None for r in rows)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds"]  # the spool is gone
    with pytest.raises(FilterError, match="nope"):  # an error mid-way removes the spool all the same
        filter_store(store, tmp_path / "out" / "bad", FilterConfig(min_agreement={"nope": 0.5}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds"]


def test_the_dataset_ranks_the_whole_knowledge_base_and_never_what_only_held_out_inputs_retrieved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import graphdistill.teachers.retriever as retriever_mod
    from graphdistill.dataset import synthetic_graph_schema
    from graphdistill.filter.filtering import manifest_documents
    from graphdistill.store.trace_store import TraceStore

    store = TraceStore(tmp_path / "store")
    blobs: dict[str, bytes] = {}
    declared = synthetic_graph_schema().model_dump(mode="json")
    for g, photo in enumerate(["p/train0", "p/train1", "skimage/coffee"]):  # the last one is held out
        docs = [Document(id=f"doc-{g}", text=f"fact {g}")]
        for t in group(
            f"g{g}", ["There is a cat."] * 3, image=noise(g), photos=[photo], blobs=blobs, documents=docs
        ):
            t.metadata["graph_schema"] = declared
            store.append(t, blobs)
    config = FilterConfig(heldout_photos=("skimage/coffee",))
    result = filter_store(store, tmp_path / "ds", config, report=False)
    assert [d["id"] for d in result.manifest["documents"]] == ["doc-0", "doc-1"]  # not doc-2: held out only

    # a retriever that offers its knowledge base: the whole of it, read once
    offer = {"kind": "text-retriever", "embedder": "x", "knowledge_base": {"path": "kb", "collection": "c"}}
    kb = [Document(id=f"kb/{i}", text=f"fact {i}") for i in range(5)]
    asked: list[dict[str, Any]] = []
    monkeypatch.setattr(retriever_mod, "read_knowledge_base", lambda ref: asked.append(ref) or kb)
    graph = {**declared, "offers": {"retrieve": offer}}
    assert manifest_documents(graph, {"doc-0": "fact 0"}) == [{"id": d.id, "text": d.text} for d in kb]
    assert asked == [offer]

    def gone(ref: dict[str, Any]) -> list[Document]:
        raise retriever_mod.RetrieverError("knowledge base kb: no Chroma database there")

    monkeypatch.setattr(
        retriever_mod, "read_knowledge_base", gone
    )  # moved since recording: say so, fall back
    assert manifest_documents(graph, {"doc-0": "fact 0"}) == [{"id": "doc-0", "text": "fact 0"}]
    assert "cannot be read" in caplog.text and "no Chroma database" in caplog.text
    assert manifest_documents(declared, {"doc-0": "fact 0"}) == [{"id": "doc-0", "text": "fact 0"}]


def test_the_filter_says_which_split_is_empty_and_why(tmp_path: Path) -> None:
    from graphdistill.store.trace_store import TraceStore

    store = TraceStore(tmp_path / "store")
    blobs: dict[str, bytes] = {}
    for g, photo in enumerate(("p/A", "p/B")):  # two photos: too few for three splits
        for t in group(f"g{g}", ["There is a cat."] * 3, image=noise(g), photos=[photo], blobs=blobs):
            store.append(t, blobs)
    result = filter_store(store, tmp_path / "ds", FilterConfig(fractions=(0.8, 0.1, 0.1)), report=False)
    empty = result.summary()["empty_splits"]
    assert set(empty) == {"val", "test"} and result.summary()["splits"] == {"train": 2, "val": 0, "test": 0}
    assert "2 kept inputs about 2 source photos are too few to split 0.8/0.1/0.1" in empty["test"]
    assert "nothing to evaluate on" in empty["test"] and "--heldout" in empty["test"]
    # the demo's photos are not held out in a user's store: only inputs marked held out, or photos named
    assert FilterConfig().heldout_photos == ()


# --------------------------------------------------------------------------------------------------------
# end to end on a real TraceStore
# --------------------------------------------------------------------------------------------------------


def _fill_store(root: Path) -> Any:
    from graphdistill.store.trace_store import TraceStore

    store = TraceStore(root)
    plan: list[list[Trace]] = []
    blobs: dict[str, bytes] = {}
    photos = ["p/A", "p/B", "p/C", "p/D", "p/E", "p/F"]
    for g in range(12):  # clean groups, two per photo
        p = photos[g % 6]
        plan.append(group(f"ok{g:02d}", ["There is a cat."] * 3, image=noise(g), photos=[p], blobs=blobs))
    plan.append(group("comp", ["A cat."] * 3, image=noise(50), photos=["p/A", "p/B"], blobs=blobs))
    plan.append(
        group(
            "heldout",
            ["A cat."] * 3,
            image=noise(60),
            photos=["skimage/coffee"],
            recipe={"kind": "heldout", "heldout": True},
            blobs=blobs,
        )
    )
    plan.append(group("dog", ["There is a dog."] * 3, image=noise(70), blobs=blobs))  # class not detected
    plan.append(group("split", ["A cat.", "A bus.", "A dog."], image=noise(80), blobs=blobs))  # 1/3 agree
    # the same picture and question as ok00 (its question differs only in case and punctuation)
    q = "what is in the picture"
    plan.append(
        group("zdup", ["There is a cat."] * 3, image=noise(0), photos=["p/A"], blobs=blobs, question=q)
    )
    plan.append(group("long", ["There is a cat."] * 3, image=noise(90), blobs=blobs, question="A long one?"))
    failed = [make_trace("fail", i, "x", status="error", image=noise(95), blobs=blobs) for i in range(3)]
    plan.append(failed)
    # held-out groups that fail checks are kept for evaluation; one with no finished sample cannot be
    held = {"recipe": {"kind": "heldout", "heldout": True}, "blobs": blobs}
    plan.append(
        group("held-dog", ["There is a dog."] * 3, image=noise(61), photos=["skimage/camera"], **held)
    )
    plan.append(
        group(
            "held-split",
            ["A cat.", "A bus.", "A dog."],
            image=noise(61),
            photos=["skimage/camera"],
            question="Who or what is the main subject?",
            **held,
        )
    )
    plan.append(
        [
            make_trace(
                "held-fail", i, "x", status="error", image=noise(62), photos=["skimage/camera"], **held
            )
            for i in range(3)
        ]
    )
    for traces in plan:
        for t in traces:
            store.append(t, blobs)
    return store, len(plan)


def test_filter_store_end_to_end(tmp_path: Path) -> None:
    store, n_groups = _fill_store(tmp_path / "store")
    register_rule("no_long", lambda t: 0.0 if "long" in t.inputs["question"] else 1.0, threshold=0.5)
    try:
        config = FilterConfig(
            min_agreement={"answer": 0.6}, rules=[load_rule("no_long")], fractions=(0.6, 0.2, 0.2)
        )
        result = filter_store(store, tmp_path / "ds", config, source_store=str(store.root))
    finally:
        unregister_rule("no_long")
    s = result.summary()
    assert s["kept"] + s["dropped"] == n_groups == s["groups"]
    drop = {d.group_id: d.rule for d in result.decisions if not d.kept}
    assert drop == {
        "dog": "answer_class_not_detected",
        "split": "min_agreement_answer",  # "A cat." wins with 1/3
        "zdup": "near_duplicate",
        "long": "no_long",
        "fail": "failed_trace",
        "held-fail": "failed_trace",  # held out, but the teacher gave nothing to score against
    }
    assert s["by_rule"] == {**{r: 1 for r in drop.values()}, "failed_trace": 2}
    # flagged like any other group, kept all the same: the evaluation set does not depend on the filter
    flagged = {d.group_id: [n for n, _ in d.failed] for d in result.decisions if d.kept_for_evaluation}
    assert flagged == {"held-dog": ["answer_class_not_detected"], "held-split": ["min_agreement_answer"]}
    assert s["heldout"] == {"groups": 4, "kept": 3, "kept_for_evaluation": 2, "no_teacher_output": 1}
    assert s["flagged_by_rule"]["answer_class_not_detected"] == 2  # "dog" and "held-dog"
    ds = open_dataset(tmp_path / "ds")
    assert sum(ds.splits.values()) == s["kept"] == len(ds.all_rows())
    assert ds.splits == s["splits"] and all(ds.splits[k] > 0 for k in ("train", "val", "test"))
    # the test split is exactly the held-out rows the teacher answered, with their consensus
    test = {r.id: r for r in ds.rows("test")}
    assert set(test) == {"heldout", "held-dog", "held-split"}
    assert test["held-dog"].answer == "There is a dog." and test["held-split"].answer == "A cat."
    where: dict[str, str] = {}
    for r in ds.all_rows():
        for p in r.provenance_photos:
            assert where.setdefault(p, r.split) == r.split  # no photo in two splits
        if r.id in ("held-dog", "held-split"):
            continue
        seed = {"comp": 50, "heldout": 60}.get(r.id) or int(r.id.removeprefix("ok"))
        assert np.array_equal(ds.image(r), noise(seed))
        assert r.answer in ("There is a cat.", "A cat.") and len(r.trace_ids) == 3
        assert [o.label for o in r.objects] == ["cat"] and r.sources == ("doc-cat",)
    assert where["skimage/coffee"] == where["skimage/camera"] == "test"
    assert where["p/A"] == where["p/B"]  # tied by the composite
    assert ds.manifest["class_names"][15] == "cat" and len(ds.manifest["class_names"]) == 80
    assert ds.manifest["documents"] == [{"id": "doc-cat", "text": "about doc-cat"}]
    assert [f["name"] for f in ds.manifest["graph"]["outputs"]] == ["answer", "objects", "sources"]
    assert ds.manifest["source_store"] == str(store.root)
    report = tmp_path / "ds" / "report"
    written = json.loads((report / "summary.json").read_text())
    assert written["kept"] == s["kept"]
    # the teacher's answers: every group's sample 0 answered but the failed one; the "dog" group's did not
    # stay grounded; the keep rate is the kept share
    assert written["teacher"] == s["teacher"] == teacher_measures(result.decisions)
    # no finished sample 0: "failed" and "held-fail"; not grounded: "dog" and "held-dog"
    assert s["teacher"]["greedy_n"] == n_groups - 2
    assert s["teacher"]["greedy_grounded"] == pytest.approx((n_groups - 4) / (n_groups - 2))
    assert s["teacher"]["keep_rate"] == pytest.approx(s["kept"] / n_groups)
    page = (report / "report.html").read_text()
    assert "data:image/png;base64," in page and "answer_class_not_detected" in page
    assert "3 of 4 kept for evaluation" in page
    assert teacher_line(s["teacher"]) in page
    assert (report / "agreement.png").stat().st_size > 1000
    # every dropped group, one per rule but failed_trace (two); the kept held-out groups are no examples
    assert len(list((report / "examples").glob("*.png"))) == 6


def test_filter_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphdistill.cli import main

    store, n_groups = _fill_store(tmp_path / "store")
    store.close()
    rc = main(["filter", str(tmp_path / "store"), "--out", str(tmp_path / "ds"), "--no-embedder", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept"] + out["dropped"] == n_groups
    assert out["by_rule"]["failed_trace"] == 2 and out["by_rule"]["near_duplicate"] == 1
    # no agreement threshold here, so only held-dog is flagged; the test split is the same three rows as
    # under the stricter settings of test_filter_store_end_to_end
    assert out["heldout"] == {"groups": 4, "kept": 3, "kept_for_evaluation": 1, "no_teacher_output": 1}
    test_ids = {r.id for r in open_dataset(tmp_path / "ds").rows("test")}
    assert test_ids == {"heldout", "held-dog", "held-split"}
    assert (
        sum(out["splits"].values()) == out["kept"] == math.fsum(open_dataset(tmp_path / "ds").splits.values())
    )
    # bad input: one clear line, exit 2
    assert main(["filter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "not a trace store" in capsys.readouterr().err
    assert (
        main(["filter", str(tmp_path / "store"), "--out", str(tmp_path / "y"), "--rule", "unknown_rule"]) == 2
    )
    assert "unknown_rule" in capsys.readouterr().err


@pytest.mark.slow
def test_real_store_with_three_samples_filters_end_to_end(tmp_path: Path) -> None:
    """The real visual_rag teacher, recorded with K=3 sampled runs on two photos, filters into a dataset."""
    import _models
    from graphdistill.graphs.visual_rag import visual_rag
    from graphdistill.recording.recorder import record
    from graphdistill.store.trace_store import TraceStore

    teachers = _models.visual_rag_teachers()
    store = TraceStore(tmp_path / "store")
    graph = record(visual_rag(teachers=teachers), store)
    photos = ["skimage/chelsea", "skimage/astronaut"]
    for photo_id in photos:
        image = _models.builtin_image(photo_id)
        for i in range(3):
            graph.invoke(
                {"image": image, "question": "What is in this picture?"},
                config={
                    "metadata": {
                        "graphdistill_group_id": photo_id,
                        "graphdistill_sample_index": i,
                        "graphdistill_provenance": {"photos": [photo_id], "recipe": {"kind": "original"}},
                    },
                    "configurable": {"gd_sample_index": i, "gd_sampling": True, "gd_seed": 1},
                },
            )
    assert store.count() == 6

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(_models.text_embedder().embed(list(texts)))

    result = filter_store(store, tmp_path / "ds", FilterConfig(fractions=(1, 0, 0)), embedder=embed)
    s = result.summary()
    assert s["groups"] == 2 and s["kept"] + s["dropped"] == 2
    by_group = {d.group_id: d for d in result.decisions}
    cat_vote = by_group["skimage/chelsea"].consensus
    assert cat_vote.k == 3 and cat_vote.n_ok == 3
    assert "cat" in [o.label for o in cat_vote.objects]  # all three samples share the detector
    assert cat_vote.agreement["objects"] == pytest.approx(1.0)  # detection is not sampled
    assert 1 / 3 <= cat_vote.agreement["answer"] <= 1.0
    assert cat_vote.llm_topk is None  # held slim in memory: the row on disk has the log-probabilities
    ds = open_dataset(tmp_path / "ds")
    cat_row = next(r for r in ds.all_rows() if r.id == "skimage/chelsea")
    assert cat_row.llm_topk is not None and cat_row.llm_topk.token_ids
    assert ds.splits["train"] == s["kept"]
    for r in ds.all_rows():
        assert np.array_equal(ds.image(r), _models.builtin_image(r.id))
        assert len(r.trace_ids) == 3 and r.answer
    assert any(d["id"] in cat_vote.sources for d in ds.documents)
    assert (tmp_path / "ds" / "report" / "report.html").exists()


def test_the_unfiltered_config_drops_nothing_the_default_drops(tmp_path: Path) -> None:
    """``FilterConfig.unfiltered()`` (the scaling study's and the rounds' "filtering off"): every check off, no
    dedup, no agreement threshold; the samples are still voted into one row per input."""
    from _fixtures import toy_store
    from graphdistill.filter.checks import CHECKS
    from graphdistill.store.trace_store import TraceStore

    store, ds = toy_store(tmp_path, groups=6, k=3)  # inputs 2 and 5 name a dog nobody detected
    with TraceStore(store, readonly=True) as traces:
        off = filter_store(traces, tmp_path / "off", FilterConfig.unfiltered(fractions=(0.5, 0.0, 0.5)))
    on = json.loads((ds / "report" / "summary.json").read_text())
    assert on["kept"] == 4 and off.summary()["kept"] == 6
    cfg = FilterConfig.unfiltered()
    assert cfg.checks.disabled == {c.name for c in CHECKS} and not cfg.dedup and not cfg.min_agreement
    from graphdistill.cli import main

    args = ["filter", str(store), "--no-embedder", "--split", "0.5,0,0.5", "--no-filtering"]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "report" / "summary.json").read_text())["kept"] == 6
    assert main([*args, "--out", str(tmp_path / "cli2"), "--min-agreement", "0.5"]) == 2
