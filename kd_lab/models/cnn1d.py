"""1-D convolutional network for sequences such as MNIST-1D (``(B, C, L)`` inputs).

Greydanus (2020) reports ~94% test accuracy on MNIST-1D for a 3-layer CNN of 25 channels, against
~68% for an MLP: the convolutional prior matters on this data, which is what makes CNN -> MLP distillation
an interesting cross-family pair.
"""

from collections.abc import Sequence

from torch import Tensor, nn


def conv_block(c_in: int, c_out: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(),
    )


class CNN1d(nn.Module):
    """``blocks.<i>`` are Conv-BN-ReLU feature maps ``(B, C_i, L_i)``; ``head`` maps pooled features to logits."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 5,
        strides: Sequence[int] | None = None,
    ):
        super().__init__()
        strides = strides or [1] + [2] * (len(channels) - 1)
        widths = [input_shape[0], *channels]
        self.blocks = nn.Sequential(
            *(conv_block(a, b, kernel_size, s) for a, b, s in zip(widths[:-1], widths[1:], strides, strict=True))
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
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
