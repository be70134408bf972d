"""One training step of the real recipe, in one process or as one rank of a gloo process group, for
``test_ddp_train.py``: the losses of the global batch and every parameter's gradient (what DDP leaves in
``.grad``: the average over the ranks), saved by rank 0."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import torch


def double_student(config: Any) -> torch.nn.Module:
    """The student in float64 (before DDP wraps it): what differs then is a mistake, not the order of float32
    sums (in float32 the first convolution's gradient differs by ~3e-5 of its largest value)."""
    from graphdistill.student.model import Student

    return Student(config).double()


def one_step(cfg: Any, out: Path) -> None:
    from graphdistill.student.ranks import across_ranks, reduce_mean, world
    from graphdistill.student.train import TrainRecipe

    recipe = TrainRecipe(cfg, model_factory=double_student)
    recipe.setup()
    recipe.model.train()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in next(iter(recipe._batches(0))).items()}
    with across_ranks():
        losses = recipe._losses(batch)
        shown = reduce_mean(losses)
    losses["total"].backward()
    if world()[0] == 0:
        grads = {n: p.grad.detach().clone() for n, p in recipe.model.named_parameters() if p.grad is not None}
        buffers = {n: b.detach().clone() for n, b in recipe.model.named_buffers() if "running" in n}
        torch.save({"losses": shown, "grads": grads, "buffers": buffers, "rows": len(batch["image"])}, out)
    recipe.cleanup()


def rank_main(rank: int, world_size: int, port: int, cfg: Any, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        one_step(cfg, out)
    finally:
        dist.destroy_process_group()
