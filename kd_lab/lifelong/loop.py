"""The task sequence, trained in plain PyTorch: lwf, finetune and joint, with the test accuracy matrix.

Why not Lightning: a sequence is several fits of one model, each with its own frozen copy, optimizer and
warm-up phase, and the tensors are small enough to slice in memory. A loop of ~100 lines says it more
plainly than callbacks over Lightning's loop would. The data module, the models, the seeding, the thread
setting and the KD term are kd-lab's.

One task t of lwf or finetune:
1. lwf only: record the old heads' outputs on task t's training inputs (model in eval mode, before any
   update): the paper's y_o. The model does not change between the record and the start of training.
2. warm-up (t > 0, ``warmup_epochs``): only the new head learns; trunk and old heads are frozen, and the trunk
   stays in eval mode so that its BatchNorm statistics do not move either.
3. joint phase (``epochs_per_task``): trunk, old heads and new head learn together on
   CE + lambda_o * KD (finetune: lambda_o = 0; its old heads then get no gradient).
A fresh optimizer serves each phase: Adam's moments from another loss would only mislead it.
joint learns every task at once, for ``warmup_epochs + epochs_per_task`` epochs over the union of the tasks'
data: as many samples seen as a sequence, a few more batches; it is the upper bound.
"""

import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.lifelong.config import Settings
from kd_lab.lifelong.loss import lwf_terms
from kd_lab.lifelong.model import MultiHeadNet

log = logging.getLogger(__name__)
Subsets = list[tuple[Tensor, Tensor]]


def batches(n: int, size: int, g: torch.Generator, limit: int | None) -> Iterator[Tensor]:
    """Index batches of one shuffled epoch (the last one may be smaller), at most ``limit`` of them."""
    order = torch.randperm(n, generator=g)
    for k, i in enumerate(range(0, n, size)):
        if limit is not None and k >= limit:
            return
        yield order[i : i + size]


@torch.no_grad()
def accuracy(model: MultiHeadNet, x: Tensor, y: Tensor, task: int, batch_size: int) -> float:
    """Task-incremental accuracy: the task's own head decides among the task's classes."""
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size], task).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(y), batch_size)
    )
    return correct / len(y)


@torch.no_grad()
def record_old_heads(model: MultiHeadNet, x: Tensor, tasks: int, batch_size: int) -> list[Tensor]:
    """The outputs of heads 0..tasks-1 on ``x``, as the model is now (eval mode)."""
    model.eval()
    parts = [model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    z = torch.cat(parts) if parts else x.new_zeros((0,))
    return [model.heads[k](z) for k in range(tasks)]


class TaskSequence:
    """One run of a method over the task sequence; ``run()`` returns the accuracy matrix."""

    def __init__(
        self,
        model: MultiHeadNet,
        train: Subsets,
        test: Subsets,
        settings: Settings,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        batch_size: int,
        eval_batch_size: int,
    ):
        self.model, self.train, self.test, self.s = model, train, test, settings
        self.make_optimizer = make_optimizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.g = torch.Generator().manual_seed(settings.seed)  # batch orders: a function of the seed alone
        self.steps = 0

    def evaluate(self, seen: int) -> list[float | None]:
        """The test accuracy of every task seen so far (None for the tasks to come)."""
        n = len(self.test)
        return [accuracy(self.model, *self.test[j], j, self.eval_batch_size) if j < seen else None for j in range(n)]

    def run(self) -> list[list[float | None]]:
        if self.s.method == "joint":
            self.learn_jointly()
            return [self.evaluate(len(self.test))]
        matrix = []
        for t in range(len(self.train)):
            self.learn_task(t)
            matrix.append(self.evaluate(t + 1))
            seen = [f"{a:.3f}" for a in matrix[-1] if a is not None]
            log.info("after task %d: test accuracy per task %s", t, seen)
        return matrix

    def _step(self, optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.steps += 1

    def learn_task(self, t: int) -> None:
        model, s = self.model, self.s
        x, y = self.train[t]
        use_kd = s.method == "lwf" and t > 0
        recorded = record_old_heads(model, x, t, self.eval_batch_size) if use_kd else []
        if t > 0 and s.warmup_epochs:
            model.eval()  # the frozen trunk keeps its BatchNorm statistics too
            optimizer = self.make_optimizer(list(model.heads[t].parameters()))
            for _ in range(s.warmup_epochs):
                for idx in batches(len(y), self.batch_size, self.g, s.limit_batches):
                    with torch.no_grad():
                        z = model.features(x[idx])
                    self._step(optimizer, F.cross_entropy(model.heads[t](z), y[idx]))
        optimizer = self.make_optimizer(list(model.trunk.parameters()) + list(model.heads[: t + 1].parameters()))
        model.train()
        for _ in range(s.epochs):
            for idx in batches(len(y), self.batch_size, self.g, s.limit_batches):
                z = model.features(x[idx])
                if use_kd:
                    old = [model.heads[k](z) for k in range(t)]
                    terms = lwf_terms(model.heads[t](z), y[idx], old, [r[idx] for r in recorded], s.lambda_o,
                                      s.temperature)  # fmt: skip
                    loss = terms["ce"] + terms["old"]
                else:
                    loss = F.cross_entropy(model.heads[t](z), y[idx])
                self._step(optimizer, loss)

    def learn_jointly(self) -> None:
        model, s = self.model, self.s
        x = torch.cat([x for x, _ in self.train])
        y = torch.cat([y for _, y in self.train])
        task = torch.cat([torch.full_like(y, k) for k, (_, y) in enumerate(self.train)])
        optimizer = self.make_optimizer(list(model.parameters()))
        model.train()
        for _ in range(s.warmup_epochs + s.epochs):
            for idx in batches(len(y), self.batch_size, self.g, s.limit_batches):
                z = model.features(x[idx])
                # every sample's own head; the sum over tasks divided by the batch: the batch mean
                loss = z.new_zeros(())
                for k in task[idx].unique().tolist():
                    mine = task[idx] == k
                    loss = loss + F.cross_entropy(model.heads[k](z[mine]), y[idx][mine], reduction="sum")
                self._step(optimizer, loss / len(idx))
