"""MobileNetV2 (Sandler et al., CVPR 2018) for 32x32 inputs as RepDistiller defines it (``models/mobilenetv2.py``,
from "Knowledge Distillation via Route Constrained Optimization"). The CRD benchmark's "MobileNetV2" student is
RepDistiller's ``mobile_half``: expansion 6, width multiplier 0.5 (0.81M parameters for 100 classes).

Differences from the ImageNet network, kept for fidelity: every inverted residual has its 1x1 expansion conv,
also at expansion 1; the stem has stride 2 and the strides are 1, 1, 2, 2, 1, 2, 1, so a 32x32 input ends at
2x2; the last 1x1 conv has 1280 channels for any width <= 1.

Module names equal RepDistiller's, so its weights load into these models unchanged.
"""

from torch import Tensor, nn

from kd_lab.models.cifar.layers import GlobalAvgPool

# (expansion, channels, blocks, first stride) per stage; expansion None = the network's ``expansion``
STAGES = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
          (None, 160, 3, 2), (None, 320, 1, 1)]  # fmt: skip


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN (linear); plus the input when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            *conv_bn_relu(in_channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, expansion: int = 6, width_mult: float = 1.0, num_classes: int = 100):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in STAGES:
            out_channels = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t or expansion))
                channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last_channels, 1)
        self.avgpool = GlobalAvgPool()
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        # RepDistiller's feat[1:5]: the ends of the stages at 16x16 (24 ch), 8x8, 4x4 and 2x2
        self.stage_taps = ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
        self.embedding_tap = "avgpool"

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """The CRD benchmark's "MobileNetV2": expansion 6, width 0.5."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
