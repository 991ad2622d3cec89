"""Wide residual networks (Zagoruyko & Komodakis, BMVC 2016, arXiv:1605.07146) for CIFAR, as RepDistiller
defines them (``models/wrn.py``): WRN-d-k has three stages of (d - 4) / 6 pre-activation blocks with
16k/32k/64k channels and no dropout. wrn_40_2 is the CRD benchmark's teacher, wrn_16_2/wrn_40_1 its students.

Module names equal RepDistiller's, so its released teacher weights load into these models unchanged.
"""

from torch import Tensor, nn

from kd_lab.models.cifar.layers import GlobalAvgPool


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the input. When the width changes, the shortcut is a 1x1 conv of the
    *activated* input (as in the reference code), otherwise the raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.convShortcut = None  # the reference's name, kept for its checkpoints
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideStage(nn.Module):
    """n blocks in ``layer`` (the reference's ``NetworkBlock``); the first one changes width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *(PreActBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """conv3x3 stem, ``block1..3`` (strides 1, 2, 2), BN-ReLU, global average pool, ``fc``."""

    def __init__(self, depth: int, widen_factor: int = 1, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n + 4 (16, 28, 40, ...), not {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], stride=1)
        self.block2 = WideStage(n, widths[1], widths[2], stride=2)
        self.block3 = WideStage(n, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        # RepDistiller's feat[1:4]: the stages' raw (pre-activation) outputs
        self.stage_taps = ["block1", "block2", "block3"]
        self.embedding_tap = "avgpool"

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.avgpool(self.relu(self.bn1(x))).flatten(1))


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
