"""VGG with batch norm for 32x32 inputs (Simonyan & Zisserman 2015, fully connected layers replaced by global
average pooling and one linear layer), as RepDistiller defines them (``models/vgg.py``, the ``vgg*_bn``
variants its model table calls vgg8 ... vgg19). Five blocks of conv3x3(+bias)-BN-ReLU at 64/128/256/512/512
channels, max-pooled between blocks 0-3; block 4 runs at 4x4 (the reference pools before it only for 64x64
inputs).

Module names equal RepDistiller's, so its released teacher weights load into these models unchanged.
"""

from collections.abc import Sequence

from torch import Tensor, nn

from kd_lab.models.cifar.layers import GlobalAvgPool

# conv widths per block (the reference's configs "S", "A", "B", "D", "E")
BLOCKS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def make_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)  # the parameter layers sit at the reference's indices (0, 1, 3, 4, ...)


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int = 100):
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"VGG depth {depth} is not one of {sorted(BLOCKS)}")
        blocks, in_channels = [], 3
        for widths in BLOCKS[depth]:
            blocks.append(make_block(in_channels, widths))
            in_channels = widths[-1]
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = GlobalAvgPool()
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        # RepDistiller's feat[1:5] (after ReLU); block0 is the stem
        self.stage_taps = ["block1", "block2", "block3", "block4"]
        self.embedding_tap = "pool4"

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2]
        x = self.pool2(self.block2(self.pool1(self.block1(self.pool0(self.block0(x))))))
        x = self.block3(x)
        if size == 64:  # the reference's rule: 64x64 inputs (Tiny-ImageNet) are pooled once more
            x = self.pool3(x)
        return self.classifier(self.pool4(self.block4(x)).flatten(1))


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(8, num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(11, num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(13, num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(16, num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(19, num_classes)
