"""FitNets: Hints for Thin Deep Nets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, ICLR 2015),
https://arxiv.org/abs/1412.6550

A regressor on the student's "guided" layer predicts the teacher's "hint" layer:
    loss = ce_weight * CE + hint_weight * mean((r(f_s) - f_t)^2)        (MSE over every element)
The regressor r is built from the probed shapes:
  - map -> map of the same dimensionality: a 1x1 convolution C_s -> C_t, then adaptive average pooling to the
    teacher's spatial size when the sizes differ (a smaller student map is stretched by repetition);
  - vector -> vector: a linear layer D_s -> D_t;
  - map <-> vector (e.g. an MLP student under a CNN teacher), or 1-D <-> 2-D maps: each map is average-pooled
    to a (B, C) vector (the teacher's without parameters), then a linear layer.
The paper keeps the regressor's non-linearity equal to the hint's; here it is linear, since a tap may be any
module (RepDistiller's ConvReg adds BatchNorm + ReLU). The teacher's features are detached.

Taps: the paper uses the teacher's middle layer as the hint and the student's middle layer as the guided
layer; RepDistiller's ``hint_layer=2`` on CIFAR ResNets is the end of the second of three stages. Here the
default ``"middle"`` selects stage ``len(stage_taps) // 2`` (the second of three; the deepest of two);
an int selects a stage, ``"embedding"`` the penultimate features, any other string a module path.
Recommended: the paper trains in two stages (hints first, then KD); RepDistiller trains in one, with
hint_weight 100, ce_weight 1 and no Hinton term (``-a 0 -b 100``) on CIFAR-100.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import BuildContext, StepOutputs
from kd_lab.algorithms.taps import OneTapPair
from kd_lab.core.bounds import NonNegative
from kd_lab.core.recorder import TapSpec
from kd_lab.errors import KDLabError

MIDDLE = "middle"


def pool_to_vector(feature: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, C) by averaging over the spatial axes; (B, D) is returned as is."""
    return feature.flatten(2).mean(2) if feature.dim() > 2 else feature


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class Regressor(nn.Module):
    """Maps a student feature of shape ``student_shape`` to the teacher's ``teacher_shape`` (batch axes
    included); ``target()`` brings the teacher feature to the shape the regressor outputs."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size):
        super().__init__()
        s_spatial, t_spatial = tuple(student_shape[2:]), tuple(teacher_shape[2:])
        self.maps = bool(s_spatial) and len(s_spatial) == len(t_spatial) and len(s_spatial) in _CONV
        if self.maps:
            n = len(s_spatial)
            self.proj = _CONV[n](student_shape[1], teacher_shape[1], kernel_size=1)
            self.resize = nn.Identity() if s_spatial == t_spatial else _POOL[n](t_spatial)
        else:  # vectors, or maps pooled to vectors
            self.proj = nn.Linear(student_shape[1], teacher_shape[1])
            self.resize = nn.Identity()

    def forward(self, student_feature: Tensor) -> Tensor:
        if self.maps:
            return self.resize(self.proj(student_feature))
        return self.proj(pool_to_vector(student_feature))

    def target(self, teacher_feature: Tensor) -> Tensor:
        return teacher_feature if self.maps else pool_to_vector(teacher_feature)


class TokenRegressor(nn.Module):
    """A transformer's hidden states (B, T, H_s) -> (B, T, H_t): one linear map on the last axis (TinyBERT's W_h,
    DistillKit's projection); the teacher's hidden states are the target as they are."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size):
        super().__init__()
        if len(student_shape) != 3 or student_shape[:2] != teacher_shape[:2]:
            raise KDLabError(
                f"algorithm=fitnet on a language model needs (batch, tokens, hidden) states of the same length; got "
                f"{tuple(student_shape)} and {tuple(teacher_shape)}: tap transformer blocks (e.g. transformer.h.1)."
            )
        self.proj = nn.Linear(student_shape[-1], teacher_shape[-1])

    def forward(self, student_feature: Tensor) -> Tensor:
        return self.proj(student_feature)

    def target(self, teacher_feature: Tensor) -> Tensor:
        return teacher_feature


def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """Mean squared error over every element (unweighted)."""
    return F.mse_loss(regressed, hint)


class FitNet(OneTapPair):
    name = "fitnet"
    schemes = frozenset({"offline", "online"})
    task_kinds = frozenset({"classification", "language_modeling"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        hint_weight: NonNegative = 100.0,
        student_tap: TapSpec = MIDDLE,
        teacher_tap: TapSpec = MIDDLE,
    ):
        super().__init__(ce_weight, student_tap, teacher_tap)
        self.hint_weight = hint_weight
        self.regressor: Regressor | None = None

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        s_shape, t_shape = student_shapes[self.paths[0]], teacher_shapes[self.paths[1]]
        if len(s_shape) < 2 or len(t_shape) < 2:
            raise KDLabError(
                f"algorithm=fitnet needs features with a channel axis, (B, D) or (B, C, ...); student tap "
                f"'{self.paths[0]}' gives {tuple(s_shape)}, teacher tap '{self.paths[1]}' gives {tuple(t_shape)}."
            )
        if context.task.kind == "language_modeling":  # (B, T, H) hidden states: project H, per token
            self.regressor = TokenRegressor(s_shape, t_shape)
            return
        self.regressor = Regressor(s_shape, t_shape)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        f_s, f_t = out.features[self.paths[0]], out.teacher_features[self.paths[1]].detach()
        terms["hint"] = self.hint_weight * hint_loss(self.regressor(f_s), self.regressor.target(f_t))
        return terms
