"""The hand-written PyTorch loops that ``kd-lab-bench`` holds kd-lab against.

Each loop does what a careful researcher would write by hand for the same run: the same models, data
tensors, batch size, optimizer, per-step schedule, loss and augmentation, one ``.item()`` per epoch, a
validation pass, and a checkpoint (model, optimizer and schedule state; ``last`` every epoch, ``best`` when
validation accuracy improves), which is what kd-lab's default callbacks write. Nothing else: no logging, no
metric objects, no NaN guard. Their per-epoch time is the floor the framework is measured against.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from kd_lab.algorithms.kd import kd_loss
from kd_lab.core.tasks import cross_entropy

Batch = dict[str, Tensor]


@dataclass
class PlainRun:
    """One plain training run: its models, optimizer, schedule and where it checkpoints."""

    student: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: Batch  # the training split's tensors (already on the run's device)
    val: Batch
    batch_size: int
    eval_batch_size: int
    ckpt_dir: Path
    teacher: nn.Module | None = None  # None: the vanilla student (cross-entropy only), unless teacher_logits
    teacher_logits: Tensor | None = None  # the teacher's logits for every training index, computed once
    kd: tuple[float, float, float] = (0.1, 0.9, 4.0)  # ce_weight, kd_weight, temperature
    augment: Callable[[Batch, torch.Generator], Batch] | None = None
    finish_augment: Callable[[Batch], Batch] | None = None  # the on-device half of a CIFAR augmentation
    seed: int = 0
    autocast: torch.dtype | None = None  # torch.bfloat16: mixed precision
    channels_last: bool = False
    loader: Callable[[int], Iterator[Batch]] | None = None  # a DataLoader-fed run: epoch -> batches on device
    best: float = -1.0
    epochs_done: int = 0
    times: list[dict[str, float]] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sliced_batches(run: PlainRun, epoch: int) -> Iterator[Batch]:
    """One permutation per epoch and a gather per batch, on the tensors' device."""
    g = torch.Generator().manual_seed(run.seed * 100_003 + epoch)
    n = len(run.train["target"])
    order = torch.randperm(n, generator=g).to(run.train["target"].device)
    for i in range(n // run.batch_size):
        idx = order[i * run.batch_size : (i + 1) * run.batch_size]
        batch = {key: t[idx] for key, t in run.train.items()}
        yield run.augment(batch, g) if run.augment else batch


def _autocast(run: PlainRun, device: torch.device):
    return torch.autocast(device.type, dtype=run.autocast) if run.autocast else nullcontext()


def train_epoch(run: PlainRun) -> float:
    """One training epoch; returns the mean loss (one host sync, at the end)."""
    device = run.train["target"].device
    run.student.train()
    total, steps = torch.zeros((), device=device), 0
    batches = run.loader(run.epochs_done) if run.loader else _sliced_batches(run, run.epochs_done)
    ce_w, kd_w, temperature = run.kd
    for batch in batches:
        if run.finish_augment:
            batch = run.finish_augment(batch)
        x = batch["input"]
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(run, device):
            if run.teacher is not None or run.teacher_logits is not None:
                if run.teacher_logits is not None:
                    t_logits = run.teacher_logits.index_select(0, batch["index"])
                else:
                    with torch.no_grad():
                        t_logits = run.teacher(x)
                s_logits = run.student(x)
                loss = ce_w * cross_entropy(s_logits, batch) + kd_w * kd_loss(s_logits, t_logits, temperature)
            else:
                loss = cross_entropy(run.student(x), batch)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        total += loss.detach()
        steps += 1
    return float(total) / max(1, steps)


@torch.no_grad()
def validate(run: PlainRun) -> float:
    device = run.val["target"].device
    run.student.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = len(run.val["target"])
    for i in range(0, n, run.eval_batch_size):
        x, y = run.val["input"][i : i + run.eval_batch_size], run.val["target"][i : i + run.eval_batch_size]
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(run, device):
            correct += (run.student(x).argmax(-1) == y).sum()
    return int(correct) / max(1, n)


def checkpoint(run: PlainRun, acc: float) -> None:
    state = {
        "model": run.student.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "epoch": run.epochs_done,
    }
    torch.save(state, run.ckpt_dir / "last.pt")
    if acc > run.best:
        run.best = acc
        torch.save(state, run.ckpt_dir / "best.pt")


def run_epoch(run: PlainRun) -> dict[str, float]:
    """Train, validate, checkpoint; the seconds of the training part and of the whole epoch."""
    device = run.train["target"].device
    _sync(device)
    start = time.perf_counter()
    train_epoch(run)
    _sync(device)
    trained = time.perf_counter()
    checkpoint(run, validate(run))
    _sync(device)
    run.epochs_done += 1
    times = {"train": trained - start, "epoch": time.perf_counter() - start}
    run.times.append(times)
    return times
