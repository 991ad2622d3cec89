"""Distillation algorithms, one file each; the config name is ``conf/algorithm/<name>.yaml``."""

from kd_lab.algorithms.activation_boundary import ActivationBoundary
from kd_lab.algorithms.adversarial import Adversarial
from kd_lab.algorithms.attention import AttentionTransfer
from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.byot import BYOT
from kd_lab.algorithms.codistillation import Codistillation
from kd_lab.algorithms.crd import CRD
from kd_lab.algorithms.cross_modal import CrossModal
from kd_lab.algorithms.data_free import DAFL, ZSKT, DeepInversion
from kd_lab.algorithms.distilbert import DistilBERT
from kd_lab.algorithms.dkd import DKD
from kd_lab.algorithms.early_exit import EarlyExit
from kd_lab.algorithms.fitnet import FitNet
from kd_lab.algorithms.gkd import GKD
from kd_lab.algorithms.glnn import GLNN
from kd_lab.algorithms.irg import IRG
from kd_lab.algorithms.kd import KD, kd_loss
from kd_lab.algorithms.minilm import MiniLM, MiniLMv2
from kd_lab.algorithms.multi_teacher import MultiTeacher
from kd_lab.algorithms.none import NoDistillation
from kd_lab.algorithms.one import ONE
from kd_lab.algorithms.pkd import PKD
from kd_lab.algorithms.pkt import PKT
from kd_lab.algorithms.rkd import RKD
from kd_lab.algorithms.rocket import RocketLaunching
from kd_lab.algorithms.seq_kd import SeqKD
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.algorithms.sp import SP
from kd_lab.algorithms.tf_kd import TfKDReg, TfKDSelf
from kd_lab.algorithms.tinybert import TinyBERT
from kd_lab.algorithms.token_kd import TokenKD

__all__ = [
    "BYOT",
    "CRD",
    "DAFL",
    "DKD",
    "GKD",
    "GLNN",
    "IRG",
    "KD",
    "ONE",
    "PKD",
    "PKT",
    "RKD",
    "SP",
    "ZSKT",
    "ActivationBoundary",
    "Adversarial",
    "Algorithm",
    "AttentionTransfer",
    "BuildContext",
    "Codistillation",
    "CrossModal",
    "DeepInversion",
    "DistilBERT",
    "EarlyExit",
    "FitNet",
    "MiniLM",
    "MiniLMv2",
    "MultiTeacher",
    "NoDistillation",
    "RocketLaunching",
    "SeqKD",
    "StepOutputs",
    "TfKDReg",
    "TfKDSelf",
    "TinyBERT",
    "TokenKD",
    "kd_loss",
    "kd_term",
]
