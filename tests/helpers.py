"""Test-only algorithms, reachable from configs as ``helpers.<Name>`` (pytest puts tests/ on sys.path)."""

import os
from pathlib import Path

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


def subprocess_env(root: Path) -> dict[str, str]:
    """The environment of a ``kd-lab`` subprocess: everything under ``root``, W&B offline, one thread, and no
    ``WANDB_SERVICE`` inherited from this pytest process (an in-process W&B run of an earlier test starts a
    service that would otherwise be shared by every subprocess and keep a killed run's id "in use")."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "KD_LAB_ROOT": str(root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
