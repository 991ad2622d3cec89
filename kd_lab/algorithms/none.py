"""``none``: the vanilla student, cross-entropy on the labels only. The baseline every method is compared to."""

from torch import Tensor

from kd_lab.algorithms.base import Algorithm, StepOutputs


class NoDistillation(Algorithm):
    name = "none"
    schemes = frozenset({"offline"})
    task_kinds = frozenset({"classification", "language_modeling", "sequence_classification"})
    needs_teacher = False

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        return self.ce_term(out)
