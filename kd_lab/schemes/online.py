"""``online``: teacher and student learn together, end to end (the survey's online scheme).

The teacher starts from scratch (or from ``teacher.ckpt_path``, a warm start) and is trained in the same
steps as the student, on its own cross-entropy plus, optionally, a distillation term from the student
(deep mutual learning, Zhang et al. 2018, https://arxiv.org/abs/1706.00384, makes that term as strong as
the student's). The algorithm sees detached teacher outputs, so its terms only teach the student; the
teacher's objective is ``teacher_terms`` below. A cohort of peers that teach each other is
``algorithm=codistillation``, which writes every peer's terms itself.

Defaults: ``teacher_ce_weight`` 1 (the teacher learns from the labels like a vanilla model),
``teacher_kd_weight`` 0 (no feedback from the student; DML uses 1 with temperature 1).
"""

from torch import Tensor, nn

from kd_lab.algorithms.base import StepOutputs
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.errors import KDLabError
from kd_lab.schemes.base import Scheme


class Online(Scheme):
    name = "online"
    trains_teacher = True
    teacher_source = "fresh"

    def __init__(self, teacher_ce_weight: float = 1.0, teacher_kd_weight: float = 0.0, temperature: float = 1.0):
        if teacher_ce_weight < 0 or teacher_kd_weight < 0 or temperature <= 0:
            raise KDLabError(
                "scheme=online needs teacher_ce_weight >= 0, teacher_kd_weight >= 0 and temperature > 0; got "
                f"{teacher_ce_weight}, {teacher_kd_weight}, {temperature}."
            )
        self.teacher_ce_weight, self.teacher_kd_weight, self.temperature = (
            teacher_ce_weight,
            teacher_kd_weight,
            temperature,
        )

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        return teacher.requires_grad_(True).train()

    def teacher_terms(self, out: StepOutputs) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for i, logits in enumerate(out.live_teacher_logits):
            name = "teacher" if i == 0 else f"teacher{i}"
            if self.teacher_ce_weight:
                terms[f"{name}_ce"] = self.teacher_ce_weight * out.label_loss(logits)
            if self.teacher_kd_weight:
                student = out.logits.detach()
                terms[f"{name}_kd"] = self.teacher_kd_weight * kd_term(out, logits, student, self.temperature)
        return terms
