"""Multi-layer perceptron over a flattened input (MNIST-1D signals are ``(B, 1, 40)``)."""

import itertools
from collections.abc import Sequence
from math import prod

from torch import Tensor, nn


class MLP(nn.Module):
    """``layers.<i>`` are Linear-ReLU blocks (tap them by that path), ``head`` gives the logits."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 128)):
        super().__init__()
        widths = [prod(input_shape), *hidden]
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in itertools.pairwise(widths)))
        self.head = nn.Linear(widths[-1], num_classes)

    @property
    def stage_taps(self) -> list[str]:
        """Feature taps, shallow to deep (algorithms select them by index: -1 is the deepest)."""
        return [f"layers.{i}" for i in range(len(self.layers))]

    @property
    def embedding_tap(self) -> str:
        """The penultimate representation (input of the classifier)."""
        return self.stage_taps[-1] if len(self.layers) else "flatten"

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.flatten(x)))
