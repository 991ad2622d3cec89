"""Helpers for methods that compare penultimate representations ("embeddings") across architectures."""

from math import prod

import torch
from torch import Tensor, nn


def flat(feature: Tensor) -> Tensor:
    """(B, ...) -> (B, D): pooled maps such as (B, C, 1) become (B, C)."""
    return feature.flatten(1)


def flat_dim(shape: torch.Size) -> int:
    return prod(shape[1:])


def linear_connector(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
    """Map the student's flattened embedding to the teacher's width (identity when they already agree)."""
    d_s, d_t = flat_dim(student_shape), flat_dim(teacher_shape)
    return nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t)
