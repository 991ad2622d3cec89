"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang, CVPR 2022), https://arxiv.org/abs/2203.08679

Hinton's KD loss splits into a target-class term and a non-target-class term; DKD weights them separately.
With p = softmax(z / T), the binary distribution b = [p_y, 1 - p_y] and the distribution over the other
classes p^ = softmax(z_{!y} / T) (the target column removed):
    TCKD = T^2 * KL(b^t || b^s)          NCKD = T^2 * KL(p^t || p^s)      (batch means)
    loss = ce_weight * CE + w(epoch) * (alpha * TCKD + beta * NCKD)
    w(epoch) = min(1, (epoch + 1) / warmup_epochs)   (1 when warmup_epochs = 0)
``epoch`` counts from 0 (Lightning's ``current_epoch``), so w reaches 1 at epoch warmup_epochs - 1, as in
mdistiller, whose epochs count from 1 and which uses min(epoch / warmup, 1). The module sets it through
``on_epoch_start(epoch, max_epochs)`` (``self.epoch``; 0 until then, so w = 1 / warmup_epochs, never 0).
With mixup, both terms are computed for each of the two labels and mixed with ``mix_lam``, as the CE is.

Recommended (paper / mdistiller, CIFAR-100): alpha 1, beta 8 (2-8 depending on the pair), T 4, ce_weight 1,
warm-up 20 of 240 epochs; ImageNet: alpha 1, beta 0.5, T 1. kd-lab's default run is 300 epochs, so the default
warm-up is mdistiller's 20 (about the same fraction of the run); for short runs use ~max_epochs / 12.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lab.algorithms.base import Algorithm, StepOutputs
from kd_lab.core.bounds import NonNegative, NonNegativeInt, Positive
from kd_lab.errors import KDLabError


def _split_logits(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Logits already divided by T -> (log b (B, 2), log p^ (B, K-1)): the log-probabilities of [target, not
    target], and the log-softmax over the non-target classes (the target column removed, not masked)."""
    b, k = logits.shape
    gt = logits.gather(1, target[:, None])  # (B, 1)
    others = logits.masked_select(~F.one_hot(target, k).bool()).view(b, k - 1)
    lse_all = logits.logsumexp(1, keepdim=True)
    log_binary = torch.cat([gt - lse_all, others.logsumexp(1, keepdim=True) - lse_all], dim=1)
    return log_binary, F.log_softmax(others, dim=1)


def _kl_rows(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    """Per-sample KL(p_t || p_s) from log-probabilities, (B,)."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)


def dkd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float,
    lam: Tensor | None = None,
    target_mix: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), unweighted, each T^2 * KL averaged over the batch. With ``lam`` / ``target_mix`` (mixup),
    per sample lam * term(target) + (1 - lam) * term(target_mix)."""
    if student_logits.shape[1] < 2:
        raise KDLabError("algorithm=dkd needs at least 2 classes (it splits the target class from the others).")

    def per_sample(y: Tensor) -> tuple[Tensor, Tensor]:
        bin_s, oth_s = _split_logits(student_logits / temperature, y)
        bin_t, oth_t = _split_logits(teacher_logits / temperature, y)
        return _kl_rows(bin_s, bin_t), _kl_rows(oth_s, oth_t)

    tckd, nckd = per_sample(target)
    if lam is not None:
        tckd_mix, nckd_mix = per_sample(target_mix)
        tckd, nckd = lam * tckd + (1 - lam) * tckd_mix, lam * nckd + (1 - lam) * nckd_mix
    return tckd.mean() * temperature**2, nckd.mean() * temperature**2


class DKD(Algorithm):
    name = "dkd"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        alpha: NonNegative = 1.0,
        beta: NonNegative = 8.0,
        temperature: Positive = 4.0,
        warmup_epochs: NonNegativeInt = 20,
    ):
        super().__init__(ce_weight)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup_epochs = warmup_epochs
        self.epoch = 0  # the current training epoch, from 0; set by on_epoch_start

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:
        self.epoch = epoch

    @property
    def warmup_factor(self) -> float:
        """min(1, (epoch + 1) / warmup_epochs): 1 / warmup_epochs at epoch 0, 1 from epoch warmup_epochs - 1."""
        return 1.0 if self.warmup_epochs == 0 else min(1.0, (self.epoch + 1) / self.warmup_epochs)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        batch = out.batch
        tckd, nckd = dkd_terms(
            out.logits,
            out.teacher_logits.detach(),
            batch["target"],
            self.temperature,
            batch.get("mix_lam"),
            batch.get("target_mix"),
        )
        w = self.warmup_factor
        terms["tckd"] = w * self.alpha * tckd
        terms["nckd"] = w * self.beta * nckd
        return terms
