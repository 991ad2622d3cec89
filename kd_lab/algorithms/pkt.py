"""Learning Deep Representations with Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018),
https://arxiv.org/abs/1803.10837

The student matches the teacher's distribution of pairwise similarities over the batch, not its features, so
the two widths may differ. With the cosine-similarity kernel K(a, b) = (cos(a, b) + 1) / 2 on the embeddings,
the conditional probabilities are p_{j|i} = K(e_i, e_j) / sum_j K(e_i, e_j) (self-pairs included, as in the
reference code) and
    loss = ce_weight * CE + pkt_weight * mean_{i,j} p^t_{j|i} log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))
(the KL divergences of the b conditional distributions, averaged over the b^2 entries as in the authors' and
RepDistiller's code, so the weight absorbs a 1/b).
Recommended: pkt_weight 30000, eps 1e-7, ce 1, no Hinton term (RepDistiller / CRD benchmark, ``-a 0 -b 30000``),
on the penultimate embedding.
"""

from torch import Tensor

from kd_lab.algorithms.base import StepOutputs
from kd_lab.algorithms.taps import OneTapPair
from kd_lab.core.bounds import NonNegative, Positive
from kd_lab.core.recorder import TapSpec


def cosine_conditional_probabilities(features: Tensor, eps: float = 1e-7) -> Tensor:
    """(b, D) -> (b, b): row i is p_{.|i} under the kernel (cos + 1) / 2."""
    f = features / (features.norm(dim=1, keepdim=True) + eps)
    kernel = (f @ f.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student_features: Tensor, teacher_features: Tensor, eps: float = 1e-7) -> Tensor:
    p_s = cosine_conditional_probabilities(student_features, eps)
    p_t = cosine_conditional_probabilities(teacher_features, eps)
    return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()


class PKT(OneTapPair):
    name = "pkt"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        pkt_weight: NonNegative = 30000.0,
        eps: Positive = 1e-7,
        student_tap: TapSpec = "embedding",
        teacher_tap: TapSpec = "embedding",
    ):
        super().__init__(ce_weight, student_tap, teacher_tap)
        self.pkt_weight, self.eps = pkt_weight, eps

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        terms["pkt"] = self.pkt_weight * pkt_loss(*self.pair(out), eps=self.eps)
        return terms
