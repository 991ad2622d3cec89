"""Whole-batch augmentations on tensors for 1-D signals (``(B, C, L)``).

Why augment in a distillation framework: KD gains most when the student sees many inputs that the teacher
labels, and when teacher and student see the *same* augmented input ("consistent teaching"; Beyer et al.
2022, https://arxiv.org/abs/2106.05237). The transform runs once per batch in the loader, so both models
get the same view. Every draw comes from the loader's generator, a function of (seed, epoch).
"""

import numpy as np
import torch

from kd_lab.data.batches import Batch


class SignalAugment:
    """Random shift, amplitude scaling, Gaussian noise and, optionally, mixup.

    Args:
        max_shift: largest shift in samples along the last axis, per sample uniform in [-max_shift, max_shift].
        circular: wrap the shifted-out samples around (True) or pad with zeros (False).
        scale: amplitude factor per sample uniform in [1 - scale, 1 + scale].
        noise_std: std of additive Gaussian noise.
        mixup_alpha: Beta(alpha, alpha) mixing of pairs of inputs (Zhang et al. 2018); 0 disables it. Mixed
            batches carry ``target_mix`` and ``mix_lam`` so cross-entropy uses the mixed label.
    """

    views_from_generator = True  # every draw comes from the loader's generator (kd_lab.run.view_store)

    def __init__(
        self,
        max_shift: int = 0,
        scale: float = 0.0,
        noise_std: float = 0.0,
        mixup_alpha: float = 0.0,
        circular: bool = False,
    ):
        self.max_shift = max_shift
        self.circular = circular
        self.scale = scale
        self.noise_std = noise_std
        self.mixup_alpha = mixup_alpha

    def __call__(self, batch: Batch, g: torch.Generator) -> Batch:
        x = batch["input"]
        n, length = x.shape[0], x.shape[-1]
        if self.max_shift:
            shift = torch.randint(-self.max_shift, self.max_shift + 1, (n, 1), generator=g)
            source = torch.arange(length) - shift  # (n, L): where each output sample reads from
            per_sample = (n,) + (1,) * (x.dim() - 2) + (length,)
            if self.circular:
                x = torch.gather(x, -1, (source % length).view(per_sample).expand_as(x))
            else:
                valid = ((source >= 0) & (source < length)).view(per_sample)
                x = torch.gather(x, -1, source.clamp(0, length - 1).view(per_sample).expand_as(x)) * valid
        if self.scale:
            x = x * (1 + self.scale * (2 * torch.rand((n,) + (1,) * (x.dim() - 1), generator=g) - 1))
        if self.noise_std:
            x = x + self.noise_std * torch.randn(x.shape, generator=g)
        batch = {**batch, "input": x}
        if self.mixup_alpha:
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))  # Beta draws from g's stream
            lam = torch.as_tensor(rng.beta(self.mixup_alpha, self.mixup_alpha, n), dtype=x.dtype)
            partner = torch.randperm(n, generator=g)
            lam_x = lam.view((n,) + (1,) * (x.dim() - 1))
            batch["input"] = lam_x * x + (1 - lam_x) * x[partner]
            batch["target_mix"] = batch["target"][partner]
            batch["mix_lam"] = lam
        return batch
