"""One training step of the real recipe, in one process or as one rank of a gloo process group, for
``test_ddp_train.py``: the losses of the global batch and every parameter's gradient (what DDP leaves in
``.grad``: the average over the ranks), saved by rank 0."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
