"""CIFAR ResNets of He et al. 2016 (section 4.2: three stages of 2n basic blocks, 16/32/64 channels), as
RepDistiller defines them (``models/resnet.py``): resnet8 ... resnet110, and the 4x wider resnet8x4 /
resnet32x4 (32/64/128/256 channels) of the CRD benchmark.

Module names equal RepDistiller's, so its released teacher weights load into these models unchanged.
"""

from collections.abc import Sequence

from torch import Tensor, nn

from kd_lab.models.cifar.layers import GlobalAvgPool


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # not in-place: a recorded feature must not change under a later layer
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def make_stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
    """n blocks; the first one changes the resolution (stride) and the width."""
    return nn.Sequential(BasicBlock(in_planes, planes, stride), *(BasicBlock(planes, planes) for _ in range(n - 1)))


class CifarResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, ``layer1..3`` (strides 1, 2, 2), global average pool, ``fc``.

    Args:
        depth: 6n + 2 (n basic blocks per stage).
        widths: channels of the stem and of the three stages.
    """

    def __init__(self, depth: int, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks has depth 6n + 2 (20, 32, 56, ...), not {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = make_stage(widths[2], widths[3], n, stride=2)
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # the stages' outputs (after the blocks' ReLU) are RepDistiller's feat[1:4]; the stem is not a stage
        self.stage_taps = ["layer1", "layer2", "layer3"]
        self.embedding_tap = "avgpool"

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, num_classes=num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, num_classes=num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, num_classes=num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, num_classes=num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, num_classes=num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, num_classes=num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, num_classes=num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, (32, 64, 128, 256), num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, (32, 64, 128, 256), num_classes=num_classes)
