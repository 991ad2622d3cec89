"""Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion (Yin et al., CVPR 2020),
https://arxiv.org/abs/1912.08795. Reference code: NVlabs/DeepInversion (cifar10/deepinversion_cifar10.py).

A set of inputs x is optimized, from noise, against the frozen teacher T only:
    bn_weight * sum_l (||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2)
  + target_weight * CE(T(x), y)          (y: chosen labels, balanced over the classes)
  + tv_weight * TV(x) + l2_weight * ||x||_2
with mu_l, var_l the batch statistics of the input of every BatchNorm layer l of T (forward hooks), and
TV the L2 norms of the differences of neighbouring positions (and diagonals in 2-D), as the code. Each
iteration sees x randomly rolled by up to ``jitter`` positions (and flipped when ``flip``), as the code.
The set is made once, on the first training step (the teacher has its trained weights then, not at build
time), and kept in memory, keyed by the teacher's weights and these settings; runs of one process (the
seeds of a sweep) share it. Then the student learns by KD on it: a training batch is the synthetic samples
at the batch's indices (modulo the set's size). The adaptive competition term (ADI) is not implemented.

Code (CIFAR-10): batch 256, 2000 Adam iterations at lr 0.1, bn_weight 10 to 100 (its scripts differ),
tv_weight 2.5e-5, l2_weight 0, jitter 2, flips. Here: bn_weight 10, tv 2.5e-5, l2 0, jitter 2; no flips
(a reversed MNIST-1D signal is another signal, not the same digit); fewer iterations and samples (see
conf/algorithm/deep_inversion.yaml: a CPU budget). The student's KD uses T = 4 (kd's default here).
"""

import hashlib
import json
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_lab.algorithms.base import BuildContext, StepOutputs
from kd_lab.algorithms.data_free.generator import DataFreeAlgorithm
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import AtLeastOne, NonNegative, NonNegativeInt, Positive
from kd_lab.core.outputs import logits_of
from kd_lab.errors import KDLabError

_CACHE: dict[str, tuple[Tensor, Tensor, float]] = {}  # key -> (inputs, labels, seconds it took)


def batch_norms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def bn_statistics_loss(feature: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """||mean - running_mean||_2 + ||var - running_var||_2 of a BatchNorm input (B, C, *S), per channel
    over the batch and positions (the biased variance, as BatchNorm normalizes with)."""
    flat = feature.transpose(0, 1).flatten(1)
    mean, var = flat.mean(1), flat.var(1, unbiased=False)
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


def total_variation(x: Tensor) -> Tensor:
    """Sum of the L2 norms of neighbour differences: along L in 1-D; in 2-D along H, W and both diagonals."""
    if x.dim() == 3:
        return torch.linalg.vector_norm(x[..., 1:] - x[..., :-1])
    diffs = (
        x[..., :, :-1] - x[..., :, 1:],
        x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    )
    return sum(torch.linalg.vector_norm(d) for d in diffs)


class BNStatistics:
    """Forward hooks on every BatchNorm layer: each records its input's distance to the running statistics."""

    def __init__(self, layers: list[tuple[str, _BatchNorm]]):
        self.layers, self.losses, self._handles = layers, [], []

    def _hook(self, module: _BatchNorm, inputs, _output) -> None:
        self.losses.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))

    def __enter__(self) -> "BNStatistics":
        self.losses = []
        self._handles = [m.register_forward_hook(self._hook) for _, m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class DeepInversion(DataFreeAlgorithm):
    name = "deep_inversion"

    def __init__(
        self,
        ce_weight: NonNegative = 0.0,
        kd_weight: NonNegative = 1.0,
        temperature: Positive = 4.0,
        num_samples: AtLeastOne = 512,
        iterations: AtLeastOne = 100,
        batch_size: AtLeastOne = 256,
        lr: Positive = 0.1,
        bn_weight: NonNegative = 10.0,
        target_weight: NonNegative = 1.0,
        tv_weight: NonNegative = 2.5e-5,
        l2_weight: NonNegative = 0.0,
        jitter: NonNegativeInt = 2,
        flip: bool = False,
        synthesis_seed: NonNegativeInt = 0,
    ):
        super().__init__(ce_weight)
        self.kd_weight, self.temperature = kd_weight, temperature
        self.settings = {
            "num_samples": num_samples,
            "iterations": iterations,
            "batch_size": batch_size,
            "lr": lr,
            "bn_weight": bn_weight,
            "target_weight": target_weight,
            "tv_weight": tv_weight,
            "l2_weight": l2_weight,
            "jitter": jitter,
            "flip": flip,
            "synthesis_seed": synthesis_seed,
        }
        self.synthesis_cached = False
        self._inputs: Tensor | None = None

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().bind(student, teacher)
        self.norms = batch_norms(teacher)
        if not self.norms:
            raise KDLabError(
                f"algorithm=deep_inversion matches the statistics of the teacher's BatchNorm layers, but the teacher "
                f"({type(teacher).__name__}) has none. Use a teacher with BatchNorm (e.g. teacher=cnn1d_large), or "
                "algorithm=dafl or zskt, which need none."
            )

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        self.check_data(context)
        self.input_shape, self.num_classes = tuple(context.input_shape), context.task.num_classes
        if len(self.input_shape) not in (2, 3):
            raise KDLabError(
                f"algorithm=deep_inversion optimizes 1-D signals (C, L) or images (C, H, W), but one input of this "
                f"data has shape {self.input_shape}. Pick data with such inputs."
            )

    # -- the synthetic set --------------------------------------------------------------------------------
    def cache_key(self) -> str:
        described = {"teacher": weights_digest(self.teacher_model), "shape": self.input_shape, **self.settings}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def synthesize(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The synthetic set (inputs, labels) on ``device``: from the cache, or optimized now."""
        key = self.cache_key()
        if key in _CACHE:
            inputs, labels, seconds = _CACHE[key]
            self.synthesis_cached = True
        else:
            start = time.perf_counter()
            inputs, labels = self._optimize(device)
            seconds = time.perf_counter() - start
            _CACHE[key] = (inputs.cpu(), labels.cpu(), seconds)
        self.synthesis_seconds, self.synthetic_samples = seconds, inputs.shape[0]
        return inputs.to(device), labels.to(device)

    def _optimize(self, device: torch.device) -> tuple[Tensor, Tensor]:
        s = self.settings
        generator = torch.Generator().manual_seed(s["synthesis_seed"])  # the run's own random streams stay as they are
        n = s["num_samples"]
        labels = torch.arange(n) % self.num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        inputs = torch.randn(n, *self.input_shape, generator=generator)
        chunks = []
        with torch.enable_grad():
            for first in range(0, n, s["batch_size"]):
                x = inputs[first : first + s["batch_size"]].to(device).requires_grad_(True)
                y = labels[first : first + s["batch_size"]].to(device)
                optimizer = torch.optim.Adam([x], lr=s["lr"])
                for _ in range(s["iterations"]):
                    optimizer.zero_grad()
                    loss = self.inversion_loss(self._jittered(x, generator), y)
                    loss.backward()
                    optimizer.step()
                chunks.append(x.detach())
        return torch.cat(chunks), labels.to(device)

    def _jittered(self, x: Tensor, generator: torch.Generator) -> Tensor:
        s, spatial = self.settings, tuple(range(2, x.dim()))
        if s["jitter"]:
            shifts = torch.randint(-s["jitter"], s["jitter"] + 1, (len(spatial),), generator=generator).tolist()
            x = torch.roll(x, shifts=shifts, dims=spatial)
        if s["flip"] and torch.rand(1, generator=generator).item() < 0.5:
            x = torch.flip(x, dims=(x.dim() - 1,))
        return x

    def inversion_loss(self, x: Tensor, labels: Tensor) -> Tensor:
        """The loss the inputs minimize (see the module's docstring)."""
        s = self.settings
        with BNStatistics(self.norms) as stats:
            logits = logits_of(self.teacher_model(x), "teacher")
        loss = s["bn_weight"] * torch.stack(stats.losses).sum() + s["target_weight"] * F.cross_entropy(logits, labels)
        if s["tv_weight"]:
            loss = loss + s["tv_weight"] * total_variation(x)
        if s["l2_weight"]:
            loss = loss + s["l2_weight"] * torch.linalg.vector_norm(x)
        return loss

    # -- training on it -------------------------------------------------------------------------------------
    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._inputs is None:
            self._inputs, self.synthetic_labels = self.synthesize(batch["input"].device)
        index = batch["index"].to(self._inputs.device) % self._inputs.shape[0]
        return self.synthetic_batch(batch, self._inputs[index])

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        return {"kd": self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)}

    def report(self, student: nn.Module, example: Tensor) -> dict:
        return {**super().report(student, example), "synthesis_cached": self.synthesis_cached}
