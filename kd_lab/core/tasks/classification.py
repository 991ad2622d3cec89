"""Classification: one label per sample, logits of shape (B, K).

The label loss is cross-entropy; with mixup (``batch["mix_lam"]``) it mixes the two labels' losses. Metrics:
accuracy of each model (``val/acc``, ``test/acc``); on the test set, the teacher's accuracy, the student's
top-1 agreement with the teacher and the mean KL(teacher || student). ``val/acc`` is monitored (max).
"""

import inspect

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from kd_lab.core.tasks.base import Task
from kd_lab.errors import KDLabError

# constructor parameters that set a model's output size, in the order they are looked for
OUTPUT_SIZE_KEYS = ("num_classes", "out_features", "num_labels", "n_classes", "num_outputs", "output_dim", "out_dim")


def output_size_key(model: nn.Module) -> str | None:
    """The constructor parameter of ``model``'s class that sets its output size, if it has one of the usual
    names (``num_classes`` for kd-lab's models, ``out_features`` for ``nn.Linear``)."""
    try:
        params = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        return None
    return next((k for k in OUTPUT_SIZE_KEYS if k in params), None)


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
        self._models: dict[str, tuple[str, str | None]] = {}  # role -> (class name, output size key), for advice

    def label_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return cross_entropy(logits, batch)

    def batch_weight(self, batch: dict[str, Tensor]) -> int:
        return len(batch["target"])

    def check_model(self, model: nn.Module, datamodule, role: str) -> None:
        self._models[role] = (type(model).__name__, output_size_key(model))

    def check_output(self, logits: Tensor, role: str) -> None:
        if logits.dim() == 2 and logits.shape[-1] == self.num_classes:
            return
        name, key = self._models.get(role, (None, "num_classes"))
        shape, k = tuple(logits.shape), self.num_classes
        if key == "num_classes":
            raise KDLabError(
                f"the {role} outputs shape {shape} but the data has {k} classes: set "
                f"{role}.model.num_classes={k} (the default ${{data.num_classes}} follows the data)."
            )
        fix = f"{role}.model.{key}={k} (or ${{data.num_classes}} to follow the data)" if key else f"to {k}"
        axes = f", and give it inputs that make one row per sample (it outputs {logits.dim()} axes)"
        raise KDLabError(
            f"the {role} ({name}) outputs shape {shape} but the data has {k} classes, so it must output shape "
            f"(batch, {k}): set the model's output size, {fix}{axes if logits.dim() != 2 else ''}; "
            f"{name} takes no num_classes."
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
