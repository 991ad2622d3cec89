"""The CIFAR architecture zoo of RepDistiller (Tian et al., CRD, ICLR 2020): the models of its CIFAR-100
benchmark, with RepDistiller's module names (its checkpoints load unchanged) and its parameter counts
(``tests/test_cifar_models.py``). Each factory takes ``num_classes`` and is a Hydra ``_target_``:
``kd_lab.models.cifar.resnet32x4``. Every model declares ``stage_taps`` (the stage outputs RepDistiller's
feature methods use, shallow to deep) and ``embedding_tap`` (the pooled features before the classifier)."""

from kd_lab.models.cifar.mobilenetv2 import MobileNetV2, mobile_half
from kd_lab.models.cifar.resnet import (
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from kd_lab.models.cifar.resnet50 import BottleneckResNet, ResNet50
from kd_lab.models.cifar.shufflenetv1 import ShuffleNetV1, ShuffleV1
from kd_lab.models.cifar.shufflenetv2 import ShuffleNetV2, ShuffleV2
from kd_lab.models.cifar.vgg import VGG, vgg8, vgg11, vgg13, vgg16, vgg19
from kd_lab.models.cifar.wrn import WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

# RepDistiller's model names (its ``models/__init__.py:model_dict``; "MobileNetV2" is its ``mobile_half``)
ZOO = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "ResNet50": ResNet50,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
}

__all__ = [
    "VGG",
    "ZOO",
    "BottleneckResNet",
    "CifarResNet",
    "MobileNetV2",
    "ResNet50",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "ShuffleV1",
    "ShuffleV2",
    "WideResNet",
    "mobile_half",
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]
