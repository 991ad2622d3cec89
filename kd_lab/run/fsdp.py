"""``trainer=fsdp``: Lightning's FSDP strategy for a teacher and a student that do not fit one GPU.

The student (and anything the algorithm learns) is sharded: its parameters, gradients and optimizer states
are split over the ranks, gathered layer by layer for the forward and backward. Units of sharding are
chosen by size (``min_params`` per unit), so any architecture wraps without naming its block class.

A frozen offline teacher is not a registered submodule of the LightningModule (docs/architecture.md), so
FSDP does not wrap it: every rank holds a full replica and runs its forward on its own shard of the batch.
That costs one copy of the teacher's weights per GPU but no communication: the teacher has no gradients
and no optimizer state, which are most of what FSDP saves. A teacher too large for one GPU needs its
outputs stored (the teacher top-k store) or loaded in lower precision.
"""

import functools

from lightning.pytorch.strategies import FSDPStrategy


def fsdp_strategy(min_params: int = 1_000_000, sharding_strategy: str = "FULL_SHARD", **kwargs) -> FSDPStrategy:
    """``FSDPStrategy`` with a size-based wrapping policy (``min_params`` parameters per FSDP unit)."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    policy = functools.partial(size_based_auto_wrap_policy, min_num_params=min_params)
    return FSDPStrategy(auto_wrap_policy=policy, sharding_strategy=sharding_strategy, **kwargs)
