"""Learning-rate schedules as per-step multipliers, built once the run length is known.

Each factory takes ``(optimizer, total_epochs, steps_per_epoch)`` plus its own config arguments, so one
schedule config serves a teacher and a student trained for different numbers of epochs.
"""

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine(optimizer: Optimizer, total_epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to zero at the last step."""
    total = max(1, total_epochs * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return LambdaLR(optimizer, factor)


def multistep(
    optimizer: Optimizer, total_epochs: int, steps_per_epoch: int, milestones: Sequence[int] = (), gamma: float = 0.1
) -> LambdaLR:
    """Multiply the rate by ``gamma`` at each milestone epoch (the CIFAR recipe: 150, 180, 210 of 240)."""
    return LambdaLR(optimizer, lambda step: gamma ** sum(step // steps_per_epoch >= m for m in milestones))


def constant(optimizer: Optimizer, total_epochs: int, steps_per_epoch: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: 1.0)
