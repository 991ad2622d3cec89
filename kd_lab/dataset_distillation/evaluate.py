"""Train a fresh model on a set, from scratch, and measure its test accuracy.

The recipe is DC's evaluation (SGD, momentum 0.9, weight decay 5e-4, learning rate 0.01 divided by 10
halfway), counted in optimizer steps instead of epochs. 300 epochs of a set of at most 256 examples are 300
steps. The full split gets its own count (``eval.full_steps``): 300 steps are ~21 of its epochs, too few
to converge, and the baseline would look worse than it is.
"""

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lab.dataset_distillation.synthesis import ModelFactory


def train_from_scratch(
    make_model: ModelFactory,
    seed: int,
    x: Tensor,
    y: Tensor,
    steps: int = 300,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
) -> torch.nn.Module:
    """A model of ``make_model(seed)`` trained for ``steps`` SGD steps on ``(x, y)`` (no augmentation)."""
    model = make_model(seed)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps // 2], gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    batch = min(batch_size, len(y))
    order, pos = torch.randperm(len(y), generator=g), 0
    for _ in range(steps):
        if pos + batch > len(y):  # a new epoch: reshuffle, and use full batches only
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    model.eval()
    starts = range(0, len(y), batch_size)
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in starts)
    return correct / len(y)


def evaluate_set(
    make_model: ModelFactory, seed: int, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, **recipe
) -> dict:
    """Test accuracy of a model trained from scratch on ``(x, y)``, with the seconds it took."""
    start = time.perf_counter()
    model = train_from_scratch(make_model, seed, x, y, **recipe)
    steps = recipe.get("steps", 300)
    return {
        "acc": accuracy(model, x_test, y_test),
        "train_size": len(y),
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }
