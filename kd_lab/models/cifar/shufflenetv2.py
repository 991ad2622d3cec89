"""ShuffleNet V2 (Ma et al., ECCV 2018, arXiv:1807.11164) for 32x32 inputs as RepDistiller defines it
(``models/ShuffleNetv2.py``, after kuangliu/pytorch-cifar): a 1x1 stem with 24 channels at full resolution,
three stages (a down-sampling unit + 3/7/3 basic units) at 116/232/464 channels, a 1x1 conv to 1024.

Module names equal RepDistiller's, so its weights load into these models unchanged.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.models.cifar.layers import ChannelShuffle, GlobalAvgPool


class SplitHalves(nn.Module):
    """The basic unit's channel split (no parameters; a module so the reference's names line up)."""

    def __init__(self, ratio: float = 0.5):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.shape[1] * self.ratio)
        return x[:, :c], x[:, c:]


class BasicUnit(nn.Module):
    """Half the channels pass through; the other half goes 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.split = SplitHalves(0.5)
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        kept, branch = self.split(x)
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(branch)))))
        return self.shuffle(torch.cat([kept, F.relu(self.bn3(self.conv3(branch)))], 1))


class DownUnit(nn.Module):
    """Two stride-2 branches of out_channels / 2 each: depthwise-BN, 1x1-BN-ReLU | 1x1-BN-ReLU, depthwise-BN,
    1x1-BN-ReLU; concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return self.shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages, in_channels = [], 24
        for channels, n in zip(out_channels[:3], num_blocks, strict=True):
            stages.append(nn.Sequential(DownUnit(in_channels, channels), *(BasicUnit(channels) for _ in range(n))))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.stage_taps = ["layer1", "layer2", "layer3"]  # RepDistiller's feat[1:4]
        self.embedding_tap = "avgpool"

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(F.relu(self.bn2(self.conv2(x)))).flatten(1))


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:  # the benchmark's name
    return ShuffleNetV2(num_classes=num_classes)
