"""The training loss's bookkeeping without a host sync or a Lightning call per step.

A distillation step on a small model takes 1-3 ms; one ``self.log`` costs ~0.1-0.3 ms of Lightning's
result-collection work and each ``bool(tensor)`` on a GPU waits for the device. So the step only stacks the
loss and its terms into one detached vector on the device; ``EpochSums`` adds it to a running sum (the epoch
means are logged once, as Lightning's ``on_epoch=True`` would have computed them: the batch-size weighted
mean, reduced across DDP ranks by Lightning), and ``FiniteGuard`` checks for a non-finite loss every
``every`` steps and at the end of every epoch, before validation and checkpoints, naming the first bad step
and its terms exactly as a per-step check would.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from kd_lab.errors import NonFiniteLossError


@torch.no_grad()
def stack_terms(loss: Tensor, terms: dict[str, Tensor]) -> Tensor:
    """``[loss, *terms]`` as one float vector outside autograd (one op, no sync)."""
    return torch.stack([loss, *terms.values()]).float()


class EpochSums:
    """Batch-size weighted sums of ``[loss, *terms]`` per metric prefix and term names."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, tuple[str, ...]], Tensor] = {}
        self.counts: dict[tuple[str, tuple[str, ...]], int] = {}

    def add(self, prefix: str, names: tuple[str, ...], values: Tensor, n: int) -> None:
        key = (prefix, names)
        if key in self.sums:
            self.sums[key].add_(values, alpha=n)
            self.counts[key] += n
        else:
            self.sums[key] = values * n
            self.counts[key] = n

    def pop_means(self) -> dict[str, tuple[Tensor, int]]:
        """``{metric name: (epoch mean, number of samples)}``, and a fresh start."""
        totals: dict[str, tuple[Tensor, int]] = {}
        for (prefix, names), total in self.sums.items():
            n = self.counts[(prefix, names)]
            for i, name in enumerate((prefix, *(f"{prefix}_{t}" for t in names))):
                previous, m = totals.get(name, (0.0, 0))
                totals[name] = (previous + total[i], m + n)
        self.sums, self.counts = {}, {}
        return {name: (total / n, n) for name, (total, n) in totals.items()}


@dataclass
class _Step:
    epoch: int
    step: int
    names: tuple[str, ...]
    values: Tensor  # [loss, *terms]


class FiniteGuard:
    """Raise ``NonFiniteLossError`` for the first step whose loss is not finite, checked every ``every``
    steps (``every=1``: at once) and whenever ``check()`` is called (the end of an epoch). ``role``: whose
    training it watches, ``"student"`` (the run, ``optim.*``) or ``"teacher"`` (the teacher store training a
    teacher, ``teacher.optim.*``): the message names that model and its recipe."""

    def __init__(self, every: int = 1, role: str = "student"):
        self.every = max(1, int(every))
        self.role = role
        self.pending: list[_Step] = []

    def watch(self, epoch: int, step: int, names: tuple[str, ...], values: Tensor, loss: Tensor) -> None:
        if self.every == 1 and bool(torch.isfinite(loss)):  # the common case, one op: nothing to keep
            return
        self.pending.append(_Step(epoch, step, names, values))
        if len(self.pending) >= self.every:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        losses = torch.stack([p.values[0] for p in pending])
        finite = torch.isfinite(losses)
        if bool(finite.all()):  # the one host sync per check
            return
        first = pending[int((~finite).nonzero()[0])]
        values = first.values[1:].tolist()
        bad = [(name, v) for name, v in zip(first.names, values, strict=True) if not torch.isfinite(torch.tensor(v))]
        raise NonFiniteLossError(non_finite_message(self.role, first.epoch, first.step, bad))


def non_finite_message(role: str, epoch: int, step: int, bad: list[tuple[str, float]]) -> str:
    """The one sentence of a non-finite loss: where, which terms, and the recipe to change (the student's
    ``optim.*``, or the teacher's own ``teacher.optim.*`` while the teacher store trains it)."""
    terms = f"term(s) {[b[0] for b in bad]} = {[b[1] for b in bad]}"
    epoch += 1  # ``epoch`` is Lightning's, from 0; users read epochs from 1 (docs/reliability.md)
    if role == "student":
        return (
            f"non-finite loss at epoch {epoch}, step {step}: {terms}. Lower the learning rate "
            "(optim.optimizer.lr) or that term's weight; checkpoints and logs written so far are kept."
        )
    return (
        f"non-finite loss while training the {role} (the teacher store trains it before the student) at epoch "
        f"{epoch}, step {step}: {terms}. The {role}'s own recipe diverged: lower {role}.optim.optimizer.lr (or "
        f"change {role}.optim.*; optim.* is the student's); no teacher-store entry was written."
    )
