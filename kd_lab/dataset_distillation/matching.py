"""The two matching distances, as plain functions of tensors (tested against hand-computed values).

Gradient matching (Zhao et al. 2021, eq. 10): for one layer with gradients ``A`` (real) and ``B``
(synthetic), reshaped to ``(out, -1)`` with one row per output unit,

    d(A, B) = sum_i (1 - A_i . B_i / (|A_i| |B_i| + eps)),

summed over layers. A 1-D parameter (a bias, a norm's scale or shift) adds nothing: the paper drops it,
since one number per unit carries no direction to compare.

Distribution matching (Zhao & Bilen 2023, eq. 4): ``|mean(f(real)) - mean(f(synthetic))|^2`` for the
embeddings ``f`` of one class, summed over classes by the caller.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

EPS = 1e-6  # the paper's code adds it to the denominator: a zero gradient row gives distance 1, not NaN


def layer_gradient_distance(real: Tensor, synthetic: Tensor, eps: float = EPS) -> Tensor:
    """Cosine distance between two gradients of one parameter, row by row (one row per output unit)."""
    if real.shape != synthetic.shape:
        raise ValueError(f"gradients of one parameter must have one shape, got {real.shape} and {synthetic.shape}")
    if real.dim() <= 1:
        return synthetic.new_zeros(())
    a, b = real.flatten(1), synthetic.flatten(1)
    cosine = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return (1 - cosine).sum()


def gradient_distance(real: Sequence[Tensor], synthetic: Sequence[Tensor], eps: float = EPS) -> Tensor:
    """The gradient-matching distance: ``layer_gradient_distance`` summed over the parameters."""
    if len(real) != len(synthetic) or not real:
        raise ValueError(f"need one synthetic gradient per real one, got {len(real)} and {len(synthetic)}")
    return torch.stack([layer_gradient_distance(a, b, eps) for a, b in zip(real, synthetic, strict=True)]).sum()


def mean_embedding_distance(real: Tensor, synthetic: Tensor) -> Tensor:
    """Squared Euclidean distance between the mean embeddings ``(N, D)`` and ``(M, D)`` of one class."""
    if real.dim() != 2 or synthetic.dim() != 2 or real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (M, D), got {tuple(real.shape)} and {tuple(synthetic.shape)}")
    return (real.mean(0) - synthetic.mean(0)).pow(2).sum()
