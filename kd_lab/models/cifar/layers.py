"""Parameter-free layers shared by the CIFAR zoo."""

from torch import Tensor, nn


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle (Zhang et al. 2018): interleave the channels of ``groups`` groups so the
    next grouped convolution mixes information across them."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes, ``(B, C, H, W) -> (B, C, 1, 1)``: the models' embedding tap. A plain mean
    rather than ``AdaptiveAvgPool2d``, whose CUDA backward has no deterministic implementation."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3), keepdim=True)
