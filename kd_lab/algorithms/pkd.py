"""Patient Knowledge Distillation (Sun, Cheng, Gan, Liu, EMNLP 2019, arXiv:1908.09355).

    loss = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(p_T^T || p_S^T) + beta * L_PT
    L_PT = mean over (sample, mapped layer, hidden unit) of (h_S / ||h_S|| - h_T / ||h_T||)^2

The patient term compares one token's hidden state per mapped layer (``layer_pairs``: PKD-skip or PKD-last;
the last student layer is left out, because the prediction distils it). It is a mean over elements, as
``F.mse_loss`` in the authors' code (intersun/PKD-for-BERT-Model-Compression): the paper's beta grid
{10, 100, 500, 1000} is tuned to that scale. The paper's sum over layers of squared distances is
``layers * hidden`` times larger.
``token``: BERT uses [CLS], the first token. A causal model's first token sees only itself, so ``auto`` takes
the last token there: under causal attention it is the only position that has read the whole sequence.
``mean`` averages every position instead. The soft-target KL is on the task's valid tokens.
On ``task=sequence_classification`` (the paper's GLUE setting) the KL is on the class logits, and ``auto``
takes [CLS], the first token. A GPT-2 classifier's inputs are padded at the end, so there use ``mean``.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.layer_map import block_path, count_layers, layer_pairs
from kd_lab.core.bounds import NonNegative, Positive, UnitInterval
from kd_lab.errors import KDLabError
from kd_lab.losses.divergences import token_divergence

TOKENS = ("auto", "first", "last", "mean")


def pick_token(hidden: Tensor, token: str) -> Tensor:
    """(B, T, H) -> (B, H): the first token, the last token, or the mean over positions."""
    if token == "first":
        return hidden[:, 0]
    if token == "last":
        return hidden[:, -1]
    return hidden.mean(dim=1)


def patience_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between L2-normalized vectors, ``(B, layers, H)`` each."""
    return F.mse_loss(F.normalize(student, p=2, dim=-1), F.normalize(teacher, p=2, dim=-1))


class PKD(Algorithm):
    name = "pkd"
    schemes = frozenset({"offline"})
    task_kinds = frozenset({"language_modeling", "sequence_classification"})

    def __init__(
        self,
        alpha: UnitInterval = 0.5,
        beta: NonNegative = 100.0,
        temperature: Positive = 10.0,
        mapping: str | Sequence = "skip",
        token: str = "auto",
    ):
        super().__init__(ce_weight=1.0 - alpha)
        if token not in TOKENS:
            raise KDLabError(
                f"algorithm.token={token!r} is not one of {list(TOKENS)}: 'first' is BERT's [CLS], 'last' the "
                "causal model's summary token, 'auto' picks by the task's objective."
            )
        self.alpha, self.beta, self.temperature, self.token = alpha, beta, temperature, token
        # Hydra hands a list as a ListConfig: keep plain lists of ints for layer_pairs.
        self.mapping = mapping if isinstance(mapping, str) else [list(p) for p in mapping]
        self.pairs: list[tuple[int, int]] = []
        self.student_paths: list[str] = []
        self.teacher_paths: list[str] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        m, n = count_layers(student), count_layers(teacher)
        self.pairs = layer_pairs(m, n, self.mapping)
        if not self.pairs:
            raise KDLabError(
                f"algorithm=pkd with mapping {self.mapping!r} pairs no layer: the student has {m} layer(s), and "
                "PKD-skip and PKD-last leave the last one to the prediction. Use a deeper student, or give "
                f"explicit pairs, e.g. algorithm.mapping=[[0,{n - 1}]]."
            )
        self.student_paths = [block_path(student, s) for s, _ in self.pairs]
        self.teacher_paths = [block_path(teacher, t) for _, t in self.pairs]

    @property
    def student_taps(self) -> list[str]:
        return list(dict.fromkeys(self.student_paths)) if self.beta else []

    @property
    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(self.teacher_paths)) if self.beta else []

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        if self.token == "auto":
            self.token = "last" if getattr(context.task, "objective", "masked") == "causal" else "first"
        if not self.beta:
            return
        for (s, t), sp, tp in zip(self.pairs, self.student_paths, self.teacher_paths, strict=True):
            ws, wt = student_shapes[sp][-1], teacher_shapes[tp][-1]
            if ws != wt:
                raise KDLabError(
                    f"algorithm=pkd compares hidden states of the same width, but student layer {s} is {ws} wide "
                    f"and teacher layer {t} {wt}. Give the student the teacher's hidden size, set "
                    "algorithm.beta=0, or use algorithm=fitnet or tinybert, which learn a projection."
                )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        if self.alpha:
            mask, count = out.positions()
            kl = token_divergence(
                out.logits.flatten(0, -2),
                out.teacher_logits.flatten(0, -2),
                "forward_kl",
                mask=None if mask is None else mask.flatten(),
                temperature=self.temperature,
            )
            terms["kd"] = self.alpha * kl / count
        if self.beta:
            student = torch.stack([pick_token(out.features[p], self.token) for p in self.student_paths], dim=1)
            teacher = torch.stack([pick_token(out.teacher_features[p], self.token) for p in self.teacher_paths], 1)
            terms["patience"] = self.beta * patience_loss(student, teacher.detach())
        return terms
