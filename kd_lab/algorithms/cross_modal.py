"""Cross Modal Distillation for Supervision Transfer (Gupta, Hoffman, Malik, CVPR 2016),
https://arxiv.org/abs/1507.00448 — here with Hinton soft targets on top.

Teacher and student see different modalities of the same sample (the data module yields ``input`` for the
student and ``teacher_input`` for the teacher, e.g. ``data=mnist1d_xmodal``: a clean signal vs a coarse,
noisy sensor). The teacher, trained on its own modality, supervises the student through
  * its soft targets: ``kd_weight * T^2 * KL(p_t^T || p_s^T)`` (Hinton et al. 2015), and
  * its representation: ``hint_weight * MSE(connector(e_s), e_t)`` between the penultimate embeddings, the
    connector a linear map built from the probed widths (Gupta et al. match mid-level features with L2).
Recommended: T = 4, ce 1.0 / kd 1.0 (labels are reliable, the student's input is not); hint 1.0.
"""

import torch.nn.functional as F
from torch import Tensor

from kd_lab.algorithms.base import BuildContext, StepOutputs
from kd_lab.algorithms.embedding import linear_connector
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.algorithms.taps import OneTapPair
from kd_lab.core.bounds import NonNegative, Positive
from kd_lab.core.recorder import TapSpec
from kd_lab.errors import KDLabError


class CrossModal(OneTapPair):
    name = "cross_modal"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        kd_weight: NonNegative = 1.0,
        temperature: Positive = 4.0,
        hint_weight: NonNegative = 1.0,
        student_tap: TapSpec = "embedding",
        teacher_tap: TapSpec = "embedding",
    ):
        super().__init__(ce_weight, student_tap, teacher_tap)
        self.kd_weight, self.temperature, self.hint_weight = kd_weight, temperature, hint_weight

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        if not context.paired_inputs:
            raise KDLabError(
                "algorithm=cross_modal needs paired data, where the teacher reads its own modality "
                "('teacher_input'): use a cross-modal data config such as data=mnist1d_xmodal, or pick "
                "algorithm=kd for single-modality data."
            )
        self.connector = linear_connector(student_shapes[self.paths[0]], teacher_shapes[self.paths[1]])

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        terms["kd"] = self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)
        if self.hint_weight:
            e_s, e_t = self.pair(out)
            terms["hint"] = self.hint_weight * F.mse_loss(self.connector(e_s), e_t)
        return terms
