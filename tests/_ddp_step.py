"""One training step of the real recipe, in one process or as one rank of a gloo process group, for
``test_ddp_train.py`` and ``test_stream_train.py``: the losses of the global batch and every parameter's gradient
(what DDP leaves in ``.grad``: the average over the ranks), saved by rank 0; :func:`one_and_two` takes it both
ways and :func:`same_step` compares them."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from _fixtures import TINY_STUDENT_96, tiny_train_config

SPAWN_TIMEOUT_S = 240  # a stuck rank fails the test instead of hanging CI

# the value each of these keys takes in a row that holds nothing to learn
_NOTHING: dict[str, Any] = {
    "obj_valid": False,
    "obj_has_mask": False,
    "sources": 0,
    "topk_valid": False,
    "answer_target": -100,
    "kd_valid": False,
}


def empty_rows(batch: dict[str, torch.Tensor], rows: list[int]) -> None:
    """Rows ``rows`` of ``batch`` (in place) hold no objects, no masks, no sources, no answer tokens, no soft
    targets and no embeddings: every loss term of theirs is empty."""
    if not rows:
        return
    idx = torch.tensor(rows)
    for key, value in batch.items():
        if key in _NOTHING:
            value[idx] = _NOTHING[key]
        elif key.startswith("embedding:") and key.endswith(":valid"):
            value[idx] = False


def double_student(config: Any) -> torch.nn.Module:
    """The student in float64 (before DDP wraps it): what differs then is a mistake, not the order of float32
    sums (in float32 the first convolution's gradient differs by ~3e-5 of its largest value)."""
    from graphdistill.student.model import Student

    return Student(config).double()


def one_step(cfg: Any, out: Path, empty: tuple[int, ...] = (), double: bool = True) -> None:
    """One step on the first global batch; ``empty``: the global batch's rows emptied (:func:`empty_rows`), so
    that a rank's whole share can hold nothing to learn while the other rank's holds something. ``double=False``:
    the student the recipe builds itself, in float32 (a student started from the graph's detector: a model
    factory would start it from scratch)."""
    from graphdistill.student.ranks import across_ranks, reduce_mean, world
    from graphdistill.student.train import TrainRecipe

    recipe = TrainRecipe(cfg, model_factory=double_student if double else None)
    recipe.setup()
    recipe.model.train()
    batch = next(iter(recipe._batches(0)))
    if double:
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    rank, size = world()
    share = np.array_split(np.arange(cfg.batch_size), size)[rank]  # this rank's rows of the global batch
    empty_rows(batch, [i for i, g in enumerate(share) if int(g) in empty])
    with across_ranks():
        losses = recipe._losses(batch)
        shown = reduce_mean(losses)
    losses["total"].backward()
    if rank == 0:
        grads = {n: p.grad.detach().clone() for n, p in recipe.model.named_parameters() if p.grad is not None}
        buffers = {n: b.detach().clone() for n, b in recipe.model.named_buffers() if "running" in n}
        torch.save({"losses": shown, "grads": grads, "buffers": buffers, "rows": len(batch["image"])}, out)
    recipe.cleanup()


def rank_main(
    rank: int,
    world_size: int,
    port: int,
    cfg: Any,
    out: Path,
    empty: tuple[int, ...] = (),
    double: bool = True,
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),  # a collective one rank never reaches fails the test
    )
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        one_step(cfg, out, empty, double)
    finally:
        dist.destroy_process_group()


def spawn(fn: Any, args: tuple[Any, ...], nprocs: int) -> None:
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


def one_and_two(
    dataset: Path, tmp_path: Path, empty: tuple[int, ...] = (), cfg: Any = None, double: bool = True
) -> tuple[Any, Any]:
    """The first global batch's step in one process and on two (``empty``: its rows emptied of everything to
    learn, see :func:`empty_rows`; ``cfg(out)``: the TrainConfig, by default the tiny student's), as rank
    0 saved each."""
    from graphdistill.student.distributed import free_port

    # the one-process training tests' student (96 px), batches of 4 rows: 2 a rank
    config = cfg or (
        lambda out: tiny_train_config(dataset, out, batch_size=4, overrides=dict(TINY_STUDENT_96))
    )
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    one_step(config(tmp_path / "run-1"), one, empty, double)
    spawn(rank_main, (2, free_port(), config(tmp_path / "run-2"), two, empty, double), nprocs=2)
    return torch.load(one, weights_only=False), torch.load(two, weights_only=False)


def same_step(a: Any, b: Any, rtol: float = 1e-7, atol: float = 1e-9) -> None:
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
