"""Batches sliced from in-memory tensors, and the same batches from DataLoader workers for large data.

Small data sets (MNIST-1D, digits, CIFAR) fit in memory many times over; a DataLoader over a TensorDataset
costs ~30x more per epoch than slicing pre-loaded tensors (MNIST-1D, docs/performance.md), so we slice: one
permutation per epoch, one gather per batch, no per-sample Python. On an accelerator the tensors can live on the device
itself (``TensorDataModule``'s ``serve`` rule): then a batch is a gather on the device and never crosses PCIe.
Data too large for that are served by ``loader_batches``: the same batches, gathered (and transformed) in
DataLoader worker processes into pinned memory, copied to the device without blocking.

The order and the augmentation draws of epoch ``e`` are a function of ``(seed, e)`` only, so a resumed run
sees the same batches as an uninterrupted one. Under DDP each rank takes an interleaved shard of the same
permutation. (Workers draw each batch's augmentation from a generator of its own, seeded by ``(seed, e, i)``:
the order is the same as when slicing, the augmentation draws are not.)
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

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

    def _order(self, epoch: int, generator: torch.Generator) -> Tensor:
        """This rank's sample order in ``epoch``, on the tensors' device."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        order = order[self.rank :: self.world_size][: self._shard_size()]
        return order.to(next(iter(self.tensors.values())).device)  # once per epoch, not once per batch

    def epoch_seed(self, epoch: int) -> int:
        """The seed of ``epoch``'s order and augmentation (worker batches derive theirs from it)."""
        return self.seed * 100_003 + epoch

    def _gather(self, order: Tensor, i: int) -> Batch:
        index = order[i * self.batch_size : (i + 1) * self.batch_size]
        return {key: t[index] for key, t in self.tensors.items()}

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch_fn()
        generator = torch.Generator().manual_seed(self.epoch_seed(epoch))
        order = self._order(epoch, generator)
        for i in range(len(self)):
            batch = self._gather(order, i)
            yield self.transform(batch, generator) if self.transform else batch


class _EpochSampler(Sampler):
    """Keys ``(epoch, i)`` of one epoch's batches; the epoch is read in the main process, so workers that
    persist across epochs still know which permutation to use."""

    def __init__(self, batches: TensorBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.batches.epoch_fn()
        return iter([(epoch, i) for i in range(len(self.batches))])


class _BatchesDataset(Dataset):
    """Item ``(epoch, i)``: batch ``i`` of ``epoch``, gathered and transformed in a worker."""

    def __init__(self, batches: TensorBatches):
        self.batches = batches
        self._epoch, self._order = -1, torch.empty(0)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        epoch, i = key
        b = self.batches
        if epoch != self._epoch:  # the permutation is drawn from the same generator seed as TensorBatches'
            self._order = b._order(epoch, torch.Generator().manual_seed(b.epoch_seed(epoch)))
            self._epoch = epoch
        batch = b._gather(self._order, i)
        if b.transform is None:
            return batch
        generator = torch.Generator().manual_seed(b.epoch_seed(epoch) * 1_000_003 + i)
        return b.transform(batch, generator)


def loader_batches(
    batches: TensorBatches, num_workers: int = 2, pin_memory: bool = True, persistent_workers: bool = True
) -> DataLoader:
    """``batches``' batches (same sizes, same per-epoch order, same DDP shard) from DataLoader workers."""
    return DataLoader(
        _BatchesDataset(batches),
        sampler=_EpochSampler(batches),
        batch_size=None,  # every item is already a batch
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
