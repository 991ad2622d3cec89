"""The Learning without Forgetting objective (Li & Hoiem 2016, eq. 2), on one batch of the new task:

    L = CE(new head, label) + lambda_o * sum_k T^2 * KL(softmax(y_k / T) || softmax(yhat_k / T))

``yhat_k``: old head k of the current model; ``y_k``: the same head's outputs recorded from the model as it was
before this task (the paper's y_o). The paper writes a cross-entropy against the recorded soft labels; it
differs from the KL by their entropy, a constant, so the gradients are the same. The T^2 factor is the shared
KD term's (kd_lab/algorithms/soft_targets.py, Hinton et al. 2015): it keeps the soft-label gradients on the
scale of the hard-label ones. The paper sums the old tasks' losses, one lambda_o for each.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kd_lab.algorithms.soft_targets import kd_loss


def lwf_terms(
    new_logits: Tensor,
    target: Tensor,
    old_logits: Sequence[Tensor],
    recorded: Sequence[Tensor],
    lambda_o: float,
    temperature: float,
) -> dict[str, Tensor]:
    """``{"ce": ..., "old": ...}``: the new task's cross-entropy and the weighted sum of the old heads' KD
    terms (zero without old heads). Their sum is the loss."""
    ce = F.cross_entropy(new_logits, target)
    old = new_logits.new_zeros(())
    for current, before in zip(old_logits, recorded, strict=True):
        old = old + kd_loss(current, before, temperature)
    return {"ce": ce, "old": lambda_o * old}
