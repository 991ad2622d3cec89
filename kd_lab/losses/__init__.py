"""Token-level distillation losses for language models: divergences over the vocabulary, per position."""

from kd_lab.losses.chunked import chunked_token_divergence
from kd_lab.losses.divergences import KINDS, mean, per_token_divergence, shared_vocab, token_divergence

__all__ = [
    "KINDS",
    "chunked_token_divergence",
    "mean",
    "per_token_divergence",
    "shared_vocab",
    "token_divergence",
]
