"""``Task``: everything that depends on what is learned, so that the distillation core depends on none of it.

A task owns the label loss, the check of a model's output at build time, the metrics of validation and test,
the monitored metric and its mode, the weight of a batch in epoch means (samples or tokens), and the headline
metric that the summary, results.json and kd-lab-compare show. ``conf/task/<name>.yaml`` picks one; adding a
task is one file here and one YAML (``kd_lab/core/tasks/classification.py`` is the model to follow).

Metric names are relative: a task's ``student_metrics`` named ``acc`` are logged as ``val/acc`` and
``test/acc``, and as ``<model>/val/acc`` for the other models evaluated next to the student (exits, peers).
Its ``teacher_metrics`` compare the student with the reference teacher on the test set.
"""

from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from kd_lab.errors import KDLabError


class Task:
    name: str = "base"
    # What the algorithms may assume about the logits and the batch; an algorithm lists the kinds it supports.
    kind: str = "base"

    def __init__(self, monitor: str, mode: Literal["max", "min"], headline: str):
        if mode not in ("max", "min"):
            raise KDLabError(f"task.mode={mode!r} must be 'max' or 'min' (whether a higher {monitor} is better).")
        self.monitor, self.mode, self.headline = monitor, mode, headline

    # -- training --------------------------------------------------------------------------------------
    def label_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The supervised loss of ``logits`` on the batch's targets (mean over what counts)."""
        raise NotImplementedError

    def batch_weight(self, batch: dict[str, Tensor]) -> int:
        """How much one batch counts in epoch means of the training loss (samples, or tokens)."""
        raise NotImplementedError

    def valid_positions(self, batch: dict[str, Tensor]) -> Tensor | None:
        """A boolean mask over the logits' leading axes of the positions that count, or None for all."""
        return None

    def token_normalizer(self, batch: dict[str, Tensor]) -> Tensor | None:
        """What a sum of a loss over the batch's valid positions is divided by (None: the local batchmean)."""
        return None

    def output_view(self, logits: Tensor) -> Tensor:
        """The logits as the losses and metrics see them (a language model's padded vocabulary is cut off)."""
        return logits

    # -- checks before compute -------------------------------------------------------------------------
    def check_model(self, model: nn.Module, datamodule, role: str) -> None:
        """Raise ``KDLabError`` when a model cannot serve this task on this data (before any forward)."""

    def check_output(self, logits: Tensor, role: str) -> None:
        """Raise ``KDLabError`` when a model's logits (probed on an example batch) cannot serve this task."""

    # -- evaluation ------------------------------------------------------------------------------------
    def student_metrics(self) -> dict[str, Metric]:
        """Fresh metrics of one model, updated by ``update_student`` (``{"acc": ...}`` gives ``val/acc``)."""
        raise NotImplementedError

    def update_student(self, metrics: nn.ModuleDict, logits: Tensor, batch: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def teacher_metrics(self) -> dict[str, Metric]:
        """Fresh metrics that compare the student with the reference teacher (test only)."""
        return {}

    def update_teacher(
        self, metrics: nn.ModuleDict, logits: Tensor, teacher_logits: Tensor, batch: dict[str, Tensor]
    ) -> None:
        """Update ``teacher_metrics`` with one test batch."""

    def ensemble(self, logits: list[Tensor]) -> Tensor:
        """What the ensemble of the student and the models evaluated next to it predicts: mean probabilities."""
        return torch.stack([z.float().softmax(-1) for z in logits]).mean(0)

    def report(self, student: nn.Module, teacher: nn.Module | None, datamodule) -> dict:
        """What results.json records after testing beyond the metrics (e.g. generation speed)."""
        return {}

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of the monitored metric beats ``best`` (None: nothing yet)."""
        return best is None or (value > best if self.mode == "max" else value < best)
