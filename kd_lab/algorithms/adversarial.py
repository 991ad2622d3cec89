"""Training Shallow and Thin Networks for Acceleration via Knowledge Distillation with Conditional
Adversarial Networks (Xu, Hsu, Huang, ICLR 2018 workshop), https://arxiv.org/abs/1709.00513

A discriminator D learns to tell the teacher's outputs from the student's, conditioned on the label; the
student learns to fool it alongside a KD term:
  D:       BCE(D(t, y), real) + BCE(D(s, y), fake)                       (its own optimizer)
  student: ce_weight * CE + kd_weight * T^2 * KL + adv_weight * BCE(D(s, y), real)
What is compared (``discriminate``): ``logits`` (softened probabilities at temperature T, as the paper), or
``embedding`` (penultimate features; the student's mapped to the teacher's width by a linear connector).
The two optimizers alternate under Lightning's manual optimization; ``adversary_steps`` D updates every
``adversary_every`` steps sets the discriminator/student ratio. Under DDP the run uses
find_unused_parameters (each backward touches only one player's parameters).
Recommended (paper, CIFAR): a 3-layer MLP discriminator, adv_weight around 1 with the KD term kept;
Adam lr 1e-4..1e-3 with beta1 = 0.5 for D, as usual for GANs.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Adversary, Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.embedding import flat, flat_dim, linear_connector
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import AtLeastOne, NonNegative, Positive
from kd_lab.core.recorder import resolve_tap
from kd_lab.errors import KDLabError


class Discriminator(nn.Module):
    """MLP on [sample, one-hot label] -> one real/fake logit per sample."""

    def __init__(self, in_dim: int, num_classes: int, hidden: AtLeastOne):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(in_dim + num_classes, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return self.net(torch.cat([x, F.one_hot(target, self.num_classes).to(x.dtype)], dim=1)).squeeze(1)


class Adversarial(Algorithm):
    name = "adversarial"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        kd_weight: NonNegative = 1.0,
        temperature: Positive = 4.0,
        adv_weight: NonNegative = 0.5,
        discriminate: str = "logits",
        hidden: AtLeastOne = 128,
        lr: Positive = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        adversary_steps: AtLeastOne = 1,
        adversary_every: AtLeastOne = 1,
    ):
        super().__init__(ce_weight)
        if discriminate not in ("logits", "embedding"):
            raise KDLabError(f"algorithm.discriminate='{discriminate}' is unknown; pick logits or embedding.")
        self.kd_weight, self.temperature, self.adv_weight = kd_weight, temperature, adv_weight
        self.discriminate, self.hidden, self.lr, self.betas = discriminate, hidden, lr, tuple(betas)
        self.adversary_steps, self.adversary_every = adversary_steps, adversary_every
        self.paths = ("", "")

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if self.discriminate == "embedding":
            self.paths = (resolve_tap(student, "embedding", "student"), resolve_tap(teacher, "embedding", "teacher"))

    @property
    def student_taps(self) -> list[str]:
        return [self.paths[0]] if self.discriminate == "embedding" else []

    @property
    def teacher_taps(self) -> list[str]:
        return [self.paths[1]] if self.discriminate == "embedding" else []

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        if self.discriminate == "embedding":
            self.connector = linear_connector(student_shapes[self.paths[0]], teacher_shapes[self.paths[1]])
            dim = flat_dim(teacher_shapes[self.paths[1]])
        else:
            dim = context.task.num_classes
        self.discriminator = Discriminator(dim, context.task.num_classes, self.hidden)

    def _views(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        """(teacher sample, student sample) as the discriminator sees them."""
        if self.discriminate == "logits":
            t = self.temperature
            return F.softmax(out.teacher_logits / t, -1), F.softmax(out.logits / t, -1)
        return flat(out.teacher_features[self.paths[1]]), self.connector(flat(out.features[self.paths[0]]))

    def adversary(self) -> Adversary:
        return Adversary(
            self.discriminator,
            lambda params: torch.optim.Adam(params, lr=self.lr, betas=self.betas),
            self.adversary_loss,
            self.adversary_steps,
            self.adversary_every,
        )

    def adversary_loss(self, out: StepOutputs) -> dict[str, Tensor]:
        real, fake = self._views(out)
        d_real = self.discriminator(real.detach(), out.target)
        d_fake = self.discriminator(fake.detach(), out.target)
        loss = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
        loss = loss + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        return {"discriminator": loss}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        if self.kd_weight:
            terms["kd"] = self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)
        _, fake = self._views(out)
        d_fake = self.discriminator(fake, out.target)
        terms["adversarial"] = self.adv_weight * F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        return terms
