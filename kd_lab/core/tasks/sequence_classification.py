"""Sequence classification: one label per text (or text pair), logits of shape (B, K). GLUE's SST-2, MRPC,
RTE, CoLA and MNLI (kd_lab/data/text/glue.py).

It is classification with a kind of its own: the label loss (cross-entropy), the batch weight and the output
check are those of ``Classification``. The kind tells algorithms that the inputs are token ids and the models
are transformers, so a method that taps transformer blocks (DistilBERT, TinyBERT, PKD) can declare it, and a
method made for images does not run on it by accident.

Metrics are chosen per data set (``task.metrics``, which the GLUE data configs set): ``acc``, ``f1`` (of
class 1, binary only: MRPC), ``mcc`` (Matthews correlation: CoLA). All are torchmetrics, so they are exact
over the whole split, also under DDP. The teacher comparisons of the test set are those of classification.
"""

from collections.abc import Sequence

from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy

from kd_lab.core.tasks.classification import Classification
from kd_lab.errors import KDLabError

METRICS = ("acc", "f1", "mcc")


class SequenceClassification(Classification):
    name = kind = "sequence_classification"

    def __init__(
        self,
        num_classes: int,
        metrics: Sequence[str] = ("acc",),
        monitor: str = "acc",
        mode: str = "max",
        headline: str | None = None,
    ):
        """``metrics``: what validation and test report (``val/acc``, ``test/f1``, ...). ``monitor``: the one
        the checkpoint callback selects by. ``headline``: the summary's (None: the monitored one)."""
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise KDLabError(f"task.metrics={list(metrics)}: {unknown or 'empty'}; choose from {list(METRICS)}.")
        headline = headline or monitor
        for key, value in (("monitor", monitor), ("headline", headline)):
            if value not in metrics:
                raise KDLabError(
                    f"task.{key}={value!r} is not among task.metrics={list(metrics)}; add it there or pick one of them."
                )
        if "f1" in metrics and num_classes != 2:
            raise KDLabError(
                f"task.metrics has f1, which is the F1 of class 1 of a binary task, but the data has {num_classes} "
                "classes; drop f1 (report acc) or use a two-class data set."
            )
        super().__init__(num_classes, monitor, mode, headline)
        self.metric_names = metrics

    def check_model(self, model: nn.Module, datamodule, role: str) -> None:
        """Also refuse a transformer that cannot read the data's examples: too few positions for
        ``data.max_length``, or another pad id (its attention mask is built from it)."""
        super().check_model(model, datamodule, role)
        config = getattr(model, "config", None)
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        check_positions = getattr(datamodule, "check_model_positions", None)
        if positions and check_positions:
            check_positions(int(positions))
        data_pad = getattr(datamodule, "pad_id", None)
        model_pad = getattr(config, "pad_token_id", None)
        if data_pad is not None and config is not None and model_pad != data_pad:
            raise KDLabError(
                f"the {role} treats token {model_pad} as padding but the data pads with {data_pad}, so its "
                f"attention would read padding as text; set {role}.model.pad_token_id={data_pad}."
            )

    def check_output(self, logits: Tensor, role: str) -> None:
        if logits.dim() == 2 and logits.shape[-1] == self.num_classes:
            return
        raise KDLabError(
            f"the {role} outputs shape {tuple(logits.shape)} but the data has {self.num_classes} classes, so it must "
            f"output shape (batch, {self.num_classes}): build it with kd_lab.models.hf.sequence_classifier and "
            f"{role}.model.num_labels={self.num_classes} (the default ${{data.num_classes}} follows the data)."
        )

    def _metric(self, name: str) -> Metric:
        if name == "acc":
            return MulticlassAccuracy(self.num_classes, average="micro")
        if name == "f1":
            return BinaryF1Score()
        return MatthewsCorrCoef(task="multiclass", num_classes=self.num_classes)

    def student_metrics(self) -> dict[str, Metric]:
        return {name: self._metric(name) for name in self.metric_names}

    def update_student(self, metrics: nn.ModuleDict, logits: Tensor, batch: dict[str, Tensor]) -> None:
        prediction, target = logits.argmax(-1), batch["target"]
        for name in self.metric_names:
            metrics[name].update(prediction, target)
