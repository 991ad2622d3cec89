"""TinyBERT (Jiao et al., Findings of EMNLP 2020, "TinyBERT: Distilling BERT for Natural Language
Understanding", arXiv:1909.10351).

Stage 1, intermediate-layer distillation, on each (student layer m, teacher layer g(m)) of the layer mapping
(kd_lab/algorithms/layer_map.py, "uniform" by default: g(m) = m N / M):
  embedding  MSE(E_S W_e, E_T)                     W_e learned, student width -> teacher width;
  hidden     sum over pairs MSE(H_S^m W_h^m, H_T^g(m))   one learned W_h per pair;
  attention  sum over pairs MSE(A_S^m, A_T^g(m))         pre-softmax scores per head, masked positions 0.
Stage 2, prediction-layer distillation:
  prediction soft cross-entropy -sum softmax(z_T / t) log_softmax(z_S / t), per token (no t^2 factor,
             as the reference code).
``stage``: "intermediate" (stage 1), "prediction" (stage 2) or "both" (one run with every term).
``chain=tinybert`` runs stage 1, then the run itself as stage 2 starting from stage 1's student
(conf/chain/tinybert.yaml, kd_lab/run/chain.py). On ``task=sequence_classification`` (the paper's
task-specific distillation) stage 2's soft cross-entropy is on the class logits, averaged over the batch.

The reference code (huawei-noah/Pretrained-Language-Model, TinyBERT/) shares one projection for every layer,
embeddings included; the paper writes W_e and W_h. Here each pair has its own, as the paper's notation reads.
Attention scores and the mask come from the q/k/v projections (kd_lab/algorithms/attention_capture.py).
"""

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.attention_capture import AttentionCapture, at_least_float32, masked_scores
from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.layer_map import count_layers, layer_pairs
from kd_lab.core.bounds import NonNegative, Positive
from kd_lab.errors import KDLabError

STAGES = ("intermediate", "prediction", "both")
# The module whose output is the embedding layer's output (token + position embeddings), per architecture.
EMBEDDINGS = {"gpt2": "transformer.drop", "bert": "bert.embeddings", "llama": "model.embed_tokens"}


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Sum over positions of -sum_v softmax(z_T / t)_v log_softmax(z_S / t)_v; ``mask`` keeps positions.
    Logits are (N, V); the caller divides by the token count."""
    log_s = (at_least_float32(student_logits) / temperature).log_softmax(-1)
    p_t = (at_least_float32(teacher_logits) / temperature).softmax(-1)
    per_token = -(p_t * log_s).sum(-1)
    return per_token[mask].sum() if mask is not None else per_token.sum()


def attention_mse(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None) -> Tensor:
    """MSE of the masked pre-softmax scores, averaged over every entry (the reference code's MSELoss)."""
    student_scores, teacher_scores = at_least_float32(student_scores), at_least_float32(teacher_scores)
    return F.mse_loss(masked_scores(student_scores, mask), masked_scores(teacher_scores, mask))


class TinyBERT(Algorithm):
    name = "tinybert"
    schemes = frozenset({"offline"})
    task_kinds = frozenset({"language_modeling", "sequence_classification"})

    def __init__(
        self,
        stage: str = "both",
        mapping: str | list = "uniform",
        ce_weight: NonNegative = 0.0,
        embedding_weight: NonNegative = 1.0,
        hidden_weight: NonNegative = 1.0,
        attention_weight: NonNegative = 1.0,
        prediction_weight: NonNegative = 1.0,
        temperature: Positive = 1.0,
    ):
        super().__init__(ce_weight)
        if stage not in STAGES:
            raise KDLabError(f"algorithm.stage={stage!r} is not one of {list(STAGES)}.")
        self.stage, self.mapping, self.temperature = stage, mapping, temperature
        self.embedding_weight, self.hidden_weight = embedding_weight, hidden_weight
        self.attention_weight, self.prediction_weight = attention_weight, prediction_weight
        self.pairs: list[tuple[int, int]] = []
        self.paths: dict[str, tuple[str, str]] = {}  # "embedding", "hidden<m>": (student path, teacher path)
        self.captures: tuple[AttentionCapture, AttentionCapture] | None = None
        self.projections = nn.ModuleDict()  # "embedding", "hidden<m>": W_e, W_h^m

    @property
    def intermediate(self) -> bool:
        return self.stage in ("intermediate", "both")

    @property
    def student_taps(self) -> list[str]:
        return self._taps(0)

    @property
    def teacher_taps(self) -> list[str]:
        return self._taps(1)

    def _taps(self, side: int) -> list[str]:
        taps = [pair[side] for pair in self.paths.values()]
        if self.captures is not None and self.attention_weight:
            for pair in self.pairs:
                taps += self.captures[side].taps(pair[side])
        return taps

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if not self.intermediate:  # stage 2 reads the logits only: any two language models
            return
        captures = (AttentionCapture(student, "student", self.name), AttentionCapture(teacher, "teacher", self.name))
        if self.attention_weight:
            captures[0].require_same_mask(captures[1])
            captures[0].require_heads(
                captures[1],
                "the attention-score term compares",
                f"Give the student {captures[1].heads} heads (student.model.num_heads={captures[1].heads}), "
                "or drop the term (algorithm.attention_weight=0), or use algorithm=minilmv2, whose relation "
                "heads do not depend on the models' heads.",
            )
        self.captures = captures
        self.pairs = layer_pairs(count_layers(student), count_layers(teacher), self.mapping)
        if self.embedding_weight:
            arch = (captures[0].layout.arch, captures[1].layout.arch)
            self.paths["embedding"] = (EMBEDDINGS[arch[0]], EMBEDDINGS[arch[1]])
        if self.hidden_weight:
            for m, n in self.pairs:
                self.paths[f"hidden{m}"] = (captures[0].blocks[m], captures[1].blocks[n])

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        for key, (s_path, t_path) in self.paths.items():
            s_shape, t_shape = student_shapes[s_path], teacher_shapes[t_path]
            if len(s_shape) != 3 or s_shape[:2] != t_shape[:2]:
                raise KDLabError(
                    f"algorithm=tinybert needs (batch, tokens, hidden) states of the same length at {s_path} "
                    f"(student) and {t_path} (teacher); got {tuple(s_shape)} and {tuple(t_shape)}."
                )
            self.projections[key] = nn.Linear(s_shape[-1], t_shape[-1])  # W_e / W_h: student -> teacher width

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        if self.intermediate:
            terms.update(self._intermediate(out))
        if self.stage in ("prediction", "both") and self.prediction_weight:
            mask, count = out.positions()
            total = soft_cross_entropy(
                out.logits.flatten(0, -2),
                out.teacher_logits.flatten(0, -2),
                None if mask is None else mask.flatten(),
                self.temperature,
            )
            terms["prediction"] = self.prediction_weight * total / count
        return terms

    def _intermediate(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = {}
        f_s, f_t = out.features, out.teacher_features
        if "embedding" in self.paths:
            s_path, t_path = self.paths["embedding"]
            terms["embedding"] = self.embedding_weight * F.mse_loss(
                self.projections["embedding"](f_s[s_path]), f_t[t_path].detach()
            )
        hidden = [
            F.mse_loss(self.projections[key](f_s[s_path]), f_t[t_path].detach())
            for key, (s_path, t_path) in self.paths.items()
            if key != "embedding"
        ]
        if hidden:
            terms["hidden"] = self.hidden_weight * sum(hidden)
        if self.attention_weight:
            student, teacher = self.captures
            mask = student.mask(out.batch["input"])
            scores = []
            for m, n in self.pairs:
                q_s, k_s, _ = student.heads_of(f_s, m)
                q_t, k_t, _ = teacher.heads_of(f_t, n)
                s, t = student.scores(q_s, k_s, m), teacher.scores(q_t, k_t, n).detach()
                scores.append(attention_mse(s, t, mask))
            terms["attention"] = self.attention_weight * sum(scores)
        return terms
