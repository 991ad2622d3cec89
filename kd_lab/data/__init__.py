"""Data modules: in-memory tensors served as dict batches (see ``base.py``)."""

from kd_lab.data.augment import SignalAugment
from kd_lab.data.base import TensorDataModule
from kd_lab.data.cifar import CIFARDataModule
from kd_lab.data.digits import DigitsDataModule
from kd_lab.data.fake import FakeDataModule
from kd_lab.data.graph import CSBMDataModule
from kd_lab.data.image_augment import ImageAugment
from kd_lab.data.mnist1d import MNIST1dDataModule

__all__ = [
    "CIFARDataModule",
    "CSBMDataModule",
    "DigitsDataModule",
    "FakeDataModule",
    "ImageAugment",
    "MNIST1dDataModule",
    "SignalAugment",
    "TensorDataModule",
]
