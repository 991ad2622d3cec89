"""A scheme says who learns and how the teacher is updated. The module never branches on a scheme's name:
it reads what the scheme exposes."""

from torch import nn


class Scheme:
    name: str = "base"
    trains_teacher: bool = False  # True: the teacher is a submodule, optimized and checkpointed with the student

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        return teacher
