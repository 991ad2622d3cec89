"""Distilling the Knowledge in a Neural Network (Hinton, Vinyals, Dean 2015), https://arxiv.org/abs/1503.02531

    loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes
(their magnitude goes as 1/T^2). Recommended: T = 4 with ce_weight 0.1, kd_weight 0.9 on CIFAR-100
(RepDistiller / CRD benchmark); T = 1, 0.5 / 0.5 on ImageNet (mdistiller, torchdistill).
"""

from torch import Tensor

from kd_lab.algorithms.base import Algorithm, StepOutputs
from kd_lab.algorithms.soft_targets import kd_loss, kd_term
from kd_lab.core.bounds import NonNegative, Positive


class KD(Algorithm):
    name = "kd"
    schemes = frozenset({"offline", "online"})
    task_kinds = frozenset({"classification", "language_modeling", "sequence_classification"})

    def __init__(self, ce_weight: NonNegative = 0.1, kd_weight: NonNegative = 0.9, temperature: Positive = 4.0):
        super().__init__(ce_weight)
        self.kd_weight = kd_weight
        self.temperature = temperature

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        terms["kd"] = self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)
        return terms


__all__ = ["KD", "kd_loss"]
