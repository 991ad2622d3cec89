"""Second modalities for cross-modal distillation: the teacher sees the original input, the student a view.

A view is applied once, when the data is set up, to every split with a fixed generator: it is part of what
the student's sensor measures, not an augmentation, so validation and test see the same kind of input.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


class DegradedSignal:
    """A coarse, noisy sensor: average-pool the last axis by ``downsample``, then add Gaussian noise.

    On MNIST-1D (length 40) ``downsample=4, noise_std=0.3`` leaves 10 noisy samples per signal: a student
    trained on it alone loses much of the accuracy a clean-signal teacher has, which is what a cross-modal
    teacher can give back.
    """

    def __init__(self, downsample: int = 4, noise_std: float = 0.3, seed: int = 0):
        self.downsample = downsample
        self.noise_std = noise_std
        self.seed = seed

    def __call__(self, x: Tensor, split: str) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + sum(map(ord, split)))
        pooled = F.avg_pool1d(x.flatten(0, -3) if x.dim() > 3 else x, self.downsample)
        return pooled + self.noise_std * torch.randn(pooled.shape, generator=g)
