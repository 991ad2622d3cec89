"""Test-only algorithms, reachable from configs as ``helpers.<Name>`` (pytest puts tests/ on sys.path)."""

import torch
from torch import Tensor

from kd_lab.algorithms.base import Algorithm, StepOutputs


class NaNAfter(Algorithm):
    """Cross-entropy plus a term that turns NaN at step ``after``: exercises the non-finite-loss guard."""

    name = "nan_after"
    needs_teacher = False

    def __init__(self, after: int = 2, ce_weight: float = 1.0):
        super().__init__(ce_weight)
        self.after = after
        self.calls = 0

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        self.calls += 1
        bad = torch.tensor(float("nan") if self.calls > self.after else 0.0)
        return {**self.ce_term(out), "exploding": out.logits.sum() * 0 + bad}
