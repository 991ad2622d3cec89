"""``self``: one network is its own teacher (the survey's self-distillation scheme).

There is no external teacher: the network's deepest classifier teaches classifiers attached to its shallower
sections, all trained together (``algorithm=byot``, Zhang et al. 2019). Born-again generations (Furlanello et
al. 2018) are a chain of offline stages (``chain=born_again``, kd_lab/run/chain.py).
"""

from torch import nn

from kd_lab.schemes.base import Scheme


class SelfDistillation(Scheme):
    name = "self"
    trains_teacher = False
    teacher_source = "none"

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:  # frozen, as an offline teacher
        teacher.requires_grad_(False)
        return teacher.eval()
