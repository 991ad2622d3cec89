"""BERT's masking (Devlin et al. 2019, https://arxiv.org/abs/1810.04805) as a batch transform.

Each non-special position is picked with probability ``mask_prob``; a picked token becomes ``<mask>`` 80% of
the time, a random ordinary token 10%, and stays itself 10%, so the model cannot tell which inputs to trust.
The loss sees only picked positions: every other target is -100, PyTorch's ``ignore_index``.
"""

from collections.abc import Iterable

import torch

from kd_lab.data.batches import Batch
from kd_lab.errors import KDLabError

IGNORE_INDEX = -100


def check_mask_prob(mask_prob: float) -> None:
    if not 0 < mask_prob <= 1:
        raise KDLabError(f"data.mask_prob={mask_prob} must be in (0, 1]; BERT uses 0.15.")


class MaskTokens:
    views_from_generator = True  # every draw comes from the loader's generator (kd_lab.run.view_store)

    def __init__(
        self,
        mask_id: int,
        vocab_size: int,
        mask_prob: float = 0.15,
        special_ids: Iterable[int] = (),
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ):
        check_mask_prob(mask_prob)
        if min(mask_fraction, random_fraction) < 0 or mask_fraction + random_fraction > 1:
            raise KDLabError(
                f"mask_fraction={mask_fraction} and random_fraction={random_fraction} must be >= 0 and sum to "
                "at most 1 (the rest keep their token); BERT uses 0.8 and 0.1."
            )
        self.mask_id, self.vocab_size, self.mask_prob = mask_id, vocab_size, mask_prob
        self.mask_fraction, self.random_fraction = mask_fraction, random_fraction
        self.special_ids = torch.tensor(sorted({*special_ids, mask_id}), dtype=torch.int64)
        ordinary = torch.ones(vocab_size, dtype=torch.bool)
        ordinary[self.special_ids[self.special_ids < vocab_size]] = False
        self.ordinary_ids = ordinary.nonzero().flatten()  # random replacements are never special tokens

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        ids = batch["input"]
        # Drawn on the host from the host generator: the same draws whichever device holds the batch.
        pick_draw = torch.rand(ids.shape, generator=generator)
        action_draw = torch.rand(ids.shape, generator=generator)
        replacement = self.ordinary_ids[torch.randint(len(self.ordinary_ids), ids.shape, generator=generator)]
        special = torch.isin(ids.cpu(), self.special_ids)
        picked = (pick_draw < self.mask_prob) & ~special
        to_mask = picked & (action_draw < self.mask_fraction)
        to_random = picked & ~to_mask & (action_draw < self.mask_fraction + self.random_fraction)
        masked = torch.where(to_mask, torch.tensor(self.mask_id), ids.cpu())
        masked = torch.where(to_random, replacement, masked)
        target = torch.where(picked, ids.cpu(), torch.tensor(IGNORE_INDEX))
        return {**batch, "input": masked.to(ids.device), "target": target.to(ids.device)}

    def __repr__(self) -> str:
        return f"MaskTokens(mask_id={self.mask_id}, vocab_size={self.vocab_size}, mask_prob={self.mask_prob})"
