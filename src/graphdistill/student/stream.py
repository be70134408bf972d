"""Training batches streamed from a split's Parquet row groups, for a dataset larger than memory
(``TrainConfig.stream``, ``graphdistill train --stream``).

The in-memory path (:class:`graphdistill.student.loader.StudentDataset`) holds every training row, its decoded
image and its object targets, and shuffles them all each epoch. Streaming holds at most ``shuffle_buffer`` rows
(their records: no image), the one row group being read, and the batch being made:

1. the split's row groups are visited in an order shuffled per epoch (:meth:`Dataset.iter_row_groups`: each
   group read from the file when its turn comes, through the dataset's filesystem, local or fsspec);
2. their rows pass through a shuffle buffer of ``shuffle_buffer`` rows: once it is full, each row read takes
   the place of one drawn at random, which is emitted; the rest are emitted in a random order at the end. Every
   row is emitted exactly once an epoch; how far a row can travel from its place in the file grows with the
   buffer (a buffer as large as the split is a full shuffle);
3. the emitted rows make batches of ``batch_size`` (the last one partial); a batch's rows are decoded and
   encoded (:class:`graphdistill.student.loader.RowEncoder`, the in-memory path's own) only then.

Everything random comes from one generator seeded by the epoch's seed, so an epoch's batches are fixed by
(seed, epoch) as the in-memory path's are (a resumed run sees the batches an uninterrupted one would), though not
the same batches: the two shuffles differ. Across ranks (DistributedDataParallel) every rank reads the same rows
in the same order and takes its consecutive slice of each global batch, as
:class:`graphdistill.student.ranks.ShardedBatches` does in memory, decoding only its own rows' images: the ranks
together take the one-process step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from graphdistill.dataset import Dataset, DatasetRow
from graphdistill.student.loader import RowEncoder, collate
from graphdistill.student.ranks import rank_share, shared_batches

# per-batch keys computed from the batch's decoded images (the detector's targets, student.kd), one dict a row
BatchExtra = Callable[[Sequence[np.ndarray]], Sequence[dict[str, Tensor]]]


def shuffled_rows(dataset: Dataset, split: str, buffer_size: int, seed: int) -> Iterator[DatasetRow]:
    """Every row of ``split`` once, shuffled by row group and through a buffer of ``buffer_size`` rows (see the
    module), all draws from ``numpy.random.default_rng(seed)``."""
    if buffer_size < 1:
        raise ValueError(f"shuffle buffer must hold at least 1 row, got {buffer_size}")
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(dataset.row_group_sizes(split)))]
    buffer: list[DatasetRow] = []
    for group in dataset.iter_row_groups(split, order):
        for row in group:
            if len(buffer) < buffer_size:
                buffer.append(row)
                continue
            j = int(rng.integers(buffer_size))
            yield buffer[j]
            buffer[j] = row
    for j in rng.permutation(len(buffer)):
        yield buffer[int(j)]


class StreamedBatches:
    """One epoch's training batches of ``split``, streamed (see the module): this rank's slice of each global
    batch of ``batch_size`` rows, collated. A final partial batch with fewer rows than ranks is left out (logged),
    as in memory. ``extra``: per-batch keys made from the batch's decoded images (the detector's targets). Iterating
    again gives the same batches; ``len`` counts them from the file's footer."""

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        encoder: RowEncoder,
        batch_size: int,
        *,
        shuffle_buffer: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        extra: BatchExtra | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.ds, self.split, self.encoder = dataset, split, encoder
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.rank, self.world_size, self.extra = rank, world_size, extra
        self.n_rows = sum(dataset.row_group_sizes(split))

    def __len__(self) -> int:
        return shared_batches(self.n_rows, self.batch_size, self.world_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        batch: list[DatasetRow] = []
        for row in shuffled_rows(self.ds, self.split, self.shuffle_buffer, self.seed):
            batch.append(row)
            if len(batch) == self.batch_size:
                yield from self._share(batch)
                batch = []
        if batch:
            yield from self._share(batch)

    def _share(self, batch: list[DatasetRow]) -> Iterator[dict[str, Tensor]]:
        """This rank's slice of the global ``batch`` (:func:`ranks.rank_share`), decoded and collated; nothing
        for a last batch with fewer rows than ranks."""
        mine = rank_share(batch, self.rank, self.world_size)
        if mine is None:
            return
        images = [self.ds.image(row) for row in mine]
        extras: Sequence[dict[str, Any]] = self.extra(images) if self.extra is not None else [{}] * len(mine)
        yield collate(
            [self.encoder.encode(row, im, extra=ex) for row, im, ex in zip(mine, images, extras, strict=True)]
        )
