"""Batches sliced from in-memory tensors.

Small data sets (MNIST-1D, digits) fit in memory many times over; a DataLoader over a TensorDataset costs
~30x more per epoch than slicing pre-loaded tensors (STACK-NOTES), so we slice: one permutation per epoch,
one gather per batch, no per-sample Python.

The order and the augmentation draws of epoch ``e`` are a function of ``(seed, e)`` only, so a resumed run
sees the same batches as an uninterrupted one. Under DDP each rank takes an interleaved shard of the same
permutation.
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

Batch = dict[str, Tensor]
Transform = Callable[[Batch, torch.Generator], Batch]


class TensorBatches:
    def __init__(
        self,
        tensors: Batch,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        transform: Transform | None = None,
        epoch_fn: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tensors = tensors
        self.num_samples = len(next(iter(tensors.values())))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.transform = transform
        self.epoch_fn = epoch_fn
        self.rank = rank
        self.world_size = world_size

    def _shard_size(self) -> int:
        if self.drop_last:  # every rank gets the same number of samples (training must stay in lockstep)
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch_fn())
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        order = order[self.rank :: self.world_size][: self._shard_size()]
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            batch = {key: t[index] for key, t in self.tensors.items()}
            yield self.transform(batch, generator) if self.transform else batch
