"""Activation boundaries (Heo, Lee, Yun, Choi, AAAI 2019, "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons"), https://arxiv.org/abs/1811.03233. Reference code: bhheo/AB_distillation.

A ReLU neuron is on or off. The student should switch its neurons on and off where the teacher does. The loss
works on pre-ReLU responses: t of the teacher, and r = c(s), the student's response through a connector c to
the teacher's width. With margin m, per neuron:

    ab(r, t) = (r + m)^2 * [r > -m and t <= 0] + (r - m)^2 * [r <= m and t > 0]

A neuron the teacher turns off is pushed below -m; one it turns on is pushed above m. The layer's loss is the
sum over neurons, averaged over the batch. Layers are weighted 1 (deepest), 1/2, 1/4, ... as in the code:

    loss_ab = ab_weight * sum_i 2^-(n-1-i) * mean_b sum_neurons ab(c_i(s_i), t_i)

Pre-ReLU taps. A stage whose module is a ``Sequential`` ending in a ReLU (our Conv-BN-ReLU blocks
``blocks.<i>``, our MLP's Linear-ReLU ``layers.<i>``) is tapped at the child before the ReLU: the BatchNorm
output ``blocks.<i>.1`` or the Linear output ``layers.<i>.0``. Any other stage has no pre-activation tap, and
the build refuses it (give module paths of pre-ReLU outputs instead).

Connector (the paper's): a 1x1 convolution then BatchNorm for maps of the same dimensionality (the length is
average-pooled to the teacher's when it differs); a linear layer then BatchNorm for vectors. A vector facing a
map (an MLP student under a CNN teacher) is matched to every neuron of the flattened map, C x L of them.

Schedule: the paper's initialization stage. For the first ``init_epochs`` epochs the loss is the AB term alone
(connectors and student learn together). Then the AB term and the connectors drop out and the task loss takes
over: ce_weight * CE + kd_weight * KD(T). The stages share the run's optimizer and learning-rate schedule; the
code gives the initialization its own. ``joint=true`` keeps the AB term on after the initialization, added to
the task loss.

Defaults: margin 1 and ab_weight 3e-3 (the released CIFAR script: a summed loss / batch / 1000 x 3). After
the initialization: CE alone, as the paper's "AB" rows; that script's KD variant has only the KD term at T = 3
without T^2, here ``ce_weight=0 kd_weight=0.111 temperature=3``. init_epochs 10 of the survey's 80: the
KD-Zoo port (AberHu/Knowledge-Distillation-Zoo) uses 50 before 200 of training, in a stage of its own.
"""

import torch
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import NonNegative, NonNegativeInt, Positive
from kd_lab.core.recorder import TapSpec, resolve_module, resolve_tap, stage_taps
from kd_lab.errors import KDLabError

ALL = "all"


def ab_loss(response: Tensor, teacher: Tensor, margin: float) -> Tensor:
    """The alternative AB loss of one layer: summed over neurons, averaged over the batch."""
    on = teacher > 0
    below = (response + margin).pow(2) * ((response > -margin) & ~on)
    above = (response - margin).pow(2) * ((response <= margin) & on)
    return (below + above).flatten(1).sum(1).mean()


def boundary_agreement(response: Tensor, teacher: Tensor) -> Tensor:
    """Fraction of neurons whose on/off state agrees with the teacher's (the paper's similarity, a metric)."""
    return ((response > 0) == (teacher > 0)).float().mean()


def pre_activation_path(model: nn.Module, path: str, role: str) -> str:
    """The module path of the pre-ReLU response of stage ``path``: the child before its final ReLU."""
    module = resolve_module(model, path, role)
    children = list(module.children()) if isinstance(module, nn.Sequential) else []
    if len(children) >= 2 and isinstance(children[-1], nn.ReLU):
        return f"{path}.{len(children) - 2}" if path else str(len(children) - 2)
    raise KDLabError(
        f"algorithm=ab needs pre-ReLU responses, but the {role}'s stage '{path}' ({type(module).__name__}) does not "
        "end with an nn.ReLU child, so no pre-activation tap exists there. Give algorithm."
        f"{role}_taps as module paths of pre-ReLU outputs (e.g. a BatchNorm before the ReLU), or pick "
        "algorithm=fitnet, which taps any layer."
    )


class Connector(nn.Module):
    """Student pre-ReLU response -> the teacher's shape (batch axis included): conv or linear, then BatchNorm."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size):
        super().__init__()
        s_spatial, t_spatial = tuple(student_shape[2:]), tuple(teacher_shape[2:])
        self.maps = bool(s_spatial) and len(s_spatial) == len(t_spatial) and len(s_spatial) in (1, 2)
        self.teacher_shape = tuple(teacher_shape[1:])
        if self.maps:
            conv, norm, pool = (
                (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d)
                if len(s_spatial) == 1
                else (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d)
            )
            resize = [] if s_spatial == t_spatial else [pool(t_spatial)]
            c_s, c_t = student_shape[1], teacher_shape[1]
            self.net = nn.Sequential(conv(c_s, c_t, 1, bias=False), norm(c_t), *resize)
        else:  # vectors, or a map facing a vector: every neuron of the flattened teacher response
            d_s, d_t = int(torch.Size(student_shape[1:]).numel()), int(torch.Size(teacher_shape[1:]).numel())
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_s, d_t, bias=False), nn.BatchNorm1d(d_t))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def target(self, teacher: Tensor) -> Tensor:
        return teacher if self.maps else teacher.flatten(1)


class ActivationBoundary(Algorithm):
    name = "ab"
    schemes = frozenset({"offline"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        kd_weight: NonNegative = 0.0,
        temperature: Positive = 4.0,
        ab_weight: NonNegative = 3e-3,
        margin: Positive = 1.0,
        init_epochs: NonNegativeInt = 10,
        joint: bool = False,
        student_taps: str | list[TapSpec] = ALL,
        teacher_taps: str | list[TapSpec] = ALL,
    ):
        super().__init__(ce_weight)
        self.kd_weight, self.temperature, self.ab_weight, self.margin = kd_weight, temperature, ab_weight, margin
        self.init_epochs, self.joint = int(init_epochs), joint
        self.tap_specs = (student_taps, teacher_taps)
        self.paths: tuple[list[str], list[str]] = ([], [])
        self.initializing = self.init_epochs > 0  # the state of epoch 0, until on_epoch_start says otherwise

    def _resolve(self, model: nn.Module, spec, role: str) -> list[str]:
        if spec == ALL:
            stages = stage_taps(model)
            if not stages:
                raise KDLabError(
                    f"algorithm=ab with {role}_taps=all needs a {role} that declares stage_taps; "
                    f"{type(model).__name__} declares none. Give algorithm.{role}_taps as module paths of "
                    "pre-ReLU outputs."
                )
            return [pre_activation_path(model, p, role) for p in stages]
        paths = []
        for s in spec if isinstance(spec, list | tuple) else [spec]:
            path = resolve_tap(model, s, role)  # checks that a given path exists
            # a stage index or "middle" names a stage, whose pre-ReLU child is found; a path is taken as given
            paths.append(pre_activation_path(model, path, role) if isinstance(s, int) or s == "middle" else path)
        return paths

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        s = self._resolve(student, self.tap_specs[0], "student")
        t = self._resolve(teacher, self.tap_specs[1], "teacher")
        both_all = self.tap_specs[0] == ALL and self.tap_specs[1] == ALL
        if both_all:  # pair the stages from the deepest: an MLP of 2 layers meets the CNN's last 2 blocks
            n = min(len(s), len(t))
            s, t = s[-n:], t[-n:]
        elif len(s) != len(t):
            raise KDLabError(
                f"algorithm=ab pairs student and teacher taps one to one, but got {len(s)} student taps {s} and "
                f"{len(t)} teacher taps {t}; give lists of the same length."
            )
        if not s:
            raise KDLabError("algorithm.student_taps is empty: give at least one pre-ReLU module path.")
        self.paths = (s, t)

    @property
    def student_taps(self) -> list[str]:
        return self.paths[0]

    @property
    def teacher_taps(self) -> list[str]:
        return self.paths[1]

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        for s, t in zip(*self.paths, strict=True):
            if len(student_shapes[s]) < 2 or len(teacher_shapes[t]) < 2:
                raise KDLabError(
                    f"algorithm=ab needs responses with a neuron axis, (B, D) or (B, C, ...); student tap '{s}' "
                    f"gives {tuple(student_shapes[s])}, teacher tap '{t}' gives {tuple(teacher_shapes[t])}."
                )
        self.connectors = nn.ModuleList(
            Connector(student_shapes[s], teacher_shapes[t]) for s, t in zip(*self.paths, strict=True)
        )

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:
        self.initializing = epoch < self.init_epochs

    def boundary_loss(self, out: StepOutputs) -> Tensor:
        n = len(self.connectors)
        total = out.logits.new_zeros(())
        for i, (s, t, connector) in enumerate(zip(*self.paths, self.connectors, strict=True)):
            teacher = connector.target(out.teacher_features[t].detach())
            total = total + 2.0 ** -(n - 1 - i) * ab_loss(connector(out.features[s]), teacher, self.margin)
        return total

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if self.initializing:
            return {"ab": self.ab_weight * self.boundary_loss(out)}
        terms = self.ce_term(out)
        if self.kd_weight:
            terms["kd"] = self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)
        if self.joint:
            terms["ab"] = self.ab_weight * self.boundary_loss(out)
        return terms
