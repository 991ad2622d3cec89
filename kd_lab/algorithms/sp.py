"""Similarity-Preserving Knowledge Distillation (Tung & Mori, ICCV 2019), https://arxiv.org/abs/1907.09682

Inputs that the teacher finds similar should be similar for the student. For a batch of b samples with
features F (flattened to (b, D), so any feature shape fits, and D may differ between the two networks):
    G = normalize_rows(F F^T)                      (b, b), each row L2-normalized
    loss = ce_weight * CE + sp_weight * ||G_s - G_t||_F^2 / b^2
Recommended (RepDistiller / CRD benchmark, CIFAR-100): sp_weight 3000 (``-b 3000``), ce_weight 1, no
Hinton term (``-a 0``), on the last feature map before pooling (here the deepest stage, tap ``-1``).
The paper uses gamma = 3000 as well, summed over the ends of the network's stages.
"""

import torch.nn.functional as F
from torch import Tensor

from kd_lab.algorithms.base import StepOutputs
from kd_lab.algorithms.taps import OneTapPair
from kd_lab.core.bounds import NonNegative
from kd_lab.core.recorder import TapSpec


def similarity_matrix(features: Tensor) -> Tensor:
    """(b, ...) -> (b, b): the Gram matrix of the flattened features with L2-normalized rows."""
    f = features.flatten(1)
    return F.normalize(f @ f.t(), p=2, dim=1)


def sp_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """||G_s - G_t||_F^2 / b^2 (unweighted)."""
    b = student_features.shape[0]
    diff = similarity_matrix(student_features) - similarity_matrix(teacher_features)
    return diff.pow(2).sum() / b**2


class SP(OneTapPair):
    name = "sp"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        sp_weight: NonNegative = 3000.0,
        student_tap: TapSpec = -1,
        teacher_tap: TapSpec = -1,
    ):
        super().__init__(ce_weight, student_tap, teacher_tap)
        self.sp_weight = sp_weight

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        terms["sp"] = self.sp_weight * sp_loss(*self.pair(out))
        return terms
