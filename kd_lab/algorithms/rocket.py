"""Rocket Launching: A Universal and Efficient Framework for Training Well-performing Light Net (Zhou, Song,
Wang, Zhu, Gai, AAAI 2018), https://arxiv.org/abs/1708.04106. Runs under ``scheme=self``.

The light net (the run's student) and a booster net share the student's layers up to ``tap``. The booster
is a larger head on that tap: ``booster_depth`` layers of ``booster_width`` x the tap's width (Conv-BN-ReLU
on feature maps, Linear-ReLU on vectors), pooling and a classifier. Both are trained at once. The light net
also matches the booster's logits before the softmax (the hint):

    loss = ce_weight * (CE(l, y) + CE(z, y)) + hint_weight * mean_batch ||l - stop_grad(z)||^2

with l the light net's logits and z the booster's. The stop-gradient is the paper's gradient block: the
hint moves the light net toward the booster, never the booster toward the light net
(``gradient_block: false`` lets it flow both ways, the paper's ablation). The shared layers get the
gradients of both nets. The deployed model is the light net alone; the booster is dropped after training.

Defaults. The hint weight is the reference code's ``--gamma 0.03`` (zhougr1993/Rocket-Launching README, every
rocket run), on a squared error summed over classes and averaged over the batch, as here. The tap is the
student's first stage: the paper's "bottom" sharing, the light net and the booster share the lowest layers.
The booster's size is not a paper value: 2 layers of 4 x the tap's width make it several times the light
net's upper part on the survey's students, which is what "booster" means there (its cost is reported).
"""

from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.one import part_costs, resolve_branch_tap, wide_head
from kd_lab.core.bounds import AtLeastOne, NonNegative, Positive


class RocketLaunching(Algorithm):
    name = "rocket"
    schemes = frozenset({"self"})
    needs_teacher = False

    def __init__(
        self,
        tap: str | int = 0,
        booster_width: Positive = 4.0,
        booster_depth: AtLeastOne = 2,
        ce_weight: NonNegative = 1.0,
        hint_weight: NonNegative = 0.03,
        gradient_block: bool = True,
    ):
        super().__init__(ce_weight)
        self.tap_spec, self.booster_width, self.booster_depth = tap, booster_width, booster_depth
        self.hint_weight, self.gradient_block = hint_weight, gradient_block
        self.tap_path = ""

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.tap_path = resolve_branch_tap(student, self.tap_spec, self.name)

    @property
    def student_taps(self) -> list[str]:
        return [self.tap_path]

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        shape = student_shapes[self.tap_path]
        widths = [max(1, round(self.booster_width * shape[1]))] * self.booster_depth
        self.booster = wide_head(shape, widths, context.task.num_classes, self.name)

    def exit_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"booster": self.booster(features[self.tap_path])}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        light = out.logits
        booster = self.booster(out.features[self.tap_path])
        target = booster.detach() if self.gradient_block else booster
        hint = (light - target).pow(2).sum(-1).mean()
        return {
            "ce": self.ce_weight * out.label_loss(),
            "booster_ce": self.ce_weight * out.label_loss(booster),
            "hint": self.hint_weight * hint,
        }

    def report(self, student: nn.Module, example: Tensor) -> dict:
        costs = part_costs(student, self.tap_path, {"booster": self.booster}, example)
        return {"deployed": "student", "tap": self.tap_path, "costs": costs}
