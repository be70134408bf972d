"""What makes one training step split over W processes (``torch.distributed``) compute what one process computes
on the whole global batch: loss denominators over the global batch, batch norm with the global batch's
statistics, and each rank's share of the global batch.

DistributedDataParallel averages the W ranks' gradients. A loss that is a mean over rank-local counts (answer
tokens, assigned cells, rows) would make that the mean of W local means, which differs from the global mean
whenever the ranks hold different counts. So every denominator ``d`` of :mod:`graphdistill.student.losses` goes
through :func:`normaliser`: across ranks it is ``all_reduce(d) / W``, so rank r's loss is ``W·S_r / N`` and
DDP's average is the gradient of ``ΣS_r / N``, the one-process loss. Outside :func:`across_ranks` (one process,
validation on rank 0) it is the identity and the losses are bit for bit what they were.

Batch norm in training mode normalises by the batch's statistics; torch's ``SyncBatchNorm`` refuses CPU tensors
and does not know timm's ``BatchNormAct2d``. :func:`global_batch_norms` gives the model's batch norms (both kinds)
the global batch's mean and variance through a differentiable all-reduce, on CPU (gloo) and CUDA (NCCL) alike:
one implementation, the one the 2-process CPU test checks.

That all-reduce has a gradient, so it is a collective in the BACKWARD pass too: a rank whose loss does not reach a
batch norm's output would skip that batch norm's backward all-reduce while the others wait in it (a deadlock; or,
worse, a later all-reduce paired with the wrong one). So across ranks every head's output reaches every rank's
loss, with a zero contribution where the rank's share holds nothing for it (no objects, no assigned cells, no
masks, no answer tokens): :func:`reach`, used by the losses and, for every output of the model, by
:func:`graphdistill.student.losses.compute_losses`. Then every rank's backward graph holds the same model nodes,
which autograd runs in the same order (the reverse of the forward's), and the same collectives run everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")

log = logging.getLogger(__name__)

_split = False  # True inside across_ranks(): a training step split over the ranks of the process group


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def across_ranks() -> Iterator[None]:
    """Inside: a training step whose global batch is split over the process group's ranks (every rank runs the
    same code; the losses and batch norms reduce over all of them). A no-op with one process."""
    global _split
    before = _split
    _split = world()[1] > 1
    try:
        yield
    finally:
        _split = before


def split() -> bool:
    """Whether the current step is split over several ranks (see :func:`across_ranks`)."""
    return _split


def normaliser(d: Tensor, floor: float | None = None) -> Tensor:
    """A loss denominator over the global batch, as this rank's share: ``max(Σ_ranks d, floor) / W`` (``d``
    detached: counts and weight sums are not trained through). ``d.clamp(min=floor)`` (or ``d``) in one process.
    Every rank must call it at the same point of every step: it is a collective."""
    if not _split:
        return d if floor is None else d.clamp(min=floor)
    total = d.detach().clone()
    dist.all_reduce(total)
    if floor is not None:
        total = total.clamp(min=floor)
    return total / dist.get_world_size()


def mean(values: Tensor) -> Tensor:
    """The mean of ``values`` over every rank's ``values``; 0 (with a zero gradient) when there are none.
    ``values.mean()`` in one process, bit for bit."""
    if not _split:
        return values.mean() if values.numel() else values.sum() * 0.0
    return values.sum() / normaliser(torch.tensor(float(values.numel()), device=values.device), floor=1.0)


def reduce_mean(values: dict[str, Tensor]) -> dict[str, float]:
    """Logged losses: each rank's value averaged over the ranks (with :func:`normaliser`'s denominators that is
    the one-process value); the values as floats in one process."""
    if not _split or not values:
        return {k: float(v.detach()) for k, v in values.items()}
    stacked = torch.stack([v.detach().double() for v in values.values()])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(values, stacked.tolist(), strict=True))


class _Reach(torch.autograd.Function):
    """A zero scalar whose gradient for each input is zero (not None): the inputs' graphs run backward."""

    @staticmethod
    def forward(ctx: Any, *xs: Tensor) -> Tensor:
        ctx.specs = [(x.shape, x.dtype, x.device) for x in xs]
        return xs[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs)


def reach(*xs: Tensor | None) -> Tensor:
    """0, reached from each of ``xs`` that requires a gradient (a zero gradient, even where an input holds inf
    or NaN, unlike ``x.sum() * 0``): added to a rank's loss, the backward of each of their graphs runs on that
    rank, the collectives of its batch norms included, whatever the rank's rows hold. A plain zero (of the first
    input's dtype) when none of them requires a gradient."""
    given = [x for x in xs if x is not None]
    if not given:
        raise ValueError("reach: no tensor given")
    trained = [x for x in given if x.requires_grad]
    if not trained:
        return given[0].new_zeros(())
    out: Tensor = _Reach.apply(*trained)
    return out


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``F.batch_norm`` in training mode with the statistics of the global batch (two-pass: mean, then the
    biased variance), updating the running statistics as torch does (unbiased variance, momentum or the
    cumulative average)."""
    dims = [0, *range(2, x.dim())]
    local = torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=x.dtype)
    count = local.clone()
    dist.all_reduce(count)
    total = _SumAcrossRanks.apply(x.sum(dims))
    mu = total / count
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = x - mu.view(shape)
    var = _SumAcrossRanks.apply((centred * centred).sum(dims)) / count
    y: Tensor = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:
                    factor = 1.0 / float(bn.num_batches_tracked)
            n = float(count)
            unbiased = var.detach() * (n / max(n - 1.0, 1.0))
            bn.running_mean.mul_(1 - factor).add_(mu.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    return y


class _GlobalStatsMixin:
    """Batch norm that, in training mode inside :func:`across_ranks`, uses the global batch's statistics."""

    def forward(self, x: Tensor) -> Tensor:
        bn: Any = self
        if not (bn.training and _split):
            return super().forward(x)  # type: ignore[misc,no-any-return]
        y = _global_batch_norm(bn, x)
        if hasattr(bn, "act"):  # timm's BatchNormAct2d: the norm, then its dropout and activation
            y = bn.act(bn.drop(y))
        return y


_KNOWN = ("torch.nn.modules.batchnorm.BatchNorm2d", "timm.layers.norm_act.BatchNormAct2d")
_classes: dict[type, type] = {}


def global_batch_norms(model: nn.Module) -> int:
    """Give every batch norm of ``model`` the global batch's statistics across ranks (in place: each module's
    class becomes a subclass of its own, so parameters, buffers, state dicts and ``isinstance`` stay as they
    were). Returns how many. An unknown batch-norm class is an error rather than silently per-rank."""
    n = 0
    for m in model.modules():
        cls = type(m)
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or issubclass(cls, _GlobalStatsMixin):
            continue
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name not in _KNOWN:
            raise TypeError(f"{name}: no global-statistics version for training on several processes")
        if cls not in _classes:
            _classes[cls] = type(f"Global{cls.__name__}", (_GlobalStatsMixin, cls), {})
        m.__class__ = _classes[cls]
        n += 1
    return n


class ShardedBatches:
    """This rank's share of each global batch: the batches one process's ``DataLoader(shuffle=True,
    batch_size=B, generator=g)`` draws (the same sampler, the same generator), each cut into ``world_size``
    consecutive slices, as even as the batch allows, so the ranks together see exactly the rows one process
    sees in the same step. A final partial batch with fewer rows than ranks is left out (logged)."""

    def __init__(self, n_rows: int, batch_size: int, generator: torch.Generator, rank: int, world_size: int):
        self.n_rows, self.batch_size, self.generator = n_rows, batch_size, generator
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        rows = torch.utils.data.RandomSampler(range(self.n_rows), generator=self.generator)
        for batch in torch.utils.data.BatchSampler(rows, self.batch_size, drop_last=False):
            mine = rank_share(batch, self.rank, self.world_size)
            if mine is not None:
                yield [int(i) for i in mine]

    def __len__(self) -> int:
        return shared_batches(self.n_rows, self.batch_size, self.world_size)


def rank_share(batch: Sequence[T], rank: int, world_size: int) -> list[T] | None:
    """This rank's consecutive slice of a global ``batch``, as even as it allows; None (logged) for a final
    partial batch with fewer rows than ranks, which every rank leaves out. In memory and streamed alike."""
    if len(batch) < world_size:
        log.info("last batch of %d rows left out: fewer rows than %d ranks", len(batch), world_size)
        return None
    return [batch[int(i)] for i in np.array_split(np.arange(len(batch)), world_size)[rank]]


def shared_batches(n_rows: int, batch_size: int, world_size: int) -> int:
    """How many global batches of ``batch_size`` an epoch of ``n_rows`` rows makes (see :func:`rank_share`)."""
    full, rest = divmod(n_rows, batch_size)
    return full + (1 if rest >= world_size else 0)
