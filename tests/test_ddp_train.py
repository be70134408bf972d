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
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("tokenizers")

from _ddp_step import one_and_two, same_step  # noqa: E402
from _fixtures import tiny_train_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from graphdistill.dataset import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ddp") / "ds"
    make_synthetic_dataset(root, n=6, seed=3, fractions=(1, 0, 0))
    return root


@pytest.mark.slow
def test_two_processes_take_the_one_process_step_on_the_same_global_batch(
    dataset: Path, tmp_path: Path
) -> None:
    a, b = one_and_two(dataset, tmp_path)
    assert set(a["grads"]) == set(b["grads"]) and len(a["grads"]) > 100
    assert any("running_var" in n for n in a["buffers"])
    same_step(a, b)


@pytest.mark.slow
def test_a_rank_whose_share_holds_nothing_to_learn_takes_the_same_collectives_and_the_same_step(
    dataset: Path, tmp_path: Path
) -> None:
    """Rank 0's two rows hold no objects, masks, sources, answer tokens or embeddings; rank 1's do. Every head's
    output still reaches rank 0's loss (with a zero gradient), so the batch norms' backward all-reduces run on
    both ranks: no rank waits on a collective the other never calls (before: a deadlock in the first step)."""
    a, b = one_and_two(dataset, tmp_path, empty=(0, 1))
    assert a["losses"]["det_box"] > 0 and a["losses"]["mask_bce"] > 0  # rank 1's rows had objects
    same_step(a, b)


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

    a, b = one_and_two(ds, tmp_path, empty=(0, 1), cfg=config, double=False)
    assert not any(name.startswith("trunk.") for name in a["grads"])  # nothing of the detector trains
    same_step(a, b, rtol=1e-4, atol=1e-5)
