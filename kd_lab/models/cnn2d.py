"""Small 2-D CNN for small images (scikit-learn's 8x8 ``digits``)."""

import itertools
from collections.abc import Sequence

from torch import Tensor, nn


class CNN2d(nn.Module):
    """``blocks.<i>`` are Conv-BN-ReLU maps ``(B, C_i, H_i, W_i)``; ``head`` maps pooled features to logits."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32, 32)):
        super().__init__()
        widths = [input_shape[0], *channels]
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                    nn.BatchNorm2d(b),
                    nn.ReLU(),
                )
                for i, (a, b) in enumerate(itertools.pairwise(widths))
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    @property
    def stage_taps(self) -> list[str]:
        """Feature maps, shallow to deep (algorithms select them by index: -1 is the deepest)."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    @property
    def embedding_tap(self) -> str:
        """The penultimate representation (pooled features, the classifier's input)."""
        return "pool"

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(x)).flatten(1))
