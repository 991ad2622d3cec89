"""The temperature-scaled KD term (Hinton, Vinyals, Dean 2015), shared by every algorithm that uses it.

    kd_loss = T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the positions that count

Logits may have any leading axes: (B, K) for classification, (B, T, V) for tokens. A boolean ``mask`` over
the leading axes keeps the positions that count (real tokens). The T^2 factor keeps the soft-target
gradients on the same scale as the hard-label ones when T changes (their magnitude goes as 1/T^2).
"""

import torch.nn.functional as F
from torch import Tensor

from kd_lab.algorithms.base import StepOutputs


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(p_t || p_s) at temperature T, averaged over positions (``batchmean``: the true KL)."""
    s, t = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    if mask is not None:
        keep = mask.flatten()
        s, t = s[keep], t[keep]
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def kd_term(out: StepOutputs, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``kd_loss`` over the positions that the run's task counts. A task that counts tokens divides the sum
    by its normalizer (the global batch's valid tokens), as its label loss does; others take the batch mean."""
    task = out.task
    normalizer = task.token_normalizer(out.batch) if task is not None else None
    if normalizer is None:
        return kd_loss(student_logits, teacher_logits, temperature)
    keep = task.valid_positions(out.batch).flatten()
    s, t = student_logits.flatten(0, -2)[keep], teacher_logits.flatten(0, -2)[keep]
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl / normalizer * temperature**2
