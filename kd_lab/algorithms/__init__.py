"""Distillation algorithms, one file each; the config name is ``conf/algorithm/<name>.yaml``."""

from kd_lab.algorithms.adversarial import Adversarial
from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs, cross_entropy
from kd_lab.algorithms.cross_modal import CrossModal
from kd_lab.algorithms.kd import KD, kd_loss
from kd_lab.algorithms.multi_teacher import MultiTeacher
from kd_lab.algorithms.none import NoDistillation

__all__ = [
    "KD",
    "Adversarial",
    "Algorithm",
    "BuildContext",
    "CrossModal",
    "MultiTeacher",
    "NoDistillation",
    "StepOutputs",
    "cross_entropy",
    "kd_loss",
]
