"""``DistillationModule``: teacher + student + algorithm + scheme as one LightningModule.

One training step: (teacher forward, recording the teacher taps) -> student forward (recording the student
taps) -> ``algorithm(outputs)`` -> a dict of weighted loss terms, summed. The scheme decides whether the
teacher learns; the algorithm decides what is compared; the module only wires them and keeps the metrics.
"""

import math
from collections.abc import Callable, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs, cross_entropy
from kd_lab.errors import KDLabError, NonFiniteLossError
from kd_lab.recorder import FeatureRecorder, probe_shapes
from kd_lab.schemes.base import Scheme

OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
# (optimizer, total_epochs, steps_per_epoch) -> a scheduler stepped every optimizer step (kd_lab.optim)
SchedulerFactory = Callable[[torch.optim.Optimizer, int, int], torch.optim.lr_scheduler.LRScheduler]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_logits(model: nn.Module, example: Tensor, num_classes: int, role: str) -> None:
    """Fail at build time when a model's logits disagree with the data's class count."""
    out = probe_shapes(model, ["."], example, role)["."]
    if len(out) != 2 or out[-1] != num_classes:
        raise KDLabError(
            f"the {role} outputs shape {tuple(out)} but the data has {num_classes} classes: set "
            f"{role}.model.num_classes={num_classes} (the default ${{data.num_classes}} follows the data)."
        )


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        student: nn.Module,
        algorithm: Algorithm,
        scheme: Scheme,
        optimizer: OptimizerFactory,
        example_input: Tensor,
        num_classes: int,
        num_train: int = 0,
        train_targets: Tensor | None = None,
        teacher: nn.Module | None = None,
        scheduler: SchedulerFactory | None = None,
        config_hash: int = 0,
    ):
        super().__init__()
        if algorithm.needs_teacher and teacher is None:
            raise KDLabError(f"algorithm '{algorithm.name}' needs a teacher; configure one (teacher=<name>).")
        self.student = student
        self.algorithm = algorithm
        self.scheme = scheme
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.config_hash = config_hash
        self.best_val_epoch = -1
        if teacher is not None:
            teacher = scheme.prepare_teacher(teacher)
        if scheme.trains_teacher:
            self.teacher = teacher
        else:  # a plain list is not registered: no parameters(), state_dict() or DDP for a frozen teacher
            self.__dict__["teacher"] = teacher

        algorithm.bind(student, teacher)
        self.student_recorder = FeatureRecorder(student, algorithm.student_taps, "student")
        self.teacher_recorder = FeatureRecorder(teacher, algorithm.teacher_taps, "teacher") if teacher else None
        for role, model in (("student", student), ("teacher", teacher)):
            if model is not None:
                check_logits(model, example_input, num_classes, role)
        algorithm.build(
            probe_shapes(student, algorithm.student_taps, example_input, "student"),
            probe_shapes(teacher, algorithm.teacher_taps, example_input, "teacher") if teacher else {},
            BuildContext(num_classes=num_classes, num_train=num_train, train_targets=train_targets),
        )

        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_teacher_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_agreement = MulticlassAccuracy(num_classes, average="micro")
        self.test_kl = MeanMetric()
        self.test_suffix = ""  # "" for the best-validation weights, "_last" for the last epoch's

    # -- device moves for the unregistered frozen teacher ----------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if not self.scheme.trains_teacher and self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def _teacher_forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.set_grad_enabled(self.scheme.trains_teacher and torch.is_grad_enabled()):
            with self.teacher_recorder:
                logits = self.teacher(x)
            return logits, self.teacher_recorder.features

    def _step_outputs(self, batch: dict[str, Tensor], with_teacher: bool) -> StepOutputs:
        x = batch["input"]
        out = StepOutputs(logits=None, batch=batch)  # type: ignore[arg-type]
        if with_teacher:
            out.teacher_logits, out.teacher_features = self._teacher_forward(x)
        with self.student_recorder:
            out.logits = self.student(x)
        out.features = self.student_recorder.features
        return out

    # -- training --------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # every rank of a job must train the same config (STACK-NOTES)
            hashes = self.all_gather(torch.tensor(self.config_hash, device=self.device)).flatten().tolist()
            if len(set(hashes)) > 1:
                raise KDLabError(f"DDP ranks were given different configs (hashes {hashes}); see trainer=ddp docs.")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self._step_outputs(batch, with_teacher=self.algorithm.needs_teacher)
        terms = self.algorithm(out)
        loss = torch.stack(list(terms.values())).sum()
        if not torch.isfinite(loss):
            bad = [name for name, value in terms.items() if not torch.isfinite(value)]
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.current_epoch}, step {self.global_step}: term(s) {bad} = "
                f"{[float(terms[b]) for b in bad]}. Lower the learning rate or that term's weight; "
                "checkpoints and logs written so far are kept."
            )
        n = len(batch["target"])
        # epoch means; under DDP they are reduced across ranks once, at the epoch's end
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.student(batch["input"])
        self.val_acc.update(logits, batch["target"])
        loss = cross_entropy(logits, batch)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(batch["target"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc.reset()
        if self.trainer.sanity_checking:
            return
        if self.best_val_epoch < 0 or acc > self.val_acc_best.compute():
            self.best_val_epoch = self.current_epoch
        self.val_acc_best.update(acc)
        # values from compute() are already global; sync_dist averages identical numbers (and keeps DDP quiet)
        self.log("val/acc", acc, sync_dist=True)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x, y = batch["input"], batch["target"]
        logits = self.student(x)
        self.test_acc.update(logits, y)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            self.test_teacher_acc.update(teacher_logits, y)
            self.test_agreement.update(logits, teacher_logits.argmax(-1))
            kl = F.kl_div(
                F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="none", log_target=True
            )
            self.test_kl.update(kl.sum(-1))

    def on_test_epoch_end(self) -> None:
        s = self.test_suffix
        self.log(f"test/acc{s}", self.test_acc.compute(), sync_dist=True)
        self.test_acc.reset()
        if self.teacher is not None:
            self.log(f"test/teacher_acc{s}", self.test_teacher_acc.compute(), sync_dist=True)
            self.log(f"test/agreement{s}", self.test_agreement.compute(), sync_dist=True)
            self.log(f"test/kl_to_teacher{s}", self.test_kl.compute(), sync_dist=True)
            for metric in (self.test_teacher_acc, self.test_agreement, self.test_kl):
                metric.reset()

    # -- optimization and checkpoints ------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(p for p in self.parameters() if p.requires_grad)
        if self.scheduler_factory is None:
            return optimizer
        epochs = max(1, self.trainer.max_epochs or 1)
        total = self.trainer.estimated_stepping_batches
        steps_per_epoch = max(1, int(total // epochs)) if math.isfinite(total) else 1
        scheduler = self.scheduler_factory(optimizer, epochs, steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["best_val_epoch"] = self.best_val_epoch

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_val_epoch = checkpoint.get("best_val_epoch", -1)
