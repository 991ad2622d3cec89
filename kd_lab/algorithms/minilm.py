"""MiniLM and MiniLMv2: distil the last self-attention's distributions and relations, not the hidden states,
so the student's width is free.

MiniLM (Wang et al., NeurIPS 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression
of Pre-Trained Transformers", arXiv:2002.10957), on the last layer of each model:
  attention  mean over heads and queries of KL(A_T || A_S), A = softmax(Q K^T / sqrt(d_k)) over the keys;
  value      the same KL between value relations softmax(V V^T / sqrt(d_k)), per head.
Both compare head a of the teacher with head a of the student: the head counts must be equal.

MiniLMv2 (Wang et al., Findings of ACL 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for
Compressing Pretrained Transformers", arXiv:2012.15828): Q-Q, K-K and V-V relations. Each model's queries
(keys, values) of all heads are concatenated and split again into ``relation_heads`` heads of its own width,
R = softmax(X_r X_r^T / sqrt(d_r)); loss = sum over Q, K, V of the mean KL(R_T || R_S). Relations are T x T,
so teacher and student may differ in width and head count. ``teacher_layer`` picks the teacher's layer: the
paper uses the last for base-size teachers and an upper-middle one for large ones.

Relations use each model's own attention mask (causal models: a position and the ones before it). Q, K, V
come from the q/k/v projections by module path (kd_lab/algorithms/attention_capture.py); Llama's Q and K carry
their rotary positions, as the attention sees them.
"""

import math

from torch import Tensor, nn

from kd_lab.algorithms.attention_capture import AttentionCapture, head_relation, relation_kl, self_relation
from kd_lab.algorithms.base import Algorithm, StepOutputs
from kd_lab.core.bounds import AtLeastOne, NonNegative
from kd_lab.errors import KDLabError


class _LastAttention(Algorithm):
    """Taps one layer's q/k/v projections on each model (the student's ``student_layer``, the teacher's
    ``teacher_layer``)."""

    schemes = frozenset({"offline"})
    task_kinds = frozenset({"language_modeling"})

    def __init__(self, ce_weight: float, student_layer: int, teacher_layer: int):
        super().__init__(ce_weight)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.captures: tuple[AttentionCapture, AttentionCapture] | None = None
        self.layers = (student_layer, teacher_layer)

    @property
    def student_taps(self) -> list[str]:
        return self.captures[0].taps(self.layers[0]) if self.captures else []

    @property
    def teacher_taps(self) -> list[str]:
        return self.captures[1].taps(self.layers[1]) if self.captures else []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        s, t = AttentionCapture(student, "student", self.name), AttentionCapture(teacher, "teacher", self.name)
        s.require_same_mask(t)
        self.captures = (s, t)
        self.layers = (
            s.layer_index(self.student_layer, "student_layer"),
            t.layer_index(self.teacher_layer, "teacher_layer"),
        )
        self.check(s, t)

    def check(self, student: AttentionCapture, teacher: AttentionCapture) -> None:
        """Refuse a pair the method cannot compare (called at build time)."""


class MiniLM(_LastAttention):
    name = "minilm"

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        attention_weight: NonNegative = 1.0,
        value_weight: NonNegative = 1.0,
        student_layer: int = -1,
        teacher_layer: int = -1,
    ):
        super().__init__(ce_weight, student_layer, teacher_layer)
        self.attention_weight, self.value_weight = attention_weight, value_weight

    def check(self, student: AttentionCapture, teacher: AttentionCapture) -> None:
        student.require_heads(
            teacher,
            "MiniLM's attention and value terms compare",
            f"Give the student {teacher.heads} heads (student.model.num_heads={teacher.heads}), or use "
            "algorithm=minilmv2, whose relation heads do not depend on the models' heads.",
        )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        student, teacher = self.captures
        q_s, k_s, v_s = student.heads_of(out.features, self.layers[0])
        q_t, k_t, v_t = (x.detach() for x in teacher.heads_of(out.teacher_features, self.layers[1]))
        mask = student.mask(out.batch["input"])
        if self.attention_weight:
            a_s, a_t = student.scores(q_s, k_s, self.layers[0]), teacher.scores(q_t, k_t, self.layers[1])
            terms["attention"] = self.attention_weight * relation_kl(a_t, a_s, mask)
        if self.value_weight:
            terms["value"] = self.value_weight * relation_kl(head_relation(v_t), head_relation(v_s), mask)
        return terms


class MiniLMv2(_LastAttention):
    name = "minilmv2"

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        relation_heads: AtLeastOne = 4,
        qq_weight: NonNegative = 1.0,
        kk_weight: NonNegative = 1.0,
        vv_weight: NonNegative = 1.0,
        student_layer: int = -1,
        teacher_layer: int = -1,
    ):
        super().__init__(ce_weight, student_layer, teacher_layer)
        self.relation_heads = relation_heads
        self.weights = {"qq": qq_weight, "kk": kk_weight, "vv": vv_weight}

    def check(self, student: AttentionCapture, teacher: AttentionCapture) -> None:
        widths = {
            (capture.role, what): heads * capture.head_dim
            for capture in (student, teacher)
            for what, heads in (("queries", capture.heads), ("keys and values", capture.kv_heads))
        }
        for (role, what), width in widths.items():
            if width % self.relation_heads:
                raise KDLabError(
                    f"algorithm.relation_heads={self.relation_heads} does not divide the {role}'s {what} width "
                    f"{width}: each relation head takes width / relation_heads features. Pick a divisor of every "
                    f"width ({sorted(set(widths.values()))}), e.g. algorithm.relation_heads="
                    f"{suggested_relation_heads(list(widths.values()))}."
                )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        student, teacher = self.captures
        s_qkv = student.queries_keys(out.features, self.layers[0])
        t_qkv = teacher.queries_keys(out.teacher_features, self.layers[1])
        mask = student.mask(out.batch["input"])
        for (key, weight), x_s, x_t in zip(self.weights.items(), s_qkv, t_qkv, strict=True):
            if weight:
                r_s = self_relation(x_s, self.relation_heads)
                r_t = self_relation(x_t.detach(), self.relation_heads)
                terms[key] = weight * relation_kl(r_t, r_s, mask)
        return terms


def suggested_relation_heads(widths: list[int]) -> int:
    """The most relation heads that divide every width and keep each head at least 16 wide (MiniLMv2's 48
    heads of a 768-wide BERT-base are 16 wide), or 1."""
    common, narrowest = math.gcd(*widths), min(widths)
    return max((d for d in range(1, common + 1) if common % d == 0 and narrowest // d >= 16), default=1)
