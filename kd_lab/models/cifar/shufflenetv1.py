"""ShuffleNet V1 (Zhang et al., CVPR 2018, arXiv:1707.01083) for 32x32 inputs as RepDistiller defines it
(``models/ShuffleNetv1.py``, after kuangliu/pytorch-cifar): a 1x1 stem with 24 channels at full resolution,
three stages of 4/8/4 bottlenecks at 240/480/960 channels with 3 groups, each stage halving the resolution.

Module names equal RepDistiller's, so its weights load into these models unchanged.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.models.cifar.layers import ChannelShuffle, GlobalAvgPool


class ShuffleBottleneck(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1. Stride 2 concatenates a 3x3 average-pooled
    input (so the block adds ``out_planes`` channels to it); stride 1 adds the input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups  # the stem's 24 channels are too few to group
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages, in_planes = [], 24
        for planes, n in zip(out_planes, num_blocks, strict=True):
            # the first block concatenates its input, so it produces planes - in_planes new channels
            blocks = [ShuffleBottleneck(in_planes, planes - in_planes, 2, groups)]
            blocks += [ShuffleBottleneck(planes, planes, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(in_planes, num_classes)
        self.stage_taps = ["layer1", "layer2", "layer3"]  # RepDistiller's feat[1:4]
        self.embedding_tap = "avgpool"

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:  # the benchmark's name
    return ShuffleNetV1(num_classes=num_classes)
