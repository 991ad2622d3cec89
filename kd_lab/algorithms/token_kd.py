"""Token-level distillation of language models with the divergences of the LM-distillation literature.

    loss = ce_weight * CE(s, y) + kd_weight * sum_tokens D(p_T, p_S) / (valid tokens of the global batch)

``divergence`` (kd_lab/losses/divergences.py, docs/token-losses.md):
  forward_kl  KL(p_T || p_S): Hinton's soft targets on every position (DistilBERT, DistilGPT2);
  reverse_kl  KL(p_S || p_T): mode seeking (MiniLLM, Gu et al. 2024);
  jsd         generalized JSD with ``beta`` (GKD, Agarwal et al. 2024; beta=0 is forward KL, 1 reverse KL);
  tvd         total variation 0.5 * sum |p_T - p_S| (DistillKit; Wen et al. 2023);
  skew_kl     KL(p_T || a p_T + (1 - a) p_S), ``alpha`` a = 0.1 (DistiLLM, Ko et al. 2024);
  skew_rkl    KL(p_S || a p_S + (1 - a) p_T) (DistiLLM; the paper's best on instruction data).
``temperature`` divides both logits; the term is multiplied by T^2. Recommended: T = 1 for LMs (GKD, DistiLLM),
ce_weight 0 or small (GKD uses only the divergence; DistilBERT 2.0 MLM CE against 5.0 soft targets).
``chunk_size`` walks the tokens in chunks (kd_lab/losses/chunked.py): no full-vocabulary float32 copy of both
distributions for all tokens at once; None computes it in one piece.
Teacher logits from a top-k store (perf.view_store_topk, docs/lm-topk-store.md) use the sparse form of the
same divergence (kd_lab/losses/sparse.py): the k stored ids plus one tail bucket; chunk_size is then unused.
"""

from torch import Tensor

from kd_lab.algorithms.base import Algorithm, StepOutputs
from kd_lab.core.bounds import AtLeastOne, BelowOne, NonNegative, Positive, UnitInterval
from kd_lab.losses.divergences import check_divergence, token_divergence
from kd_lab.losses.sparse import sparse_token_divergence, support_of


class TokenKD(Algorithm):
    name = "token_kd"
    schemes = frozenset({"offline", "online"})
    task_kinds = frozenset({"language_modeling"})

    def __init__(
        self,
        divergence: str = "forward_kl",
        ce_weight: NonNegative = 0.0,
        kd_weight: NonNegative = 1.0,
        temperature: Positive = 1.0,
        beta: UnitInterval = 0.5,
        alpha: BelowOne = 0.1,
        chunk_size: AtLeastOne | None = None,
    ):
        super().__init__(ce_weight)
        check_divergence(divergence)
        self.divergence, self.kd_weight, self.temperature = divergence, kd_weight, temperature
        self.beta, self.alpha, self.chunk_size = beta, alpha, chunk_size

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        task = out.task
        mask = task.valid_positions(out.batch).flatten()
        support = support_of(out.teacher_logits)
        if support is not None:  # teacher logits from a top-k store: the divergence on its k ids + one tail bucket
            total = sparse_token_divergence(
                out.logits.flatten(0, -2),
                support.flat(),
                self.divergence,
                mask=mask,
                temperature=self.temperature,
                beta=self.beta,
                alpha=self.alpha,
            )
            terms[self.divergence] = self.kd_weight * total / task.token_normalizer(out.batch)
            return terms
        total = token_divergence(
            out.logits.flatten(0, -2),
            out.teacher_logits.flatten(0, -2),
            self.divergence,
            mask=mask,
            temperature=self.temperature,
            beta=self.beta,
            alpha=self.alpha,
            chunk_size=self.chunk_size,
        )
        terms[self.divergence] = self.kd_weight * total / task.token_normalizer(out.batch)
        return terms
