"""Relational Knowledge Distillation (Park, Kim, Lu, Cho, CVPR 2019), https://arxiv.org/abs/1904.05068

The student matches the geometry of the teacher's embedding space, not the embeddings themselves, so the two
widths may differ. On the penultimate features e (flattened to (b, D)) of a batch:
  * distance: psi_D(i, j) = ||e_i - e_j|| / mu, mu the mean distance over the pairs i != j;
    loss_D = mean over all (i, j) of smooth_l1(psi_D^s, psi_D^t);
  * angle: psi_A(i, j, k) = <normalize(e_j - e_i), normalize(e_k - e_i)>, the cosine of the angle at e_i;
    loss_A = mean over all (i, j, k) of smooth_l1(psi_A^s, psi_A^t).
    loss = ce_weight * CE + rkd_weight * (distance_weight * loss_D + angle_weight * loss_A)
Recommended: distance_weight 25, angle_weight 50 (the paper's lambda_D, lambda_A); rkd_weight 1 and ce 1 with no
Hinton term (RepDistiller / CRD benchmark, ``-a 0 -b 1``), on the embedding.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lab.algorithms.base import StepOutputs
from kd_lab.algorithms.taps import OneTapPair
from kd_lab.core.bounds import NonNegative
from kd_lab.core.recorder import TapSpec


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(b, D) -> (b, b) Euclidean distances, exactly 0 on the diagonal (squared distances are clamped at
    ``eps`` before the square root, so the gradient stays finite for coincident points)."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def rkd_distance_potentials(e: Tensor) -> Tensor:
    """Pairwise distances normalized by their mean over the pairs i != j."""
    d = pairwise_distances(e)
    b = len(e)
    return d / (d.sum() / (b * (b - 1)))


def rkd_angle_potentials(e: Tensor) -> Tensor:
    """(b, b, b): [i, j, k] = cosine of the angle at e_i of the triangle (e_i, e_j, e_k); 0 when j or k is i."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [i, j] = unit vector from e_i to e_j
    return diff @ diff.transpose(1, 2)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    return F.smooth_l1_loss(rkd_distance_potentials(student), rkd_distance_potentials(teacher))


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    return F.smooth_l1_loss(rkd_angle_potentials(student), rkd_angle_potentials(teacher))


class RKD(OneTapPair):
    name = "rkd"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        rkd_weight: NonNegative = 1.0,
        distance_weight: NonNegative = 25.0,
        angle_weight: NonNegative = 50.0,
        student_tap: TapSpec = "embedding",
        teacher_tap: TapSpec = "embedding",
    ):
        super().__init__(ce_weight, student_tap, teacher_tap)
        self.rkd_weight, self.distance_weight, self.angle_weight = rkd_weight, distance_weight, angle_weight

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        e_s, e_t = self.pair(out)
        if self.distance_weight:
            terms["rkd_distance"] = self.rkd_weight * self.distance_weight * rkd_distance_loss(e_s, e_t)
        if self.angle_weight:
            terms["rkd_angle"] = self.rkd_weight * self.angle_weight * rkd_angle_loss(e_s, e_t)
        return terms
