"""Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks via Attention
Transfer (Zagoruyko & Komodakis, ICLR 2017), https://arxiv.org/abs/1612.03928

The student matches the teacher's spatial attention maps at several depths. For a feature map f (B, C, *S):
    A(f) = normalize_L2(flatten(mean_c |f_c|^p))            (B, prod(S)), p = 2
    loss = ce_weight * CE + at_weight / 2 * sum_pairs mean((A(f_s) - A(f_t))^2)
(the mean over batch and positions, as in the authors' code, so the weight absorbs 1 / (B * prod(S))).
Channel counts may differ (the mean over channels removes them). When spatial sizes differ, the student's
attention map (before flattening) is interpolated to the teacher's size (linear in 1-D, bilinear in 2-D).

Pairs: by default every stage of each network (``stage_taps``), paired shallow to deep; when the numbers of
stages differ, m = min(n_s, n_t) stages of each are taken at the same relative depths,
index_k = floor(k * (n - 1) / (m - 1) + 1/2) for k = 0..m-1 (the deepest only when m = 1), so the first and the
last stages always pair. Explicit ``student_taps`` / ``teacher_taps`` lists are paired by the same rule.
Needs feature maps on both sides: an MLP (vectors, no spatial axis) fails at build time.

Recommended: p = 2 and at_weight (the paper's beta) 1000 with the /2 (paper and its code, CIFAR, at the ends
of the residual groups); RepDistiller uses beta 1000 without the /2 (at_weight 2000 here), ce 1, no Hinton
term (``-a 0 -b 1000``). The default here is 10: the loss is a mean over positions, and MNIST-1D maps have
40 / 20 / 10 positions against CIFAR's 1024 / 256 / 64, so each pair weighs ~25-100x more than in the paper.
Measured (one seed, cnn1d_tiny <- cnn1d_large, 300 epochs): at_weight 1000 -> 64.4% test accuracy, 100 -> 90.2%,
10 -> 92.9% (no distillation: 92.8%).
"""

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.core.bounds import NonNegative, Positive
from kd_lab.core.recorder import TapSpec, resolve_tap
from kd_lab.errors import KDLabError

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """(B, C, *S) -> (B, *S): mean over channels of |f|^p (not yet normalized)."""
    return feature.abs().pow(p).mean(1)


def attention_vector(amap: Tensor) -> Tensor:
    """(B, *S) -> (B, prod(S)), each row L2-normalized."""
    return F.normalize(amap.flatten(1), p=2, dim=1)


def resize_map(amap: Tensor, size: tuple[int, ...]) -> Tensor:
    """Interpolate a (B, *S) attention map to spatial size ``size`` (1-D, 2-D or 3-D)."""
    if tuple(amap.shape[1:]) == tuple(size):
        return amap
    return F.interpolate(amap.unsqueeze(1), size=size, mode=_MODES[len(size)], align_corners=False).squeeze(1)


def at_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """mean((A(f_s) - A(f_t))^2) for one pair (unweighted); the student's map is resized to the teacher's."""
    a_t = attention_map(teacher_feature, p)
    a_s = resize_map(attention_map(student_feature, p), tuple(a_t.shape[1:]))
    return (attention_vector(a_s) - attention_vector(a_t)).pow(2).mean()


def pair_by_depth(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """min(n_s, n_t) (student index, teacher index) pairs at matching relative depths, shallow to deep."""
    m = min(n_student, n_teacher)
    if m <= 1:
        return [(n_student - 1, n_teacher - 1)] if m == 1 else []

    def pick(n: int, k: int) -> int:
        return math.floor(k * (n - 1) / (m - 1) + 0.5)

    return [(pick(n_student, k), pick(n_teacher, k)) for k in range(m)]


def _stage_paths(model: nn.Module, specs: list[TapSpec] | None, role: str) -> list[str]:
    if specs is None:
        stages = getattr(model, "stage_taps", None)
        if not stages:
            raise KDLabError(
                f"{role} ({type(model).__name__}) declares no stage_taps; give algorithm.{role}_taps as a list of "
                "module paths of its feature maps."
            )
        return list(stages)
    return [resolve_tap(model, spec, role) for spec in specs]


class AttentionTransfer(Algorithm):
    name = "attention"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        at_weight: NonNegative = 10.0,
        p: Positive = 2.0,
        student_taps: list[TapSpec] | None = None,
        teacher_taps: list[TapSpec] | None = None,
    ):
        super().__init__(ce_weight)
        self.at_weight, self.p = at_weight, p
        self.tap_specs = (
            None if student_taps is None else list(student_taps),
            None if teacher_taps is None else list(teacher_taps),
        )
        self.pairs: list[tuple[str, str]] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        s_paths = _stage_paths(student, self.tap_specs[0], "student")
        t_paths = _stage_paths(teacher, self.tap_specs[1], "teacher")
        self.pairs = [(s_paths[i], t_paths[j]) for i, j in pair_by_depth(len(s_paths), len(t_paths))]
        if not self.pairs:
            raise KDLabError("algorithm=attention needs at least one tap on each side; the tap lists are empty.")

    @property
    def student_taps(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.pairs))

    @property
    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(t for _, t in self.pairs))

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        for s_path, t_path in self.pairs:
            s_shape, t_shape = student_shapes[s_path], teacher_shapes[t_path]
            for role, path, shape in (("student", s_path, s_shape), ("teacher", t_path, t_shape)):
                if len(shape) < 3:
                    raise KDLabError(
                        f"algorithm=attention: attention transfer needs spatial feature maps (B, C, L) or "
                        f"(B, C, H, W) on both sides, but the {role} tap '{path}' gives {tuple(shape)} (feature "
                        "vectors with no spatial axis, as an MLP's). Pick algorithm=fitnet or kd (or sp, pkt, rkd, "
                        "crd, which compare vectors), or tap convolutional layers."
                    )
            if len(s_shape) != len(t_shape):
                raise KDLabError(
                    f"algorithm=attention cannot compare a {len(s_shape) - 2}-D student map '{s_path}' "
                    f"{tuple(s_shape)} with a {len(t_shape) - 2}-D teacher map '{t_path}' {tuple(t_shape)}; "
                    "pick algorithm=fitnet or kd for this pair."
                )
            if len(s_shape) - 2 not in _MODES:
                raise KDLabError(f"algorithm=attention supports 1-D to 3-D maps; '{s_path}' is {tuple(s_shape)}.")

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        losses = [at_loss(out.features[s], out.teacher_features[t].detach(), self.p) for s, t in self.pairs]
        terms["at"] = self.at_weight / 2 * sum(losses)
        return terms
