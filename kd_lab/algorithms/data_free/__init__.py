"""Data-free distillation: the student learns from a frozen teacher on synthetic inputs only (docs/data_free.md)."""

from kd_lab.algorithms.data_free.dafl import DAFL
from kd_lab.algorithms.data_free.deep_inversion import DeepInversion
from kd_lab.algorithms.data_free.generator import DataFreeAlgorithm, Generator
from kd_lab.algorithms.data_free.zskt import ZSKT

__all__ = ["DAFL", "ZSKT", "DataFreeAlgorithm", "DeepInversion", "Generator"]
