"""Multi-teacher distillation: the soft targets of several teachers, aggregated, plus optional feature hints.

Aggregation of the teachers' softened distributions p_i = softmax(z_i / T):
  * ``mean``: the average (You et al., KDD 2017, "Learning from Multiple Teacher Networks",
    https://dl.acm.org/doi/10.1145/3097983.3098135);
  * ``weights``: fixed weights from config (normalized to sum 1);
  * ``confidence``: per sample, softmax over teachers of -CE(z_i, y), so a teacher that is right and sure about
    this sample counts more (CA-MKD: Zhang, Chen, Wang, ICASSP 2022, "Confidence-Aware Multi-Teacher Knowledge
    Distillation", https://arxiv.org/abs/2201.00007).
  loss = ce_weight * CE + kd_weight * T^2 * KL(p_agg || p_s)
         + hint_weight * mean_i MSE(connector_i(e_s), e_t_i) over the teachers in ``hint_teachers``
Teachers may be of different architectures: ``teacher`` is teacher 0 (the reference of the test metrics);
``extra_teachers`` names more teacher configs, each trained once and cached in the teacher store. Each hinted
teacher gets its own linear connector from the student's embedding to its own width.
Recommended: T = 4, ce 0.1 / kd 0.9 as for KD; hints off (0) unless the teachers' embeddings are informative.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.embedding import flat, linear_connector
from kd_lab.core.bounds import NonNegative, NonNegativeList, Positive
from kd_lab.core.recorder import resolve_tap
from kd_lab.errors import KDLabError

AGGREGATIONS = ("mean", "weights", "confidence")


def aggregate(
    teacher_logits: list[Tensor],
    temperature: float,
    how: str,
    weights: Tensor | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """The teachers' softened distributions combined into one (B, K) distribution."""
    probs = torch.stack([F.softmax(z / temperature, dim=-1) for z in teacher_logits])  # (N, B, K)
    if how == "mean":
        return probs.mean(0)
    if how == "weights":
        return torch.einsum("n,nbk->bk", weights / weights.sum(), probs)
    ce = torch.stack([F.cross_entropy(z, target, reduction="none") for z in teacher_logits])  # (N, B)
    return torch.einsum("nb,nbk->bk", F.softmax(-ce, dim=0), probs)


class MultiTeacher(Algorithm):
    name = "multi_teacher"
    schemes = frozenset({"offline"})
    task_kinds = frozenset({"classification", "language_modeling"})

    def __init__(
        self,
        ce_weight: NonNegative = 0.1,
        kd_weight: NonNegative = 0.9,
        temperature: Positive = 4.0,
        aggregation: str = "mean",
        weights: NonNegativeList = None,
        hint_weight: NonNegative = 0.0,
        hint_teachers: list[int] | None = None,
        student_tap: str | int = "embedding",
        teacher_tap: str | int = "embedding",
    ):
        super().__init__(ce_weight)
        if aggregation not in AGGREGATIONS:
            raise KDLabError(f"algorithm.aggregation='{aggregation}' is unknown; pick one of {list(AGGREGATIONS)}.")
        self.kd_weight, self.temperature, self.aggregation = kd_weight, temperature, aggregation
        self.weights = weights
        self.hint_weight = hint_weight
        self.hint_teachers = list(hint_teachers or [0])
        self.tap_specs = (student_tap, teacher_tap)
        self.student_path, self.teacher_paths = "", {}

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if self.hint_weight:
            self.student_path = resolve_tap(student, self.tap_specs[0], "student")

    def bind_teachers(self, teachers: list[nn.Module]) -> None:
        if not self.hint_weight:
            return
        for i in self.hint_teachers:
            if not 0 <= i < len(teachers):
                raise KDLabError(f"algorithm.hint_teachers has {i}, but there are {len(teachers)} teachers.")
            self.teacher_paths[i] = resolve_tap(teachers[i], self.tap_specs[1], f"teacher {i}")

    @property
    def student_taps(self) -> list[str]:
        return [self.student_path] if self.hint_weight else []

    def teacher_taps_of(self, index: int) -> list[str]:
        return [self.teacher_paths[index]] if index in self.teacher_paths else []

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        n = len(context.all_teacher_shapes)
        if self.weights is not None and len(self.weights) != n:
            raise KDLabError(f"algorithm.weights has {len(self.weights)} entries for {n} teachers; give one each.")
        if self.aggregation == "weights" and self.weights is None:
            raise KDLabError("algorithm.aggregation=weights needs algorithm.weights (one per teacher).")
        self.register_buffer("teacher_weights", torch.tensor(self.weights or [1.0] * n), persistent=False)
        self.connectors = nn.ModuleDict(
            {
                str(i): linear_connector(student_shapes[self.student_path], context.all_teacher_shapes[i][path])
                for i, path in self.teacher_paths.items()
            }
        )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        t = self.temperature
        logits, teacher_logits, target = out.logits, out.all_teacher_logits, out.target
        normalizer = out.task.token_normalizer(out.batch) if out.task is not None else None
        if normalizer is not None:  # tokens: the positions that count, as (N, V) rows
            keep = out.task.valid_positions(out.batch)
            logits, target = logits[keep], target[keep]
            teacher_logits = [z[keep] for z in teacher_logits]
        p_agg = aggregate(teacher_logits, t, self.aggregation, self.teacher_weights, target)
        log_p_s = F.log_softmax(logits / t, dim=-1)
        if normalizer is None:
            terms["kd"] = self.kd_weight * t**2 * F.kl_div(log_p_s, p_agg, reduction="batchmean")
        else:  # the sum over valid tokens divided by the global batch's valid tokens, as the task's loss
            terms["kd"] = self.kd_weight * t**2 * F.kl_div(log_p_s, p_agg, reduction="sum") / normalizer
        if self.hint_weight:
            e_s = flat(out.features[self.student_path])
            hints = [
                F.mse_loss(self.connectors[str(i)](e_s), flat(out.all_teacher_features[i][path]))
                for i, path in self.teacher_paths.items()
            ]
            terms["hint"] = self.hint_weight * torch.stack(hints).mean()
        return terms
