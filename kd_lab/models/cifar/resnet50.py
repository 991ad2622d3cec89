"""ResNet-50 for 32x32 inputs as RepDistiller defines it (``models/resnetv2.py``, after kuangliu/pytorch-cifar):
He et al. 2016's bottleneck network (3/4/6/3 blocks, 64-512 channels x4) with a 3x3 stride-1 stem and no max
pool, so the four stages run at 32, 16, 8 and 4 pixels. The CRD benchmark's ResNet50 teacher (23.7M).

Module names equal RepDistiller's, so its released teacher weights load into these models unchanged.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.models.cifar.layers import GlobalAvgPool


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class BottleneckResNet(nn.Module):
    def __init__(self, num_blocks: Sequence[int] = (3, 4, 6, 3), num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.stage_taps = ["layer1", "layer2", "layer3", "layer4"]  # RepDistiller's feat[1:5]
        self.embedding_tap = "avgpool"

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))


def ResNet50(num_classes: int = 100) -> BottleneckResNet:  # the benchmark's name
    return BottleneckResNet((3, 4, 6, 3), num_classes)
