"""Training that streams a dataset's Parquet row groups (``TrainConfig.stream``, ``graphdistill train --stream``):
a split is read one row group at a time and never held whole; the shuffle visits every row once an epoch, in an
order fixed by (seed, epoch); the student is sized by one streamed pass exactly as from the rows in memory; a
streamed run on a ``memory://`` dataset never asks the dataset for all its rows and writes a run that loads and
predicts like any run; one resumed after its first epoch ends where an uninterrupted one does; two processes
streaming take the one-process step; the command passes the flags on and refuses a shuffle buffer that holds no
row. A student started from the graph's detector with its trunk frozen runs the trunk per batch (no feature
cache) and takes the loss the cached features give; one that trains the detector's neck and head gets the
detector's per-cell targets per batch, as in memory.

Not covered here: NCCL (no GPU in CI).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("tokenizers")

from _ddp_step import one_and_two, same_step  # noqa: E402
from _fixtures import TINY_STUDENT_96, count_row_group_reads, tiny_train_config  # noqa: E402
from graphdistill.cli import main  # noqa: E402
from graphdistill.dataset import Dataset, DatasetError, make_synthetic_dataset, open_dataset  # noqa: E402
from graphdistill.student.loader import collate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUP = 4  # rows a row group holds in these tests' datasets (the writer's ROW_GROUP)


def _grouped(url: str, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Dataset:
    """The synthetic dataset at ``url`` (``kw``: make_synthetic_dataset's), written in row groups of GROUP rows."""
    import graphdistill.dataset as dataset

    with monkeypatch.context() as m:
        m.setattr(dataset, "ROW_GROUP", GROUP)
        return make_synthetic_dataset(url, **kw)


def test_a_split_is_read_one_row_group_at_a_time_in_the_order_asked(
    mem: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _grouped("memory://groups", monkeypatch, n=18, seed=1, size=32, fractions=(1.0, 0.0, 0.0))
    read = count_row_group_reads(monkeypatch)
    assert ds.row_group_sizes("train") == [4, 4, 4, 4, 2] and read == [], "the footer only"
    assert sum(ds.row_group_sizes("val")) == 0  # an empty split: one empty row group, or none
    groups = ds.iter_row_groups("train", [3, 0, 4])
    first = next(groups)
    assert read == [3], "one row group read for the first"
    rest = list(groups)
    assert read == [3, 0, 4]
    in_order = list(ds.iter_rows("train"))
    assert [first, *rest] == [in_order[12:16], in_order[0:4], in_order[16:18]]
    assert [len(g) for g in ds.iter_row_groups("train")] == [4, 4, 4, 4, 2]
    read.clear()
    list(ds.iter_rows("train"))
    assert read == [0, 1, 2, 3, 4], "walking the groups kept no rows: they are read again"
    with pytest.raises(DatasetError, match="no row group 5"):
        list(ds.iter_row_groups("train", [5]))
    with pytest.raises(DatasetError, match="split must be one of"):
        ds.row_group_sizes("dev")


def test_the_shuffle_visits_every_row_once_an_epoch_holding_a_buffer_and_a_row_group(
    mem: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphdistill.student import stream

    ds = _grouped("memory://shuffle", monkeypatch, n=30, seed=2, size=32, fractions=(1.0, 0.0, 0.0))
    ids = [r.id for r in ds.iter_rows("train")]
    held: list[int] = []  # rows read from the file and not yet emitted, after each emitted row
    read = 0
    real = Dataset.iter_row_groups

    def counted(self: Dataset, split: str, order: Any = None) -> Any:
        nonlocal read
        for group in real(self, split, order):
            read += len(group)
            yield group

    monkeypatch.setattr(Dataset, "iter_row_groups", counted)

    def epoch(seed: int, buffer: int = 5) -> list[str]:
        nonlocal read
        read, out = 0, []
        for row in stream.shuffled_rows(ds, "train", buffer, seed):
            out.append(row.id)
            held.append(read - len(out))
        return out

    orders = {seed: epoch(seed) for seed in (0, 1, 100_003)}
    for order in orders.values():
        assert sorted(order) == sorted(ids) and len(order) == 30  # every row, once
        assert order != ids
    assert len({tuple(o) for o in orders.values()}) == 3  # another epoch or seed: another order
    assert epoch(1) == orders[1]  # the same seed: the same order
    assert max(held) <= 5 + GROUP - 1 < 30, "a buffer and (part of) one row group, never the split"
    assert sorted(epoch(0, buffer=1000)) == sorted(ids)  # a buffer larger than the split: a full shuffle
    with pytest.raises(ValueError, match="at least 1 row"):
        next(stream.shuffled_rows(ds, "train", 0, 0))


def test_the_student_is_sized_by_one_streamed_pass_as_from_the_rows_in_memory(tmp_path: Path) -> None:
    from graphdistill.student.tokenizer import StudentTokenizer
    from graphdistill.student.train import AnswerShapes, decoding_rules, retrieved_k

    ds = make_synthetic_dataset(tmp_path / "ds", n=24, seed=5, size=32)
    rows = ds.rows("train")
    tok = StudentTokenizer.train([t for r in rows for t in (r.question, r.answer)], vocab_size=300)
    shapes = AnswerShapes(tok)
    for r in ds.iter_rows("train"):
        shapes.add(r)
    answers = [tok.encode(r.answer) for r in rows]
    assert shapes.decoding_rules() == decoding_rules(answers)
    assert shapes.retrieved_k() == retrieved_k(rows) and Counter(len(r.sources) for r in rows)[0] < len(rows)
    assert shapes.answer_len == max(len(a) for a in answers)
    assert shapes.question_len == max(len(tok.encode(r.question)) for r in rows) and shapes.rows == len(rows)
    assert AnswerShapes(tok).decoding_rules() == decoding_rules([])


@pytest.mark.slow
def test_a_streamed_run_on_a_memory_dataset_never_holds_its_rows_and_loads_and_predicts(
    mem: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphdistill.student.predict import load_student
    from graphdistill.student.train import train

    ds = _grouped("memory://stream/ds", monkeypatch, n=16, seed=0, size=64)
    n_train, n_val = ds.splits["train"], ds.splits["val"]
    assert n_train > 2 * GROUP and n_val > 0

    def whole_split(self: Dataset, split: str) -> Any:
        raise AssertionError(f"streaming asked for every row of {split}")

    with monkeypatch.context() as m:
        m.setattr(Dataset, "rows", whole_split)
        read = count_row_group_reads(m)
        metrics = train(
            tiny_train_config("memory://stream/ds", tmp_path / "run", epochs=2, batch_size=4, stream=True)
        )
    assert metrics["epochs"] == 2 and metrics["steps"] == 2 * -(-n_train // 4)
    assert read, "the rows came from the Parquet files"
    val = metrics["history"][-1]["val"]
    assert {"loss", "answer_token_acc"} <= set(val) and metrics["history"][-1]["val_split"] == "val"
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["train_config"]["stream"] is True and meta["dataset"] == "memory://stream/ds"
    row = next(open_dataset("memory://stream/ds").iter_rows("val"))
    out = load_student(tmp_path / "run").predict(ds.image(row), row.question)
    assert set(out) == {"answer", "objects", "sources"} and isinstance(out["answer"], str)


@pytest.mark.slow
def test_a_streamed_run_resumed_after_its_first_epoch_matches_a_straight_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An epoch's stream is fixed by (seed, epoch): a run resumed from epoch 1's checkpoint streams the batches
    an uninterrupted run streams in epoch 2, and ends with its weights."""
    from graphdistill.student.train import train

    ds = tmp_path / "ds"
    _grouped(str(ds), monkeypatch, n=10, seed=4, size=64, fractions=(1, 0, 0))

    def cfg(out: str, **kw: Any) -> Any:
        return tiny_train_config(
            ds, tmp_path / out, epochs=2, batch_size=4, stream=True, shuffle_buffer=3, **kw
        )

    straight = train(cfg("straight"))

    def killed(record: dict[str, Any]) -> None:
        raise KeyboardInterrupt  # as if the process were killed once epoch 1's checkpoint is on disk

    with pytest.raises(KeyboardInterrupt):
        train(cfg("resumed"), on_epoch=killed)
    resumed = train(cfg("resumed", resume=True))
    assert resumed["epochs"] == 2 and resumed["steps"] == straight["steps"] == 6
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-6)
    want = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=False)["model"]
    got = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)["model"]
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, msg=name)


@pytest.mark.slow
def test_two_processes_streaming_take_the_one_process_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ranks read the same row groups in the same shuffled order and each takes its half of the global
    batch: the losses, every gradient and the batch norms' running statistics are the one process's."""
    ds = tmp_path / "ds"
    _grouped(str(ds), monkeypatch, n=10, seed=3, fractions=(1, 0, 0))

    def config(out: Path) -> Any:
        return tiny_train_config(
            ds, out, batch_size=4, overrides=dict(TINY_STUDENT_96), stream=True, shuffle_buffer=3
        )

    a, b = one_and_two(ds, tmp_path, cfg=config)
    same_step(a, b)


@pytest.mark.slow
def test_a_frozen_trunk_runs_per_batch_when_streaming_as_its_cached_features_would(tmp_path: Path) -> None:
    """The demo's student (started from the graph's YOLO detector, its trunk frozen): in memory its trunk's
    features are cached once; streaming, the trunk runs on each batch, in eval mode and without gradients, and
    every module of it is left in the mode it was in. The losses of one batch agree (the cache keeps float16)."""
    import _models
    from _fixtures import dataset_offering
    from graphdistill.student.train import FEATURE_KEYS, TrainRecipe

    ds = dataset_offering(tmp_path / "ds", {"detect": _models.detector().student_offer()})
    recipes = []
    for name, stream in (("cached", False), ("streamed", True)):
        recipe = TrainRecipe(
            tiny_train_config(ds, tmp_path / name, batch_size=4, freeze="trunk", stream=stream)
        )
        recipe.setup()
        recipe.model.train()
        recipes.append(recipe)
    cached, streamed = recipes
    assert cached.train_set is not None and streamed.train_set is None and streamed.trunk_per_batch
    batch = collate([cached.train_set[i] for i in range(len(cached.train_set))])
    assert all(k in batch for k in FEATURE_KEYS)
    trunk = streamed.model.get_submodule("trunk")
    modes = [m.training for m in trunk.modules()]
    assert any(modes) and not all(modes)  # Student.train: the detector's batch norms stay in eval mode
    want = cached._losses(dict(batch))
    got = streamed._losses({k: v for k, v in batch.items() if k not in FEATURE_KEYS})
    assert [m.training for m in trunk.modules()] == modes
    assert set(got) == set(want)
    for name, value in want.items():
        assert float(got[name].detach()) == pytest.approx(float(value.detach()), rel=1e-2, abs=1e-3), name
    got["total"].backward()
    assert not any(p.grad is not None for p in trunk.parameters())  # nothing of the detector trains


@pytest.mark.slow
def test_the_detectors_targets_are_made_per_batch_when_streaming_as_in_memory(tmp_path: Path) -> None:
    """A student started from the detector that trains its neck and head (``freeze="backbone"``) learns from the
    detector's per-cell outputs: in memory computed once for every image, streaming for each batch's images. With
    the whole train split one batch, an epoch is the same step both ways (its rows in another order)."""
    import _models
    from _fixtures import dataset_offering
    from graphdistill.student.train import train

    ds = dataset_offering(tmp_path / "ds", {"detect": _models.detector().student_offer()})
    assert open_dataset(ds).splits["train"] <= 4
    losses = [
        train(tiny_train_config(ds, tmp_path / str(stream), batch_size=4, freeze="backbone", stream=stream))[
            "final_train_loss"
        ]
        for stream in (False, True)
    ]
    assert losses[0]["kd_cls"] > 0 and set(losses[0]) == set(losses[1])
    for name, value in losses[0].items():
        assert losses[1][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.slow
def test_the_train_command_streams_with_the_shuffle_buffer_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_synthetic_dataset(tmp_path / "ds", n=6, seed=0, size=64, fractions=(1, 0, 0))
    args = [
        "train",
        str(tmp_path / "ds"),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--image-size",
        "96",
    ]
    assert main([*args, "--batch-size", "4", "--stream", "--shuffle-buffer", "7", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["steps"] == 2
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["train_config"]["stream"] is True and meta["train_config"]["shuffle_buffer"] == 7


@pytest.mark.parametrize("bad", ["0", "-3"])
def test_a_shuffle_buffer_that_holds_no_row_is_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    from graphdistill.student.train import TrainRecipe

    make_synthetic_dataset(tmp_path / "ds", n=3, seed=0, size=32)
    args = ["train", str(tmp_path / "ds"), "--out", str(tmp_path / "run")]
    assert main([*args, "--stream", "--shuffle-buffer", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--shuffle-buffer {bad}" in err and "at least 1" in err, err
    assert main([*args, "--shuffle-buffer", "8"]) == 2
    assert "--shuffle-buffer: applies with --stream only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=f"shuffle_buffer must be at least 1 row, got {bad}"):
        TrainRecipe(
            tiny_train_config(tmp_path / "ds", tmp_path / "lib", stream=True, shuffle_buffer=int(bad))
        ).setup()
