"""Training on several processes (``graphdistill train --nproc N``, DistributedDataParallel over gloo on the CPU):
one step of 2 processes is the one-process step on the same global batch (losses, every gradient, the batch
norms' running statistics); the run 2 processes write loads like any run and resumes; a batch that does not
split over the processes is refused.

The student here is the synthetic dataset's: a timm trunk trained from scratch, so every batch norm trains and
the equivalence holds only because the ranks normalise with the global batch's statistics
(:func:`graphdistill.student.ranks.global_batch_norms`). That normalisation all-reduces in the backward pass too,
so the same step is also taken when one rank's share holds nothing to learn (no objects, masks, sources, answer
tokens or embeddings) and the other's does, for that student (float64) and for one started from the graph's YOLO
detector with its trunk frozen, as the demo's is (float32: to 1e-4 relative, 1e-5 of the largest gradient).
Not covered here: the retrieval-KD queries (the synthetic graph offers no retriever) and NCCL (no GPU in CI).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("tokenizers")

from _fixtures import TINY_STUDENT_96, tiny_train_config  # noqa: E402

SPAWN_TIMEOUT_S = 240  # a stuck rank fails the test instead of hanging CI

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from graphdistill.dataset import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ddp") / "ds"
    make_synthetic_dataset(root, n=6, seed=3, fractions=(1, 0, 0))
    return root


def _spawn(fn: Any, args: tuple[Any, ...], nprocs: int) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; all of them are stopped when one fails or the
    time is up."""
    from torch.multiprocessing.spawn import start_processes

    ctx = start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} ranks still running after {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)


def _one_and_two(
    dataset: Path, tmp_path: Path, empty: tuple[int, ...] = (), cfg: Any = None, double: bool = True
) -> tuple[Any, Any]:
    """The first global batch's step in one process and on two (``empty``: its rows emptied of everything to
    learn, see ``_ddp_step.empty_rows``; ``cfg(out)``: the TrainConfig, by default the tiny student's), as rank
    0 saved each."""
    import _ddp_step
    from graphdistill.student.distributed import free_port

    # the one-process training tests' student (96 px), batches of 4 rows: 2 a rank
    config = cfg or (
        lambda out: tiny_train_config(dataset, out, batch_size=4, overrides=dict(TINY_STUDENT_96))
    )
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _ddp_step.one_step(config(tmp_path / "run-1"), one, empty, double)
    _spawn(_ddp_step.rank_main, (2, free_port(), config(tmp_path / "run-2"), two, empty, double), nprocs=2)
    return torch.load(one, weights_only=False), torch.load(two, weights_only=False)


def _same_step(a: Any, b: Any, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    """Two processes' step ``b`` is the one-process step ``a``: the losses, every gradient (to ``rtol`` and
    ``atol`` times the largest), the running statistics."""
    assert a["rows"] == 4 and b["rows"] == 2  # rank 0 held half of the same global batch
    assert set(a["losses"]) == set(b["losses"]) and "mask_bce" in a["losses"]
    for name, value in a["losses"].items():
        assert b["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert set(a["grads"]) <= set(b["grads"]) and a["grads"]
    # float64 (see _ddp_step.double_student): relative to the largest gradient, so that a gradient that is zero
    # in exact arithmetic (a batch norm's bias feeding another batch norm: ~1e-17 of rounding) compares as zero
    top = max(float(g.abs().max()) for g in a["grads"].values())
    for name, g in b["grads"].items():  # one process leaves None where two leave zeros (all its cells empty)
        want = a["grads"].get(name, torch.zeros_like(g))
        torch.testing.assert_close(g, want, rtol=rtol, atol=atol * top, msg=name)
    for name, buf in a["buffers"].items():  # the batch norms saw the global batch's statistics
        torch.testing.assert_close(b["buffers"][name], buf, rtol=rtol, atol=1e-12 / 1e-9 * atol, msg=name)


@pytest.mark.slow
def test_two_processes_take_the_one_process_step_on_the_same_global_batch(
    dataset: Path, tmp_path: Path
) -> None:
    a, b = _one_and_two(dataset, tmp_path)
    assert set(a["grads"]) == set(b["grads"]) and len(a["grads"]) > 100
    assert any("running_var" in n for n in a["buffers"])
    _same_step(a, b)


@pytest.mark.slow
def test_a_rank_whose_share_holds_nothing_to_learn_takes_the_same_collectives_and_the_same_step(
    dataset: Path, tmp_path: Path
) -> None:
    """Rank 0's two rows hold no objects, masks, sources, answer tokens or embeddings; rank 1's do. Every head's
    output still reaches rank 0's loss (with a zero gradient), so the batch norms' backward all-reduces run on
    both ranks: no rank waits on a collective the other never calls (before: a deadlock in the first step)."""
    a, b = _one_and_two(dataset, tmp_path, empty=(0, 1))
    assert a["losses"]["det_box"] > 0 and a["losses"]["mask_bce"] > 0  # rank 1's rows had objects
    _same_step(a, b)


@pytest.mark.slow
def test_train_on_two_processes_writes_a_run_that_loads_predicts_and_resumes(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.cli import main
    from graphdistill.dataset import open_dataset
    from graphdistill.student import distributed
    from graphdistill.student.predict import load_student

    monkeypatch.setattr(distributed, "TIMEOUT_S", 120.0)  # a stuck rank fails instead of hanging CI
    run = tmp_path / "run"
    args = [
        "train",
        str(dataset),
        "--out",
        str(run),
        "--batch-size",
        "4",
        "--image-size",
        "96",
        "--nproc",
        "2",
    ]
    assert main([*args, "--epochs", "1", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["epochs"] == 1 and metrics["steps"] == 2  # 6 rows: a batch of 4, then one of 2 (1 a rank)
    ds = open_dataset(dataset)
    row = ds.rows("train")[0]
    out = load_student(run).predict(ds.image(row), row.question)
    assert set(out) == {"answer", "objects", "sources"} and isinstance(out["answer"], str)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["epochs"] == 1 and not list(run.rglob("*.tmp-*"))

    assert main([*args, "--epochs", "2", "--resume", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["epochs"] == 2 and metrics["steps"] == 4 and len(metrics["history"]) == 2
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["step"] == 4
    out = load_student(run).predict(ds.image(row), row.question)
    assert isinstance(out["answer"], str)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphdistill.cli import main
    from graphdistill.student.distributed import check_split

    rc = main(["train", str(dataset), "--out", str(tmp_path / "run"), "--batch-size", "5", "--nproc", "2"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--batch-size 5" in err and "multiple of 2" in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="batch size 6 does not split over 4 processes"):
        check_split(6, 4)


@pytest.mark.slow
def test_a_student_started_from_the_detector_with_its_trunk_frozen_takes_the_same_step_when_a_rank_holds_nothing(
    tmp_path: Path,
) -> None:
    """The demo's student: started from the graph's YOLO detector, the trunk frozen (``freeze="trunk"``, its batch
    norms in eval mode: no collective) and the mask prototype / coefficient heads and the text side training.
    Rank 0's share holds no objects: its loss must still reach the coefficient head, whose batch norms' backward
    all-reduce rank 1 runs (before: a collective mismatch in the first step). float32, hence the tolerance."""
    import _models
    from _fixtures import dataset_offering

    ds = dataset_offering(tmp_path / "ds", {"detect": _models.detector().student_offer()})

    def config(out: Path) -> Any:
        return tiny_train_config(ds, out, batch_size=4, seed=0, freeze="trunk")

    a, b = _one_and_two(ds, tmp_path, empty=(0, 1), cfg=config, double=False)
    assert not any(name.startswith("trunk.") for name in a["grads"])  # nothing of the detector trains
    _same_step(a, b, rtol=1e-4, atol=1e-5)
