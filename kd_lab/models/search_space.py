"""A 1-D CNN described by scalars, for a student search (``conf/student/cnn1d_search.yaml``).

An Optuna search samples scalars, not lists. ``SearchCNN1d`` turns ``depth``, ``width``, ``widen`` and
``kernel_size`` into the channel list of a ``CNN1d``: block ``i`` has ``round(width * widen**i)`` channels.
It is a ``CNN1d``, so every algorithm that taps a ``CNN1d`` taps it the same way.

Budgets are refused at build time, before any compute: the parameter count is computed from the scalars
before a layer exists. The latency budget needs a measurement: a few forwards of the untrained model on
zeros, done in the constructor, still before the teacher is trained and before the fit.
"""

import itertools
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from kd_lab.core.bounds import AtLeastOne, Positive
from kd_lab.errors import KDLabError
from kd_lab.models.cnn1d import CNN1d

LATENCY_BATCHES = (1, 256)  # one sample (interactive use) and a full evaluation batch (throughput)


def search_channels(depth: int, width: int, widen: float = 1.0) -> list[int]:
    """The channels of each block: ``round(width * widen**i)``, at least 1."""
    return [max(1, round(width * widen**i)) for i in range(depth)]


def cnn1d_param_count(in_channels: int, num_classes: int, channels: Sequence[int], kernel_size: int) -> int:
    """The trainable parameters of ``CNN1d``: bias-free convolutions, BatchNorm's scale and shift, the head."""
    widths = [in_channels, *channels]
    convs = sum(a * b * kernel_size for a, b in itertools.pairwise(widths))
    norms = sum(2 * c for c in channels)
    head = widths[-1] * num_classes + num_classes
    return convs + norms + head


def forward_latency(
    model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = LATENCY_BATCHES, repeats: int = 20
) -> dict[str, float | int]:
    """The median forward time in milliseconds at each batch size, in eval mode, without gradients.

    The input is zeros: a convolution costs the same for any values, and no random draw is spent, so the
    student's initialisation and the data order do not depend on whether latency was measured. One warm-up
    forward per batch size is not timed (the first call allocates)."""
    was_training = model.training
    model.eval()
    found: dict[str, float | int] = {}
    try:
        with torch.no_grad():
            for batch in batch_sizes:
                x = torch.zeros(batch, *input_shape)
                model(x)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - start)
                found[f"batch_{batch}_ms"] = 1000 * statistics.median(times)
    finally:
        model.train(was_training)
    found["repeats"] = repeats
    found["threads"] = torch.get_num_threads()  # the time depends on it: recorded next to it
    return found


class SearchCNN1d(CNN1d):
    """``CNN1d`` with ``depth`` blocks of ``round(width * widen**i)`` channels and odd ``kernel_size``.

    ``max_params``: refuse an architecture with more trainable parameters (None: no budget).
    ``max_latency_ms``: refuse one whose median batch-1 forward is slower on this machine (None: no budget).
    ``measure_latency``: time the forward at batch 1 and 256 (``latency_repeats`` each, median) and keep it
    in ``self.latency``; kd-lab's ``train`` writes it to results.json. A latency budget measures it anyway."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: AtLeastOne = 3,
        width: AtLeastOne = 8,
        kernel_size: AtLeastOne = 5,
        widen: Positive = 1.0,
        max_params: AtLeastOne | None = None,
        max_latency_ms: Positive | None = None,
        measure_latency: bool = False,
        latency_repeats: AtLeastOne = 20,
    ):
        if kernel_size % 2 == 0:
            raise KDLabError(
                f"student.model.kernel_size={kernel_size} is even: a 'same' padding of kernel_size // 2 keeps the "
                "length only for odd kernels; use an odd kernel_size (3, 5, 7, ...)."
            )
        channels = search_channels(depth, width, widen)
        params = cnn1d_param_count(input_shape[0], num_classes, channels, kernel_size)
        shape = f"depth={depth}, width={width}, widen={widen}, kernel_size={kernel_size}: channels {channels}"
        if max_params is not None and params > max_params:
            raise KDLabError(
                f"student.model: {shape} has {params:,} parameters, over the budget max_params={max_params:,}; "
                "pick a smaller depth, width, widen or kernel_size, or raise student.model.max_params "
                "(nothing was trained; a search records this trial as failed and goes on)."
            )
        super().__init__(input_shape, num_classes, channels, kernel_size)
        self.channels = channels
        self.latency: dict[str, float | int] | None = None
        if measure_latency or max_latency_ms is not None:
            self.latency = forward_latency(self, input_shape, repeats=latency_repeats)
        if max_latency_ms is not None and self.latency["batch_1_ms"] > max_latency_ms:
            raise KDLabError(
                f"student.model: {shape} takes {self.latency['batch_1_ms']:.3f} ms per batch-1 forward (median of "
                f"{latency_repeats}, threads={self.latency['threads']}), over max_latency_ms={max_latency_ms}; "
                "pick a smaller architecture, or raise student.model.max_latency_ms "
                "(nothing was trained; a search records this trial as failed and goes on)."
            )
