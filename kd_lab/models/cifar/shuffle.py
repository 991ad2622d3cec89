"""Channel shuffle (ShuffleNet, Zhang et al. 2018): interleave the channels of ``groups`` groups so the next
grouped convolution mixes information across them."""

from torch import Tensor, nn


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
