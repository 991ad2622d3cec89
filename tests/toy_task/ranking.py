"""A toy second task, written as a user would write one (one file, one YAML): classification scored by
top-2 accuracy and negative log-likelihood, with label smoothing, monitored by validation NLL (lower is
better). Nothing in kd-lab's core knows these names."""

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from kd_lab.core.tasks.base import Task


class TopTwo(Task):
    name = "top_two"
    kind = "classification"  # logits over classes: the algorithms of classification apply

    def __init__(self, num_classes: int, smoothing: float = 0.1, monitor: str = "nll", mode: str = "min"):
        super().__init__(monitor, mode, headline="top2")
        self.num_classes, self.smoothing = num_classes, smoothing

    def label_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits, batch["target"], label_smoothing=self.smoothing)

    def batch_weight(self, batch: dict[str, Tensor]) -> int:
        return len(batch["target"])

    def student_metrics(self) -> dict[str, Metric]:
        return {"top2": MulticlassAccuracy(self.num_classes, top_k=2, average="micro"), "nll": MeanMetric()}

    def update_student(self, metrics: nn.ModuleDict, logits: Tensor, batch: dict[str, Tensor]) -> None:
        metrics["top2"].update(logits, batch["target"])
        metrics["nll"].update(F.cross_entropy(logits, batch["target"], reduction="none"))

    def teacher_metrics(self) -> dict[str, Metric]:
        return {"teacher_top2": MulticlassAccuracy(self.num_classes, top_k=2, average="micro")}

    def update_teacher(self, metrics, logits, teacher_logits, batch) -> None:
        metrics["teacher_top2"].update(teacher_logits, batch["target"])
