"""Training on several processes: ``graphdistill train DATASET --out RUN --nproc N`` (:func:`train_local`, N
processes on this machine) or one process per rank started by torchrun (:func:`train_rank`, the process group
from torchrun's environment). gloo on CPU, NCCL on CUDA (one GPU per process).

Each rank runs the same :class:`graphdistill.student.train.TrainRecipe`, which sees the process group and splits
every global batch of ``batch_size`` rows over the ranks (DistributedDataParallel; losses and batch norms over
the global batch: :mod:`graphdistill.student.ranks`). Rank 0 writes the run and shows progress; a run written
this way is a run like any other (``load_student``, ``--resume`` with any number of processes).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from graphdistill.errors import GraphdistillError
from graphdistill.student.train import TrainConfig, TrainRecipe

log = logging.getLogger(__name__)

TIMEOUT_S = 1800.0  # how long a rank waits for the others at a collective (rank 0 validating, writing)


class TrainingError(GraphdistillError, RuntimeError):
    """A rank of a training on several processes failed (the others were stopped)."""


class Display(Protocol):
    """What rank 0 shows while it trains (the CLI's progress bars)."""

    def on_step(self, info: dict[str, Any]) -> None: ...
    def on_epoch(self, record: dict[str, Any]) -> None: ...
    def on_progress(self, stage: str, done: int, total: int) -> None: ...
    def close(self) -> None: ...


def backend_for(cfg: TrainConfig) -> str:
    """NCCL when the run trains on CUDA, gloo otherwise."""
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def check_split(batch_size: int, nproc: int) -> None:
    """A global batch must split evenly over the processes (raises ``ValueError`` in one line)."""
    if nproc < 1:
        raise ValueError(f"nproc {nproc}: must be at least 1")
    if batch_size % nproc:
        raise ValueError(
            f"batch size {batch_size} does not split over {nproc} processes: give a multiple of {nproc}"
        )


def train_rank(
    cfg: TrainConfig, display: Callable[[], Display] | None = None, *, timeout_s: float | None = None
) -> dict[str, Any] | None:
    """Train as one rank of a process group: the one already initialised, or one from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Rank 0 builds ``display`` and returns the
    final metrics; the other ranks return None."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        timeout = datetime.timedelta(seconds=timeout_s or TIMEOUT_S)
        dist.init_process_group(backend_for(cfg), timeout=timeout)
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        check_split(cfg.batch_size, world_size)
        shown = display() if display is not None and rank == 0 else None
        recipe = TrainRecipe(
            cfg,
            on_step=shown.on_step if shown else None,
            on_epoch=shown.on_epoch if shown else None,
            on_progress=shown.on_progress if shown else None,
        )
        try:
            recipe.setup()
            try:
                recipe.train()
                metrics = recipe.save()
            finally:
                recipe.cleanup()
        finally:
            if shown is not None:
                shown.close()
        return metrics if rank == 0 else None
    finally:
        if own:
            dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on the loopback (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    nproc: int,
    port: int,
    cfg: TrainConfig,
    display: Callable[[], Display] | None,
    timeout_s: float,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))  # the processes share the cores
    logging.basicConfig(level=logging.WARNING)
    train_rank(cfg, display, timeout_s=timeout_s)


def train_local(
    cfg: TrainConfig,
    nproc: int,
    display: Callable[[], Display] | None = None,
    *,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Train on ``nproc`` processes of this machine (spawned; loopback rendezvous on a free port) and return
    the final metrics (RUN/metrics.json). ``display`` (picklable: a module-level class or function) is built
    in rank 0. A failing rank stops the others; its error is raised here as :class:`TrainingError`."""
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException, start_processes

    check_split(cfg.batch_size, nproc)
    if backend_for(cfg) == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"nproc {nproc}: only {torch.cuda.device_count()} GPUs (one per process)")
    try:
        start_processes(
            _worker,
            args=(nproc, free_port(), cfg, display, timeout_s or TIMEOUT_S),
            nprocs=nproc,
            join=True,
            start_method="spawn",
        )
    except ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise TrainingError(f"training on {nproc} processes failed: {lines[-1] if lines else exc}") from exc
    except ProcessExitedException as exc:
        raise TrainingError(f"training on {nproc} processes failed: {exc}") from exc
    metrics: dict[str, Any] = json.loads((Path(cfg.out) / "metrics.json").read_text())
    return metrics


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` from torchrun's environment; 1 outside a torchrun launch."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def train_on(
    cfg: TrainConfig, nproc: int = 1, display: Callable[[], Display] | None = None
) -> dict[str, Any] | None:
    """Train where the command was started: as one rank under torchrun (None on ranks other than 0), on
    ``nproc`` local processes, or in this process. Returns the final metrics."""
    if torchrun_world_size() > 1:
        return train_rank(cfg, display)
    if nproc > 1:
        return train_local(cfg, nproc, display)
    from graphdistill.student.train import train

    check_split(cfg.batch_size, nproc)
    shown = display() if display is not None else None
    try:
        return train(
            cfg,
            on_step=shown.on_step if shown else None,
            on_epoch=shown.on_epoch if shown else None,
            on_progress=shown.on_progress if shown else None,
        )
    finally:
        if shown is not None:
            shown.close()
