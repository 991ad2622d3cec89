"""``self``: one network is its own teacher (the survey's self-distillation scheme).

There is no external teacher: either the network's deepest classifier teaches classifiers attached to its
shallower sections, all trained together (``algorithm=byot``, Zhang et al. 2019), or an earlier generation
of the same architecture teaches the next (``algorithm=born_again``, Furlanello et al. 2018), where the
earlier generation is frozen exactly like an offline teacher.
"""

from torch import nn

from kd_lab.schemes.base import Scheme


class SelfDistillation(Scheme):
    name = "self"
    trains_teacher = False
    teacher_source = "none"

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:  # a born-again generation: frozen
        teacher.requires_grad_(False)
        return teacher.eval()
