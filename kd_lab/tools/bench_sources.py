"""The reference way of feeding a CIFAR model, for ``kd-lab-bench``'s ``a_dataloader`` variant: a per-sample
``Dataset`` (pad-4 random crop and horizontal flip per image, as torchvision's ``RandomCrop(32, padding=4)``
and ``RandomHorizontalFlip`` do in RepDistiller) behind a ``DataLoader`` with worker processes and pinned
memory, each batch copied to the device in the training loop."""

import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class PerSampleImages(Dataset):
    def __init__(self, x: Tensor, y: Tensor, padding: int = 4, flip: bool = True):
        self.x, self.y = x, y
        self.padding, self.flip = padding, flip

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.x[i]
        if self.padding:
            h, w, p = x.shape[-2], x.shape[-1], self.padding
            row, col = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p))[:, row : row + h, col : col + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.y[i]


def per_sample_loader(run, datamodule, device: torch.device) -> Callable[[int], Iterator[dict[str, Tensor]]]:
    """epoch -> batches on ``device``, from the training split on the host."""
    train = datamodule.splits["train"]
    augment = datamodule.augment is not None
    dataset = PerSampleImages(train["input"], train["target"], padding=4 if augment else 0, flip=augment)
    workers = min(8, os.cpu_count() or 1)
    loader = DataLoader(
        dataset,
        batch_size=run.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )

    def batches(epoch: int) -> Iterator[dict[str, Tensor]]:
        for x, y in loader:
            yield {"input": x.to(device, non_blocking=True), "target": y.to(device, non_blocking=True)}

    return batches
