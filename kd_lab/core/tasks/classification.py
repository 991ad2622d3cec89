"""Classification: one label per sample, logits of shape (B, K).

The label loss is cross-entropy; with mixup (``batch["mix_lam"]``) it mixes the two labels' losses. Metrics:
accuracy of each model (``val/acc``, ``test/acc``); on the test set, the teacher's accuracy, the student's
top-1 agreement with the teacher and the mean KL(teacher || student). ``val/acc`` is monitored (max).
"""

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from kd_lab.core.tasks.base import Task
from kd_lab.errors import KDLabError


def cross_entropy(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy with the batch's labels; with mixup, the mix of the two labels' losses."""
    if "mix_lam" not in batch:
        return F.cross_entropy(logits, batch["target"])
    lam = batch["mix_lam"]
    per_sample = lam * F.cross_entropy(logits, batch["target"], reduction="none")
    per_sample = per_sample + (1 - lam) * F.cross_entropy(logits, batch["target_mix"], reduction="none")
    return per_sample.mean()


class Classification(Task):
    name = kind = "classification"

    def __init__(self, num_classes: int, monitor: str = "acc", mode: str = "max", headline: str = "acc"):
        super().__init__(monitor, mode, headline)
        self.num_classes = num_classes

    def label_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return cross_entropy(logits, batch)

    def batch_weight(self, batch: dict[str, Tensor]) -> int:
        return len(batch["target"])

    def check_output(self, logits: Tensor, role: str) -> None:
        if logits.dim() != 2 or logits.shape[-1] != self.num_classes:
            raise KDLabError(
                f"the {role} outputs shape {tuple(logits.shape)} but the data has {self.num_classes} classes: set "
                f"{role}.model.num_classes={self.num_classes} (the default ${{data.num_classes}} follows the data)."
            )

    def student_metrics(self) -> dict[str, Metric]:
        return {"acc": MulticlassAccuracy(self.num_classes, average="micro")}

    def update_student(self, metrics: nn.ModuleDict, logits: Tensor, batch: dict[str, Tensor]) -> None:
        metrics["acc"].update(logits, batch["target"])

    def teacher_metrics(self) -> dict[str, Metric]:
        return {
            "teacher_acc": MulticlassAccuracy(self.num_classes, average="micro"),
            "agreement": MulticlassAccuracy(self.num_classes, average="micro"),
            "kl_to_teacher": MeanMetric(),
        }

    def update_teacher(
        self, metrics: nn.ModuleDict, logits: Tensor, teacher_logits: Tensor, batch: dict[str, Tensor]
    ) -> None:
        metrics["teacher_acc"].update(teacher_logits, batch["target"])
        metrics["agreement"].update(logits, teacher_logits.argmax(-1))
        log_p_s, log_p_t = F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1)
        metrics["kl_to_teacher"].update(F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1))
