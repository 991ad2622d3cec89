"""Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation
(Zhang, Song, Gao, Chen, Bao, Ma, ICCV 2019), https://arxiv.org/abs/1905.08094. Runs under ``scheme=self``.

The backbone (the run's student, any architecture) is cut into sections at ``exits`` (module paths, stage
indices, or "all": every stage but the deepest). Each cut gets a bottleneck (a 1x1 convolution, or a linear
layer for vectors, then pooling) mapping its features to the width of the backbone's embedding, and a linear
classifier. The backbone's own classifier is the deepest exit and the teacher of the others:

    loss = ce_weight * (CE(z_deep, y) + sum_i CE(z_i, y))
         + kd_weight * T^2 * sum_i KL(softmax(z_deep / T) || softmax(z_i / T))
         + hint_weight * sum_i MSE(f_i, f_deep)           (teacher sides detached)

with f the bottleneck features and the embedding. The paper's values are ce 1 - alpha = 0.9, kd alpha = 0.1,
T = 3 and a hint weight of 1e-6 on a *summed* squared error; ours is a mean over the batch and the feature
width, which at batch 128 and a 512-wide embedding (their ResNet-18) is the paper's term times ~1.5e-5, so
the equivalent here is hint_weight ~0.065 (1e-6 x 128 x 512); the default 0.05 rounds it down. Each exit's
accuracy is reported (``exit<i>/test/acc``) with its inference cost (``results.json`` ->
``algorithm.exits``); ``kd_lab.tools.exits.export_exit`` cuts one exit out as a plain model, without the other heads.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.embedding import flat, flat_dim
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import NonNegative, Positive
from kd_lab.core.recorder import resolve_tap
from kd_lab.errors import KDLabError


def exit_head(shape: torch.Size, width: int, num_classes: int) -> nn.Sequential:
    """Bottleneck to ``width`` features (``head[0]``) then a classifier (``head[1]``), from a probed shape."""
    if len(shape) == 2:
        bottleneck = nn.Sequential(nn.Linear(shape[1], width), nn.ReLU())
    elif len(shape) in (3, 4):
        conv, norm, pool = (
            (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d)
            if len(shape) == 3
            else (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d)
        )
        bottleneck = nn.Sequential(conv(shape[1], width, 1, bias=False), norm(width), nn.ReLU(), pool(1), nn.Flatten())
    else:
        raise KDLabError(
            f"algorithm=byot cannot attach an exit to a feature of shape {tuple(shape)}; tap a "
            "(B, D), (B, C, L) or (B, C, H, W) output."
        )
    return nn.Sequential(bottleneck, nn.Linear(width, num_classes))


class BYOT(Algorithm):
    name = "byot"
    schemes = frozenset({"self"})
    needs_teacher = False

    def __init__(
        self,
        exits: str | list[str | int] = "all",
        ce_weight: NonNegative = 0.9,
        kd_weight: NonNegative = 0.1,
        hint_weight: NonNegative = 0.05,
        temperature: Positive = 3.0,
    ):
        super().__init__(ce_weight)
        self.exit_specs, self.kd_weight, self.hint_weight, self.temperature = exits, kd_weight, hint_weight, temperature
        self.exit_paths: list[str] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        specs = self.exit_specs
        if specs == "all":
            stages = getattr(student, "stage_taps", None)
            if not stages or len(stages) < 2:
                raise KDLabError(
                    f"algorithm=byot with exits=all needs a student with at least 2 stage_taps; "
                    f"{type(student).__name__} has {stages}. Give algorithm.exits as module paths."
                )
            specs = stages[:-1]
        self.exit_paths = [resolve_tap(student, s, "student") for s in specs]
        self.embedding_path = resolve_tap(student, "embedding", "student")
        if not self.exit_paths:
            raise KDLabError("algorithm.exits is empty: give at least one module path to attach an exit to.")

    @property
    def student_taps(self) -> list[str]:
        return [*self.exit_paths, self.embedding_path]

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        width = flat_dim(student_shapes[self.embedding_path])
        self.heads = nn.ModuleList(
            exit_head(student_shapes[p], width, context.task.num_classes) for p in self.exit_paths
        )

    def exit_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        pairs = zip(self.exit_paths, self.heads, strict=True)
        return {f"exit{i + 1}": head(features[path]) for i, (path, head) in enumerate(pairs)}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        deep = out.logits.detach()
        deep_feature = flat(out.features[self.embedding_path]).detach()
        ce, kd, hint = [], [], []
        for path, head in zip(self.exit_paths, self.heads, strict=True):
            feature = head[0](out.features[path])
            logits = head[1](feature)
            ce.append(out.label_loss(logits))
            kd.append(kd_term(out, logits, deep, self.temperature))
            hint.append(F.mse_loss(feature, deep_feature))
        return {
            "ce": self.ce_weight * out.label_loss(),
            "exit_ce": self.ce_weight * torch.stack(ce).sum(),
            "exit_kd": self.kd_weight * torch.stack(kd).sum(),
            "exit_hint": self.hint_weight * torch.stack(hint).sum(),
        }

    def report(self, student: nn.Module, example: Tensor) -> dict:
        from kd_lab.tools.exits import exit_costs  # a leaf module of its own; imported late to keep this file light

        return {"exits": exit_costs(student, self, example)}
