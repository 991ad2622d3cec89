"""``DistillationModule``: the Lightning glue around a ``DistillationStep`` (``kd_lab.core.step``).

The step computes; this module registers the models, sums and logs the loss terms, steps the optimizers,
evaluates with the task's metrics and saves what a resume needs. It knows no class count and no metric of
its own: the task names them (``kd_lab.core.tasks``).
"""

import math
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from kd_lab.core.step import DistillationStep
from kd_lab.core.step_stats import EpochSums, FiniteGuard, stack_terms
from kd_lab.errors import KDLabError
from kd_lab.run.resume import rng_states, set_rng_states
from kd_lab.run.view_store import ViewStoreHooks

OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
# (optimizer, total_epochs, steps_per_epoch) -> a scheduler stepped every optimizer step (kd_lab.optim)
SchedulerFactory = Callable[[torch.optim.Optimizer, int, int], torch.optim.lr_scheduler.LRScheduler]


class NoOptimizerStep(KDLabError):
    """A fit that ended without a single optimizer step: its weights are the initial ones."""

    def __init__(self, reason: str, who: str = "the run", consequence: str = "nothing was learned"):
        self.reason = reason
        super().__init__(f"{who} took no optimizer step ({consequence}): {reason}")


def no_step_reason(trainer: L.Trainer) -> str:
    """Why a fit took no step, and the fix: most often a batch larger than the training set."""
    datamodule = trainer.datamodule
    batch, n = getattr(datamodule, "batch_size", None), getattr(datamodule, "num_train", None)
    if batch and n is not None and batch > n // trainer.world_size:
        per_process = n // trainer.world_size
        has = f"{n} training samples" + (f", {per_process} per process" if trainer.world_size > 1 else "")
        return (
            f"data.batch_size={batch} is larger than the {has}, and a training epoch uses full batches only; "
            f"set data.batch_size to at most {per_process}."
        )
    return (
        f"{trainer.num_training_batches} training batches per epoch, trainer.max_epochs={trainer.max_epochs}; "
        "check trainer.limit_train_batches and trainer.max_steps."
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def metric_dict(metrics: dict) -> nn.ModuleDict:
    return nn.ModuleDict(metrics)


class DistillationModule(L.LightningModule):
    def __init__(
        self,
        step: DistillationStep,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        config_hash: int = 0,
        check_finite_every: int | None = None,
        gradient_clip: tuple[float, str] | None = None,
        role: str = "student",
    ):
        """``check_finite_every``: steps between non-finite loss checks (None: 1 on CPU, 50 on GPU).
        ``gradient_clip``: ``(value, algorithm)`` for runs that step their optimizers themselves (an
        adversary); Lightning clips the others from the trainer's settings. ``role``: the model this module
        trains, ``"student"`` or ``"teacher"`` (the teacher store's training), for messages only."""
        super().__init__()
        self.step = step
        self.task = step.task
        self.student = step.student
        self.algorithm = step.algorithm
        if step.scheme.trains_teacher:
            self.teachers = nn.ModuleList(step.teachers)
        else:  # a plain list is not registered: no parameters(), state_dict() or DDP for a frozen teacher
            self.__dict__["teachers"] = step.teachers
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.config_hash = config_hash
        self.check_finite_every, self.gradient_clip = check_finite_every, gradient_clip
        self.role = role
        self.adversary = step.algorithm.adversary()
        self.automatic_optimization = self.adversary is None
        self.best_val_epoch = -1
        self.best_val: float | None = None  # the best value of the task's monitored metric
        self._finite_guard: FiniteGuard | None = None
        self._epoch_sums: EpochSums | None = None

        task = step.task
        self.val_metrics = metric_dict(task.student_metrics())
        self.test_metrics = metric_dict(task.student_metrics())
        self.test_teacher_metrics = metric_dict(task.teacher_metrics())
        self.extra_val_metrics = nn.ModuleDict({n: metric_dict(task.student_metrics()) for n in step.extra_names})
        self.extra_test_metrics = nn.ModuleDict({n: metric_dict(task.student_metrics()) for n in step.extra_names})
        self.test_suffix = ""  # "" for the best-validation weights, "_last" for the last epoch's

    @property
    def teacher(self) -> nn.Module | None:
        return self.step.teacher

    @property
    def input_key(self) -> str:
        return self.step.input_key

    @property
    def teacher_input_key(self) -> str:
        return self.step.teacher_input_key

    @property
    def monitor(self) -> str:
        return f"val/{self.task.monitor}"

    # -- device moves for unregistered frozen teachers -------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if not self.step.scheme.trains_teacher:
            for teacher in self.teachers:
                teacher._apply(fn, *args, **kwargs)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    # -- training --------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # every rank of a job must train the same config (docs/sweeps.md)
            hashes = self.all_gather(torch.tensor(self.config_hash, device=self.device)).flatten().tolist()
            if len(set(hashes)) > 1:
                raise KDLabError(f"DDP ranks were given different configs (hashes {hashes}); see trainer=ddp docs.")

    def on_fit_end(self) -> None:
        # called when the fit loop ends, also when it was skipped for lack of batches (no on_train_end then)
        if self.trainer.global_step == 0:
            raise NoOptimizerStep(no_step_reason(self.trainer))

    def on_train_epoch_start(self) -> None:
        self.algorithm.on_epoch_start(self.current_epoch, self.trainer.max_epochs)

    def configure_callbacks(self) -> list[L.Callback]:
        """A teacher view store opens and writes its epochs from a callback: it also sees a failed fit. Only
        for a fit: a test after it would replace the fit's callback (and say so)."""
        if self.step.view_store is None or self.trainer.state.fn != TrainerFn.FITTING:
            return []
        return [ViewStoreHooks(self.step.view_store)]

    def _loss(self, terms: dict[str, Tensor], weight: int, prefix: str = "train/loss") -> Tensor:
        """The summed loss. Its terms are only stacked on the device here (no host sync, no ``self.log`` per
        step: ``kd_lab.core.step_stats``); ``_log_epoch_losses`` logs the epoch means."""
        loss = torch.stack(list(terms.values())).sum()
        values, names = stack_terms(loss, terms), tuple(terms)
        if self._finite_guard is None:
            every = self.check_finite_every or (1 if self.device.type == "cpu" else 50)
            self._finite_guard, self._epoch_sums = FiniteGuard(every, self.role), EpochSums()
        self._finite_guard.watch(self.current_epoch, self.global_step, names, values, loss)
        self._epoch_sums.add(prefix, names, values, weight)
        return loss

    def _log_epoch_losses(self) -> None:
        """``train/loss`` and ``train/loss_<term>``: weighted epoch means (under DDP Lightning reduces them
        across ranks), after a last non-finite check, so a NaN run never reaches validation or a checkpoint."""
        if self._finite_guard is None:
            return
        self._finite_guard.check()
        for name, (mean, n) in self._epoch_sums.pop_means().items():
            self.log(name, mean, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        weight = self.task.batch_weight(batch)
        out = self.step.outputs(batch, with_teacher=self.algorithm.needs_teacher, view=batch_idx)
        if self.adversary is None:
            loss = self._loss(self.step.terms(out), weight)
        else:
            loss = None
            self._adversarial_step(out, weight, batch_idx)
        if self.trainer.is_last_batch:
            self._log_epoch_losses()  # within the epoch, so epoch-end callbacks see this epoch's values
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch_losses()  # what the last batch did not log (an epoch cut short by max_steps)

    def _clip(self, optimizer) -> None:
        if self.gradient_clip:
            value, algorithm = self.gradient_clip
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)

    def _adversarial_step(self, out, weight: int, batch_idx: int) -> None:
        """The algorithm's adversary and the student take turns, each with its own optimizer:
        ``adversary.steps`` updates of the adversary every ``adversary.every`` steps, then the student's, whose
        terms see the adversary just updated."""
        student_opt, adversary_opt = self.optimizers()
        adversary = self.adversary
        if batch_idx % adversary.every == 0:
            for _ in range(adversary.steps):
                loss = self._loss(adversary.loss(out), weight, prefix="train/adversary_loss")
                adversary_opt.zero_grad()
                self.manual_backward(loss)
                self._clip(adversary_opt)
                adversary_opt.step()
        loss = self._loss(self.step.terms(out), weight)
        student_opt.zero_grad()
        self.manual_backward(loss)
        self._clip(student_opt)
        student_opt.step()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    # -- evaluation ------------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Tensor], metrics: nn.ModuleDict, extra_metrics: nn.ModuleDict):
        """The student's and the other models' logits on ``batch``, with their metrics updated."""
        logits, extra = self.step.eval_logits(batch)
        self.task.update_student(metrics, logits, batch)
        for name, z in extra.items():
            self.task.update_student(extra_metrics[name], z, batch)
        return logits, extra

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, _ = self._evaluate(batch, self.val_metrics, self.extra_val_metrics)
        loss = self.task.label_loss(logits, batch)
        self.log("val/loss", loss, on_epoch=True, batch_size=self.task.batch_weight(batch), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        values = _compute(self.val_metrics)
        extra = {f"{n}/val/{k}": v for n, ms in self.extra_val_metrics.items() for k, v in _compute(ms).items()}
        if self.trainer.sanity_checking:
            return
        for name, value in extra.items():
            self.log(name, value, sync_dist=True)
        monitored = float(values[self.task.monitor])
        if self.task.better(monitored, self.best_val):
            self.best_val_epoch, self.best_val = self.current_epoch, monitored
        # values from compute() are already global; sync_dist averages identical numbers (and keeps DDP quiet)
        for key, value in values.items():
            self.log(f"val/{key}", value, sync_dist=True)
        self.log(f"{self.monitor}_best", self.best_val, sync_dist=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, extra = self._evaluate(batch, self.test_metrics, self.extra_test_metrics)
        teacher_logits = self.step.reference_teacher_logits(batch, extra)
        if teacher_logits is not None:
            self.task.update_teacher(self.test_teacher_metrics, logits, teacher_logits, batch)

    def on_test_epoch_end(self) -> None:
        s = self.test_suffix
        for key, value in _compute(self.test_metrics).items():
            self.log(f"test/{key}{s}", value, sync_dist=True)
        for name, metrics in self.extra_test_metrics.items():
            for key, value in _compute(metrics).items():
                self.log(f"{name}/test/{key}{s}", value, sync_dist=True)
        if self.step.teacher is not None:
            for key, value in _compute(self.test_teacher_metrics).items():
                self.log(f"test/{key}{s}", value, sync_dist=True)

    # -- optimization and checkpoints ------------------------------------------------------------------
    def configure_optimizers(self):
        adversary = {id(p) for p in self.adversary.module.parameters()} if self.adversary else set()
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in adversary]
        optimizers = [self.optimizer_factory(params)]
        if self.adversary:
            optimizers.append(self.adversary.make_optimizer(list(self.adversary.module.parameters())))
        if self.scheduler_factory is None:
            return optimizers
        epochs = max(1, self.trainer.max_epochs or 1)
        total = self.trainer.estimated_stepping_batches
        steps_per_epoch = max(1, int(total // epochs)) if math.isfinite(total) else 1
        schedulers = [
            {"scheduler": self.scheduler_factory(opt, epochs, steps_per_epoch), "interval": "step"}
            for opt in optimizers[:1]
        ]
        return optimizers, schedulers

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What a resumed run needs beyond Lightning's weights, optimizers, schedulers and loop counters
        (buffers such as CRD's memory banks and an adversary's weights are in the state dict): the best-epoch
        tracker and the random number generators (dropout, sampled negatives). Data order and augmentation
        need nothing: they are drawn from ``(seed, epoch)``."""
        checkpoint["best_val_epoch"] = self.best_val_epoch
        if self.best_val is not None:
            checkpoint["best_val"] = self.best_val
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_val_epoch = checkpoint.get("best_val_epoch", -1)
        self.best_val = checkpoint.get("best_val", checkpoint.get("val_acc_best"))
        if "rng_states" in checkpoint and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            set_rng_states(checkpoint["rng_states"])  # testing a checkpoint leaves the generators alone


def _compute(metrics: nn.ModuleDict) -> dict[str, Tensor]:
    """Every metric's value, and a reset for the next epoch."""
    values = {}
    for key, metric in metrics.items():
        values[key] = metric.compute()
        metric.reset()
    return values
