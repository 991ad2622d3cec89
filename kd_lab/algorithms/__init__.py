"""Distillation algorithms, one file each; the config name is ``conf/algorithm/<name>.yaml``."""

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs, cross_entropy
from kd_lab.algorithms.kd import KD, kd_loss
from kd_lab.algorithms.none import NoDistillation

__all__ = ["KD", "Algorithm", "BuildContext", "NoDistillation", "StepOutputs", "cross_entropy", "kd_loss"]
