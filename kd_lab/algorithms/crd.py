"""Contrastive Representation Distillation (Tian, Krishnan, Isola, ICLR 2020), https://arxiv.org/abs/1910.10699

The student's embedding of a sample should be closer to the teacher's embedding of the same sample than to the
teacher's embeddings of other samples, in the sense of noise-contrastive estimation (NCE). As in the authors'
RepDistiller code:
  * linear heads map the flattened student and teacher embeddings to ``feat_dim`` (128), L2-normalized
    (``embed_s``, ``embed_t``; trained with the student, the teacher itself stays frozen);
  * two memory banks (``memory_s``, ``memory_t``: ``num_train x feat_dim`` buffers, so they are checkpointed;
    uniform in +-1/sqrt(feat_dim/3) at start) hold a momentum average of each sample's normalized embedding,
    row i = training sample i (``batch["index"]``), updated after the loss with momentum ``nce_m``:
    row <- normalize(m * row + (1 - m) * v);
  * for each sample, the positive is its own row and ``nce_k`` negatives are rows of samples of OTHER classes
    (RepDistiller's "exact" mode; without replacement when a class's pool is large enough, else with);
  * scores p = exp(<memory row, v> / nce_t) / Z, Z = num_train * mean(first batch's scores) fixed on the first
    step (one Z per side, stored as a buffer ``z``); the NCE loss with noise probability 1 / num_train:
        L = -(1/b) sum_i [log(p_i+ / (p_i+ + k/N)) + sum_neg log((k/N) / (p_i- + k/N))]
    is applied to the student's embedding against the teacher bank and to the teacher's against the student
    bank, and the two are summed.
    loss = ce_weight * CE + crd_weight * (L_s + L_t) [+ kd_weight * T^2 KL(p_t^T || p_s^T), "CRD+KD"]
Recommended (CIFAR-100, RepDistiller): crd_weight 0.8, ce 1, no Hinton term (``-a 0 -b 0.8``); CRD+KD adds
Hinton's term with weight 1 at T = 4 (``-a 1 -b 0.8``; ``algorithm=crd_kd``); feat_dim 128,
nce_k 16384, nce_t 0.07, nce_m 0.5; these are the defaults. ``nce_k`` is capped at num_train - 1 (logged): on
MNIST-1D (3600 training samples) that is 3599 draws from the ~3240 samples of other classes, with replacement
as RepDistiller does when the pool is smaller than k. Scores are one (b, N) product with the whole bank and a
gather when N <= 4 (k + 1) (small data, CIFAR), else a gather of the k + 1 rows (ImageNet-sized banks).

Under DDP the banks are updated with the embeddings and indices of ALL ranks (``torch.distributed.all_gather``,
no autograd), and Z is averaged over ranks, so every rank holds the same banks; the loss uses the local batch.
"""

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import BuildContext, StepOutputs
from kd_lab.algorithms.embedding import flat_dim
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.algorithms.taps import OneTapPair
from kd_lab.core.bounds import AtLeastOne, BelowOne, NonNegative, Positive
from kd_lab.core.recorder import TapSpec
from kd_lab.errors import KDLabError

log = logging.getLogger(__name__)


class Embed(nn.Module):
    """Flatten, linear map to ``dim_out``, L2-normalize."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


def class_tables(targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Training indices sorted by class, and where each class starts in that order and how many it has."""
    order = torch.argsort(targets, stable=True)
    count = torch.bincount(targets)
    start = torch.cumsum(count, 0) - count
    return order, start, count


def sample_negatives(target: Tensor, k: int, order: Tensor, start: Tensor, count: Tensor) -> Tensor:
    """(b,) labels -> (b, k) training indices of samples of other classes, uniformly drawn: without replacement
    when the pool of other-class samples holds at least k, with replacement otherwise (RepDistiller's rule)."""
    n = len(order)
    lo, size = start[target], count[target]
    pool = n - size  # (b,)
    out = torch.empty(len(target), k, dtype=torch.long, device=target.device)
    exact = pool >= k
    if exact.any():  # the k smallest of iid uniform keys, with the sample's own class keyed out
        pos = torch.arange(n, device=target.device)
        keys = torch.rand(int(exact.sum()), n, device=target.device)
        same = (pos >= lo[exact, None]) & (pos < (lo + size)[exact, None])
        out[exact] = keys.masked_fill(same, 2.0).topk(k, dim=1, largest=False, sorted=False).indices
    if not exact.all():  # a uniform position in [0, pool), shifted past the class's block
        r = ~exact
        u = (torch.rand(int(r.sum()), k, device=target.device) * pool[r, None]).long()
        u = torch.minimum(u, pool[r, None] - 1)
        out[r] = u + (u >= lo[r, None]) * size[r, None]
    return order[out]


def contrast_scores(memory: Tensor, idx: Tensor, v: Tensor, temperature: float) -> Tensor:
    """exp(<memory[idx[i, j]], v_i> / T): (b, 1 + k), unnormalized; no gradient reaches the memory.

    When the bank is not much larger than the number of rows drawn, one (b, N) product with the whole bank,
    then a gather, moves far less memory than gathering (b, 1 + k, feat_dim) rows (the same numbers)."""
    v = v.to(memory.dtype)
    if len(memory) <= 4 * idx.shape[1]:
        dots = (v @ memory.t().clone()).gather(1, idx)  # a copy: the bank is updated before the backward
    else:
        dots = torch.einsum("bkf,bf->bk", memory[idx], v)
    return torch.exp(dots / temperature)


def nce_loss(p: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """NCE loss of normalized scores ``p`` (b, 1 + k), positive in column 0, noise probability 1 / n_data
    (CRD Eq. 18; RepDistiller's ContrastLoss)."""
    noise = (p.shape[1] - 1) / n_data
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_neg = torch.log(noise / (p[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]


@torch.no_grad()
def momentum_update(memory: Tensor, index: Tensor, v: Tensor, momentum: float) -> None:
    """memory[index] <- normalize(momentum * memory[index] + (1 - momentum) * v), in place."""
    rows = memory.index_select(0, index).mul_(momentum).add_(v.to(memory.dtype), alpha=1 - momentum)
    memory.index_copy_(0, index, F.normalize(rows, p=2, dim=1))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_from_all_ranks(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor concatenated over the ranks (rank 0 first), without autograd; the tensors as they are
    outside DDP. Ranks may hold different batch sizes (padded for the collective, trimmed after)."""
    if not _distributed():
        return tuple(t.detach() for t in tensors)
    world = dist.get_world_size()
    n = torch.tensor([len(tensors[0])], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    gathered = []
    for t in tensors:
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: len(t)] = t.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]))
    return tuple(gathered)


@torch.no_grad()
def mean_over_ranks(x: Tensor) -> Tensor:
    if not _distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


class CRD(OneTapPair):
    name = "crd"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        crd_weight: NonNegative = 0.8,
        feat_dim: AtLeastOne = 128,
        nce_k: AtLeastOne = 16384,
        nce_t: Positive = 0.07,
        nce_m: BelowOne = 0.5,
        student_tap: TapSpec = "embedding",
        teacher_tap: TapSpec = "embedding",
        kd_weight: NonNegative = 0.0,
        temperature: Positive = 4.0,
    ):
        super().__init__(ce_weight, student_tap, teacher_tap)
        self.kd_weight, self.temperature = kd_weight, temperature
        self.crd_weight, self.feat_dim = crd_weight, feat_dim
        self.nce_k, self.nce_t, self.nce_m = nce_k, nce_t, nce_m
        self.k, self.n_data = nce_k, 0
        self._z_ready = False

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        targets = context.train_targets
        if targets is None or context.num_train < 2:
            raise KDLabError(
                "algorithm=crd keeps a memory bank per training sample and draws negatives of other classes: the "
                "data module must provide num_train >= 2 and train_targets (kd-lab's TensorDataModule does)."
            )
        targets = torch.as_tensor(targets, dtype=torch.long).cpu()
        if len(targets) != context.num_train or len(targets.unique()) < 2:
            raise KDLabError(
                f"algorithm=crd needs one label per training sample ({context.num_train}) and at least two classes "
                f"(negatives come from other classes); got {len(targets)} labels, {len(targets.unique())} classes."
            )
        self.n_data = context.num_train
        self.k = min(self.nce_k, self.n_data - 1)
        if self.k < self.nce_k:
            log.info("CRD: nce_k=%d capped at num_train - 1 = %d negatives per sample.", self.nce_k, self.k)
        self.embed_s = Embed(flat_dim(student_shapes[self.paths[0]]), self.feat_dim)
        self.embed_t = Embed(flat_dim(teacher_shapes[self.paths[1]]), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for side in ("s", "t"):
            self.register_buffer(f"memory_{side}", torch.rand(self.n_data, self.feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); < 0: estimate on the next step
        order, start, count = class_tables(targets)
        for name, t in (("targets", targets), ("class_order", order), ("class_start", start), ("class_count", count)):
            self.register_buffer(name, t, persistent=False)

    def _estimate_z(self, p_s: Tensor, p_t: Tensor) -> None:
        if not self._z_ready:
            if bool((self.z < 0).any()):
                with torch.no_grad():
                    z = mean_over_ranks(torch.stack([p_s.mean(), p_t.mean()]).float()) * self.n_data
                    self.z.copy_(z)
                log.info("CRD: normalization constants Z_s = %.1f, Z_t = %.1f", *self.z.tolist())
            self._z_ready = True

    def update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Momentum update of both banks with this step's embeddings of every rank (the local ones outside DDP)."""
        index, v_s, v_t = gather_from_all_ranks(index, v_s, v_t)
        momentum_update(self.memory_s, index, v_s, self.nce_m)
        momentum_update(self.memory_t, index, v_t, self.nce_m)

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        if "index" not in out.batch:
            raise KDLabError("algorithm=crd needs batch['index'], each sample's index in the training set.")
        index = out.batch["index"]
        f_s, f_t = self.pair(out)
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        negatives = sample_negatives(self.targets[index], self.k, self.class_order, self.class_start, self.class_count)
        idx = torch.cat([index[:, None], negatives], dim=1)
        p_s = contrast_scores(self.memory_t, idx, v_s, self.nce_t)  # the student's embedding vs the teacher bank
        p_t = contrast_scores(self.memory_s, idx, v_t, self.nce_t)  # the teacher's embedding vs the student bank
        self._estimate_z(p_s, p_t)
        loss = nce_loss(p_s / self.z[0], self.n_data) + nce_loss(p_t / self.z[1], self.n_data)
        if self.training:
            self.update_memory(index, v_s, v_t)
        terms["crd"] = self.crd_weight * loss
        if self.kd_weight:
            terms["kd"] = self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)
        return terms
