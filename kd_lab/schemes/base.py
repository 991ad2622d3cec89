"""A scheme says who learns and where the teacher comes from. The module never branches on a scheme's name:
it reads what the scheme exposes."""

from typing import Literal

from torch import Tensor, nn

from kd_lab.algorithms.base import StepOutputs

# Where a run's teacher comes from:
#   "store":  the teacher config, loaded from teacher.ckpt_path or trained once and cached (offline);
#   "fresh":  the teacher config, newly initialized and trained in the run, with the student (online);
#   "none":   no external teacher: the network (or an earlier generation of it) teaches itself (self).
TeacherSource = Literal["store", "fresh", "none"]


class Scheme:
    name: str = "base"
    trains_teacher: bool = False  # True: teachers are submodules, optimized and checkpointed with the student
    teacher_source: TeacherSource = "store"

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        return teacher

    def teacher_terms(self, out: StepOutputs) -> dict[str, Tensor]:
        """Loss terms of the teachers that learn (their own objective), added to the algorithm's."""
        return {}
