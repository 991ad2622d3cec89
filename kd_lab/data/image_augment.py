"""Random crop with zero padding and horizontal flip for image batches ``(B, C, H, W)``: the CIFAR recipe of
He et al. 2016 that RepDistiller uses (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``).

The work is split in two so that it runs where the batch is: ``draw`` takes every random number from the
loader's generator on the CPU (so the draws are a function of (seed, epoch) on any device, as for
``SignalAugment``), and ``apply`` moves pixels with one gather on the batch's own device (the GPU when there
is one; see ``CIFARDataModule.on_after_batch_transfer``). Calling the object does both, like any transform.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from kd_lab.data.batches import Batch

CROP_KEY, FLIP_KEY = "augment_crop", "augment_flip"  # the draws, while they travel with a batch


class ImageAugment:
    """Args:
    padding: pixels added on every side before a random crop back to the input size (0: no crop).
    flip: mirror each image left-right with probability 1/2.
    fill: the border's value per channel (or one for all); None means 0 here. The data are normalized, so a
        black border in pixel space (what RepDistiller pads with) is ``-mean / std``: ``CIFARDataModule``
        turns ``fill=None`` into that.
    """

    views_from_generator = True  # every draw comes from the loader's generator (kd_lab.run.view_store)

    def __init__(self, padding: int = 4, flip: bool = True, fill: float | Sequence[float] | None = None):
        self.padding = padding
        self.flip = flip
        self.fill = fill

    def _fill_on(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The padding value as a (C or 1, 1, 1) tensor, made once per device and dtype (no copy per batch)."""
        cache = self.__dict__.setdefault("_fills", {})
        if (device, dtype) not in cache:
            value = 0.0 if self.fill is None else self.fill
            cache[(device, dtype)] = torch.as_tensor(value, dtype=dtype, device=device).reshape(-1, 1, 1)
        return cache[(device, dtype)]

    def draw(self, n: int, g: torch.Generator) -> dict[str, Tensor]:
        """Crop offsets in [0, 2 * padding] (row, column) and flip flags for ``n`` images."""
        return {
            CROP_KEY: torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g),
            FLIP_KEY: torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool),
        }

    def apply(self, x: Tensor, draws: dict[str, Tensor]) -> Tensor:
        n, c, h, w = x.shape
        p, device = self.padding, x.device
        fill = self._fill_on(device, x.dtype)
        padded = fill.expand(c, h + 2 * p, w + 2 * p).repeat(n, 1, 1, 1)
        padded[:, :, p : p + h, p : p + w] = x
        crop, flip = draws[CROP_KEY].to(device, non_blocking=True), draws[FLIP_KEY].to(device, non_blocking=True)
        cols = torch.arange(w, device=device)
        cols = torch.where(flip[:, None], w - 1 - cols, cols) + crop[:, 1:]  # (n, w): read column, mirrored or not
        rows = torch.arange(h, device=device) + crop[:, :1]  # (n, h)
        samples = torch.arange(n, device=device)[:, None, None, None]
        channels = torch.arange(c, device=device)[None, :, None, None]
        return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]

    def __call__(self, batch: Batch, g: torch.Generator) -> Batch:
        return {**batch, "input": self.apply(batch["input"], self.draw(len(batch["input"]), g))}


class DrawOnly:
    """The loader half of an on-device augmentation: attaches the draws to the batch; ``finish`` applies them
    once the batch is on its device."""

    views_from_generator = True  # every draw comes from the loader's generator (kd_lab.run.view_store)

    def __init__(self, augment: ImageAugment):
        self.augment = augment

    def __call__(self, batch: Batch, g: torch.Generator) -> Batch:
        return {**batch, **self.augment.draw(len(batch["input"]), g)}

    def finish(self, batch: Batch) -> Batch:
        if CROP_KEY not in batch:  # evaluation batches are not augmented
            return batch
        batch = dict(batch)
        draws = {CROP_KEY: batch.pop(CROP_KEY), FLIP_KEY: batch.pop(FLIP_KEY)}
        return {**batch, "input": self.augment.apply(batch["input"], draws)}
