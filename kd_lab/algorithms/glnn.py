"""Graph-less Neural Networks: Teaching Old MLPs New Tricks via Distillation (Zhang, Liu, Sun, Shah, ICLR 2022),
https://arxiv.org/abs/2110.08727

A GNN teacher's soft labels of every node of the training graph teach an MLP that reads node features only:

    loss = lam * CE(s, y)                                     over the labelled nodes
         + (1 - lam) * T^2 * KL(softmax(t / T) || softmax(s / T))   over every node

The data (``kd_lab.data.graph``) gives every node of the training graph as a training sample; unlabelled nodes
have target -100, so the CE sees the labelled ones only and the KL sees all, as in GLNN. At test time the
student needs no graph: that is the inference speed-up (scripts/bench_glnn.py).
Recommended (the reference code, snap-research/graphless-neural-networks): lam = 0 (its default, used by its
published runs), T = 1 (KL between the plain softmax outputs).
"""

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, StepOutputs
from kd_lab.algorithms.soft_targets import kd_loss
from kd_lab.core.bounds import Positive, UnitInterval
from kd_lab.data.graph import IGNORE
from kd_lab.errors import KDLabError


def labelled_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean CE over the nodes whose target is not ``IGNORE``; zero (with a gradient path) when there are none."""
    labelled = target != IGNORE
    if not labelled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], target[labelled])


def glnn_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, lam: float, temperature: float = 1.0
) -> dict[str, Tensor]:
    """GLNN's two terms, already weighted: ``ce`` on the labelled nodes, ``kd`` on every node."""
    terms = {"kd": (1 - lam) * kd_loss(student_logits, teacher_logits, temperature)}
    if lam:
        terms["ce"] = lam * labelled_cross_entropy(student_logits, target)
    return terms


class GLNN(Algorithm):
    name = "glnn"
    schemes = frozenset({"offline"})  # the GNN teacher is trained first (the teacher store), then frozen
    task_kinds = frozenset({"classification"})

    def __init__(self, lam: UnitInterval = 0.0, temperature: Positive = 1.0):
        super().__init__(ce_weight=lam)
        self.lam, self.temperature = lam, temperature

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None or not hasattr(teacher, "bind_data"):
            name = type(teacher).__name__ if teacher is not None else "no teacher"
            raise KDLabError(
                f"algorithm=glnn distills a graph neural network into an MLP, but the teacher is {name}: use a "
                "GNN teacher on graph data (teacher=gcn data=csbm), or algorithm=kd for a teacher that reads "
                "the student's inputs."
            )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        return glnn_loss(out.logits, out.teacher_logits, out.target, self.lam, self.temperature)


__all__ = ["GLNN", "glnn_loss", "labelled_cross_entropy"]
