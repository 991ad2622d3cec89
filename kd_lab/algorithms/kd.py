"""Distilling the Knowledge in a Neural Network (Hinton, Vinyals, Dean 2015), https://arxiv.org/abs/1503.02531

    loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes
(their magnitude goes as 1/T^2). Recommended: T = 4 with ce_weight 0.1, kd_weight 0.9 on CIFAR-100
(RepDistiller / CRD benchmark); T = 1, 0.5 / 0.5 on ImageNet (mdistiller, torchdistill).
"""

import torch.nn.functional as F
from torch import Tensor

from kd_lab.algorithms.base import Algorithm, StepOutputs
from kd_lab.errors import KDLabError


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(p_t || p_s) at temperature T, averaged over the batch (``batchmean``: the true KL)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class KD(Algorithm):
    name = "kd"

    def __init__(self, ce_weight: float = 0.1, kd_weight: float = 0.9, temperature: float = 4.0):
        super().__init__(ce_weight)
        if temperature <= 0:
            raise KDLabError(f"algorithm.temperature must be > 0, got {temperature}; 4 is the usual value.")
        self.kd_weight = kd_weight
        self.temperature = temperature

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        terms["kd"] = self.kd_weight * kd_loss(out.logits, out.teacher_logits, self.temperature)
        return terms
