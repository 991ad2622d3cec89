"""``DistillationModule``: teacher(s) + student + algorithm + scheme as one LightningModule.

One training step: teacher forwards (recording the teacher taps) -> student forward (recording the
student taps) -> ``algorithm(outputs)`` -> a dict of weighted loss terms, summed. The scheme decides
whether teachers learn; the algorithm decides what is compared (and, for adversarial methods, owns a second
optimizer); the module only wires them and keeps the metrics.
"""

import math
from collections.abc import Callable, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs, cross_entropy
from kd_lab.core.recorder import FeatureRecorder, probe_shapes
from kd_lab.core.step_stats import EpochSums, FiniteGuard, stack_terms
from kd_lab.errors import KDLabError
from kd_lab.run.fused_steps import OptimizerSteps, clip, count_logger_steps
from kd_lab.run.resume import rng_states, set_rng_states
from kd_lab.run.teacher_cache import TeacherCache
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
    # speed switches, set by kd_lab.run.perf.apply_perf (docs/performance.md); the defaults change nothing
    teacher_cache: TeacherCache | None = None  # teacher outputs computed once for the training set
    teacher_inference_mode: bool = False  # frozen teachers under torch.inference_mode instead of no_grad
    channels_last: bool = False  # 4-D (image) inputs in NHWC memory format, as the models are
    check_finite_every: int | None = None  # steps between non-finite loss checks; None: 1 on CPU, 50 on GPU
    steps_per_batch_reason: str = "set"  # why perf.steps_per_batch=auto chose what it chose (logged by train)
    gradient_clip: tuple[float, str] | None = None  # manual optimization: (value, algorithm), kd_lab.run.fused_steps
    _finite_guard: FiniteGuard | None = None
    _epoch_sums: EpochSums | None = None
    _optimizer_steps: OptimizerSteps | None = None  # perf.steps_per_batch, built once per fit

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
        teachers: list[nn.Module] | None = None,
        scheduler: SchedulerFactory | None = None,
        config_hash: int = 0,
        teacher_example_input: Tensor | None = None,
        input_key: str = "input",
        teacher_input_key: str = "input",
    ):
        super().__init__()
        teachers = [scheme.prepare_teacher(t) for t in teachers or []]
        if algorithm.needs_teacher and not teachers:
            raise KDLabError(f"algorithm '{algorithm.name}' needs a teacher; configure one (teacher=<name>).")
        self.student = student
        self.algorithm = algorithm
        self.scheme = scheme
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.config_hash = config_hash
        self.input_key, self.teacher_input_key = input_key, teacher_input_key
        self.best_val_epoch = -1
        if scheme.trains_teacher:
            self.teachers = nn.ModuleList(teachers)
        else:  # a plain list is not registered: no parameters(), state_dict() or DDP for a frozen teacher
            self.__dict__["teachers"] = teachers
        self.automatic_optimization = not algorithm.manual_optimization

        teacher_example = example_input if teacher_example_input is None else teacher_example_input
        check_logits(student, example_input, num_classes, "student")
        for i, teacher in enumerate(teachers):
            check_logits(teacher, teacher_example, num_classes, "teacher" if i == 0 else f"teacher {i}")
        algorithm.bind(student, self.teacher)
        algorithm.bind_teachers(teachers)
        self.student_recorder = FeatureRecorder(student, algorithm.student_taps, "student")
        self.teacher_recorders = [
            FeatureRecorder(t, algorithm.teacher_taps_of(i), "teacher" if i == 0 else f"teacher {i}")
            for i, t in enumerate(teachers)
        ]
        teacher_shapes = [
            probe_shapes(t, r.paths, teacher_example) for t, r in zip(teachers, self.teacher_recorders, strict=True)
        ]
        student_features = self._probe_features(example_input)  # one eval-mode forward: shapes and exit names
        algorithm.build(
            {path: f.shape for path, f in student_features.items()},
            teacher_shapes[0] if teachers else {},
            BuildContext(
                num_classes,
                num_train,
                train_targets,
                all_teacher_shapes=teacher_shapes,
                input_key=input_key,
                teacher_input_key=teacher_input_key,
            ),
        )

        # Other models evaluated next to the student, each under its own prefix (<name>/val/acc,
        # <name>/test/acc): teachers that learn, the algorithm's extra exits, and their ensemble.
        self.learning_teacher_names = (
            [algorithm.teacher_name(i) for i in range(len(teachers))] if scheme.trains_teacher else []
        )
        exits = list(self._probe_exits(student_features))
        self.extra_names = [*self.learning_teacher_names, *exits]
        if self.extra_names:
            self.extra_names.append("ensemble")  # mean of the student's and the others' probabilities
        self.extra_val_acc = nn.ModuleDict(
            {n: MulticlassAccuracy(num_classes, average="micro") for n in self.extra_names}
        )
        self.extra_test_acc = nn.ModuleDict(
            {n: MulticlassAccuracy(num_classes, average="micro") for n in self.extra_names}
        )
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_teacher_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_agreement = MulticlassAccuracy(num_classes, average="micro")
        self.test_kl = MeanMetric()
        self.test_suffix = ""  # "" for the best-validation weights, "_last" for the last epoch's

    @property
    def teacher(self) -> nn.Module | None:
        """The first (reference) teacher: test metrics are measured against it."""
        return self.teachers[0] if len(self.teachers) else None

    # -- device moves for unregistered frozen teachers -------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if not self.scheme.trains_teacher:
            for teacher in self.teachers:
                teacher._apply(fn, *args, **kwargs)
        return self

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    @torch.no_grad()
    def _probe_features(self, example: Tensor) -> dict[str, Tensor]:
        """The student's tapped features for ``example``, in eval mode (normalization statistics untouched)."""
        was_training = self.student.training
        self.student.eval()
        try:
            with self.student_recorder:
                self.student(example)
        finally:
            self.student.train(was_training)
        return self.student_recorder.features

    @torch.no_grad()
    def _probe_exits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The algorithm's extra classifiers on probed features, in eval mode (their BN statistics untouched)."""
        was_training = self.algorithm.training
        self.algorithm.eval()
        try:
            return self.algorithm.exit_logits(features)
        finally:
            self.algorithm.train(was_training)

    def _model_input(self, batch: dict[str, Tensor], key: str) -> Tensor:
        x = batch[key]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def _step_outputs(self, batch: dict[str, Tensor], with_teacher: bool) -> StepOutputs:
        out = StepOutputs(logits=None, batch=batch)  # type: ignore[arg-type]
        if with_teacher and self.teacher_cache is not None:
            if not self.teacher_cache.filled:  # once, on the run's device (every DDP rank caches all samples)
                self.teacher_cache.fill(self.teachers, self.teacher_recorders, self.device)
            out.all_teacher_logits, out.all_teacher_features = self.teacher_cache.lookup(batch["index"])
            out.teacher_logits, out.teacher_features = out.all_teacher_logits[0], out.all_teacher_features[0]
        elif with_teacher:
            x_t = self._model_input(batch, self.teacher_input_key)
            learning = self.scheme.trains_teacher and torch.is_grad_enabled()
            inference = self.teacher_inference_mode and not learning
            with torch.inference_mode() if inference else torch.set_grad_enabled(learning):
                for teacher, recorder in zip(self.teachers, self.teacher_recorders, strict=True):
                    with recorder:
                        out.all_teacher_logits.append(teacher(x_t))
                    out.all_teacher_features.append(recorder.features)
            if inference:  # inference tensors cannot be saved for backward: normal copies for the losses
                out.all_teacher_logits = [z.clone() for z in out.all_teacher_logits]
                out.all_teacher_features = [{k: v.clone() for k, v in f.items()} for f in out.all_teacher_features]
            if learning:  # the algorithm sees detached copies; the teachers' own terms use the live logits
                out.live_teacher_logits = out.all_teacher_logits
                out.all_teacher_logits = [z.detach() for z in out.all_teacher_logits]
                out.all_teacher_features = [{k: v.detach() for k, v in f.items()} for f in out.all_teacher_features]
            out.teacher_logits, out.teacher_features = out.all_teacher_logits[0], out.all_teacher_features[0]
        with self.student_recorder:
            out.logits = self.student(self._model_input(batch, self.input_key))
        out.features = self.student_recorder.features
        return out

    # -- training --------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # every rank of a job must train the same config (STACK-NOTES)
            hashes = self.all_gather(torch.tensor(self.config_hash, device=self.device)).flatten().tolist()
            if len(set(hashes)) > 1:
                raise KDLabError(f"DDP ranks were given different configs (hashes {hashes}); see trainer=ddp docs.")

    def on_train_start(self) -> None:
        self._optimizer_steps = None  # a new fit (or a resumed one) has new optimizers

    def on_train_epoch_start(self) -> None:
        self.algorithm.on_epoch_start(self.current_epoch, self.trainer.max_epochs)

    def _loss(self, terms: dict[str, Tensor], prefix: str = "train/loss") -> Tensor:
        """The summed loss. Its terms are only stacked and added up on the device here (no host sync, no
        ``self.log`` per step: ``kd_lab.core.step_stats``); ``_log_epoch_losses`` logs the epoch means."""
        loss = torch.stack(list(terms.values())).sum()
        values, names = stack_terms(loss, terms), tuple(terms)
        if self._finite_guard is None:
            every = self.check_finite_every or (1 if self.device.type == "cpu" else 50)
            self._finite_guard, self._epoch_sums = FiniteGuard(every), EpochSums()
        self._finite_guard.watch(self.current_epoch, self.global_step, names, values, loss)
        self._epoch_sums.add(prefix, names, values, self._batch_size)
        return loss

    def _log_epoch_losses(self) -> None:
        """``train/loss`` and ``train/loss_<term>``: batch-size weighted epoch means (under DDP Lightning reduces
        them across ranks), after a last non-finite check, so a NaN run never reaches validation or a checkpoint."""
        if self._finite_guard is None:
            return
        self._finite_guard.check()
        for name, (mean, n) in self._epoch_sums.pop_means().items():
            self.log(name, mean, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def training_step(self, batch: dict[str, Tensor] | list[dict[str, Tensor]], batch_idx: int) -> Tensor | None:
        if isinstance(batch, list):  # perf.steps_per_batch: a chunk of batches, one optimizer step each
            loss = None
            count_logger_steps(self.trainer, len(batch))
            for sub in batch:
                self._fused_step(sub)
        else:
            self._batch_size = len(batch["target"])
            out = self._step_outputs(batch, with_teacher=self.algorithm.needs_teacher)
            loss = self._loss(self._terms(out)) if self.automatic_optimization else self._manual_step(out, batch_idx)
        if self._trainer is not None and self.trainer.is_last_batch:
            self._log_epoch_losses()  # within the epoch, so epoch-end callbacks see this epoch's values
        return loss

    def _fused_step(self, batch: dict[str, Tensor]) -> None:
        """One optimizer step of a chunk (``kd_lab.run.perf``, manual optimization): what Lightning's automatic loop
        does for a batch, without the per-batch work around it (fetch, transfer, batch start/end hooks); the
        backward and step themselves skip Lightning's hooks when nothing uses them (``kd_lab.run.fused_steps``)."""
        self._batch_size = len(batch["target"])
        loss = self._loss(self._terms(self._step_outputs(batch, with_teacher=self.algorithm.needs_teacher)))
        if self._optimizer_steps is None:
            self._optimizer_steps = OptimizerSteps(self)
        self._optimizer_steps(loss)

    def on_train_epoch_end(self) -> None:
        self._log_epoch_losses()  # what the last batch did not log (an epoch cut short by max_steps)

    def _terms(self, out: StepOutputs) -> dict[str, Tensor]:
        """The algorithm's terms, plus the learning teachers' own terms unless the algorithm writes them."""
        terms = self.algorithm(out)
        if out.live_teacher_logits and not self.algorithm.trains_teachers:
            terms.update(self.scheme.teacher_terms(out))
        return terms

    def _manual_step(self, out: StepOutputs, batch_idx: int) -> None:
        """Adversarial methods: the algorithm's adversary (a discriminator) and the student take turns, each
        with its own optimizer; ``adversary_steps`` updates of the adversary every ``adversary_every`` steps."""
        student_opt, adversary_opt = self.optimizers()
        algorithm = self.algorithm
        if batch_idx % algorithm.adversary_every == 0:
            for _ in range(algorithm.adversary_steps):
                loss = self._loss(algorithm.adversary_loss(out), prefix="train/adversary_loss")
                adversary_opt.zero_grad()
                self.manual_backward(loss)
                clip(self, adversary_opt)
                adversary_opt.step()
        loss = self._loss(self._terms(out))
        student_opt.zero_grad()
        self.manual_backward(loss)
        clip(self, student_opt)
        student_opt.step()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    def _eval_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's logits, and those of every other model evaluated next to it (see ``extra_names``)."""
        if not self.extra_names:
            return self.student(batch[self.input_key]), {}
        with self.student_recorder:
            logits = self.student(batch[self.input_key])
        extra = self.algorithm.exit_logits(self.student_recorder.features)
        for name, teacher in zip(self.learning_teacher_names, self.teachers, strict=True):
            extra[name] = teacher(batch[self.teacher_input_key])
        extra["ensemble"] = torch.stack([F.softmax(z, -1) for z in [logits, *extra.values()]]).mean(0)
        return logits, extra

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits, extra = self._eval_logits(batch)
        self.val_acc.update(logits, batch["target"])
        for name, z in extra.items():
            self.extra_val_acc[name].update(z, batch["target"])
        loss = cross_entropy(logits, batch)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(batch["target"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc.reset()
        extra = {f"{name}/val/acc": metric.compute() for name, metric in self.extra_val_acc.items()}
        for metric in self.extra_val_acc.values():
            metric.reset()
        if self.trainer.sanity_checking:
            return
        for name, value in extra.items():
            self.log(name, value, sync_dist=True)
        if self.best_val_epoch < 0 or acc > self.val_acc_best.compute():
            self.best_val_epoch = self.current_epoch
        self.val_acc_best.update(acc)
        # values from compute() are already global; sync_dist averages identical numbers (and keeps DDP quiet)
        self.log("val/acc", acc, sync_dist=True)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        y = batch["target"]
        logits, extra = self._eval_logits(batch)
        self.test_acc.update(logits, y)
        for name, z in extra.items():
            self.extra_test_acc[name].update(z, y)
        if self.teacher is not None:
            # a teacher that learns was already evaluated with the other models; a frozen one runs here
            teacher_logits = extra.get(self.learning_teacher_names[0]) if self.learning_teacher_names else None
            if teacher_logits is None:
                teacher_logits = self.teacher(batch[self.teacher_input_key])
            self.test_teacher_acc.update(teacher_logits, y)
            self.test_agreement.update(logits, teacher_logits.argmax(-1))
            log_p_s, log_p_t = F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1)
            self.test_kl.update(F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1))

    def on_test_epoch_end(self) -> None:
        s = self.test_suffix
        self.log(f"test/acc{s}", self.test_acc.compute(), sync_dist=True)
        self.test_acc.reset()
        for name, metric in self.extra_test_acc.items():
            self.log(f"{name}/test/acc{s}", metric.compute(), sync_dist=True)
            metric.reset()
        if self.teacher is not None:
            self.log(f"test/teacher_acc{s}", self.test_teacher_acc.compute(), sync_dist=True)
            self.log(f"test/agreement{s}", self.test_agreement.compute(), sync_dist=True)
            self.log(f"test/kl_to_teacher{s}", self.test_kl.compute(), sync_dist=True)
            for metric in (self.test_teacher_acc, self.test_agreement, self.test_kl):
                metric.reset()

    # -- optimization and checkpoints ------------------------------------------------------------------
    def configure_optimizers(self):
        adversary = {id(p) for p in self.algorithm.adversary_parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in adversary]
        optimizers = [self.optimizer_factory(params)]
        if adversary:
            optimizers.append(self.algorithm.adversary_optimizer())
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
        trackers (torchmetrics states are not saved) and the random number generators (dropout, sampled
        negatives; Lightning saves them only in its own fault-tolerant checkpoints). Data order and
        augmentation need nothing: they are drawn from ``(seed, epoch)``."""
        checkpoint["best_val_epoch"] = self.best_val_epoch
        if self.best_val_epoch >= 0:
            checkpoint["val_acc_best"] = float(self.val_acc_best.compute())
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_val_epoch = checkpoint.get("best_val_epoch", -1)
        self.val_acc_best.reset()
        if "val_acc_best" in checkpoint:
            self.val_acc_best.update(checkpoint["val_acc_best"])
        if "rng_states" in checkpoint and self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            set_rng_states(checkpoint["rng_states"])  # testing a checkpoint leaves the generators alone
