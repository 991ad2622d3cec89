"""Distillation algorithms, one file each; the config name is ``conf/algorithm/<name>.yaml``."""

from kd_lab.algorithms.adversarial import Adversarial
from kd_lab.algorithms.attention import AttentionTransfer
from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.byot import BYOT
from kd_lab.algorithms.codistillation import Codistillation
from kd_lab.algorithms.crd import CRD
from kd_lab.algorithms.cross_modal import CrossModal
from kd_lab.algorithms.dkd import DKD
from kd_lab.algorithms.fitnet import FitNet
from kd_lab.algorithms.kd import KD, kd_loss
from kd_lab.algorithms.multi_teacher import MultiTeacher
from kd_lab.algorithms.none import NoDistillation
from kd_lab.algorithms.pkt import PKT
from kd_lab.algorithms.rkd import RKD
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.algorithms.sp import SP
from kd_lab.algorithms.token_kd import TokenKD

__all__ = [
    "BYOT",
    "CRD",
    "DKD",
    "KD",
    "PKT",
    "RKD",
    "SP",
    "Adversarial",
    "Algorithm",
    "AttentionTransfer",
    "BuildContext",
    "Codistillation",
    "CrossModal",
    "FitNet",
    "MultiTeacher",
    "NoDistillation",
    "StepOutputs",
    "TokenKD",
    "kd_loss",
    "kd_term",
]
