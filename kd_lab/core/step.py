"""``DistillationStep``: one training or evaluation step of teacher(s) + student + algorithm + scheme + task,
with no Lightning in it, so that it can be read top to bottom and tested with plain tensors.

    batch -> teacher forwards (recording the teacher taps; or the teacher cache)
          -> student forward (recording the student taps)
          -> algorithm(StepOutputs) -> named, weighted loss terms (+ the learning teachers' own terms)

The constructor is the build-time check of the run: the task checks every model's output, the recorders
validate the tap paths, one eval-mode forward probes the feature shapes, and the algorithm builds its
connectors from them. Whatever cannot work raises ``KDLabError`` here, before any training.

The step holds references to the models; the LightningModule (``kd_lab.run.module``) registers them, so
parameters, state-dict keys and device moves are Lightning's usual ones.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.core.outputs import logits_of
from kd_lab.core.recorder import FeatureRecorder, probe_shapes
from kd_lab.core.tasks.base import Task
from kd_lab.errors import KDLabError
from kd_lab.schemes.base import Scheme


@dataclass(frozen=True)
class StepPlan:
    """The speed switches that change how a step runs but never what it computes (``conf/perf``)."""

    teacher_inference_mode: bool = False  # frozen teachers under torch.inference_mode, outputs cloned
    channels_last: bool = False  # 4-D (image) inputs in NHWC memory format, as the models are


def teacher_role(index: int) -> str:
    return "teacher" if index == 0 else f"teacher {index}"


class DistillationStep:
    def __init__(
        self,
        student: nn.Module,
        algorithm: Algorithm,
        scheme: Scheme,
        task: Task,
        example_input: Tensor,
        teachers: list[nn.Module] | None = None,
        teacher_example_input: Tensor | None = None,
        input_key: str = "input",
        teacher_input_key: str = "input",
        num_train: int = 0,
        train_targets: Tensor | None = None,
        plan: StepPlan = StepPlan(),
        teacher_cache=None,  # kd_lab.run.teacher_cache.TeacherCache: frozen teachers' outputs, read by index
        view_store=None,  # kd_lab.run.view_store.ViewStore: frozen teachers' outputs per (epoch, batch)
        datamodule=None,  # what the task's model checks may ask (a language model's block size)
    ):
        teachers = [scheme.prepare_teacher(t) for t in teachers or []]
        if algorithm.needs_teacher and not teachers:
            raise KDLabError(f"algorithm '{algorithm.name}' needs a teacher; configure one (teacher=<name>).")
        self.student, self.algorithm, self.scheme, self.task = student, algorithm, scheme, task
        self.teachers = teachers
        self.input_key, self.teacher_input_key = input_key, teacher_input_key
        self.plan, self.teacher_cache, self.view_store = plan, teacher_cache, view_store

        teacher_example = example_input if teacher_example_input is None else teacher_example_input
        task.check_model(student, datamodule, "student")
        for i, teacher in enumerate(teachers):
            task.check_model(teacher, datamodule, teacher_role(i))
        task.check_output(self._probe_logits(student, example_input, "student"), "student")
        self.teacher_logit_shapes = []  # per teacher, batch axis included (a view store sizes itself by them)
        for i, teacher in enumerate(teachers):
            logits = self._probe_logits(teacher, teacher_example, teacher_role(i))
            task.check_output(logits, teacher_role(i))
            self.teacher_logit_shapes.append(logits.shape)
        algorithm.bind(student, self.teacher)
        algorithm.bind_teachers(teachers)
        self.student_recorder = FeatureRecorder(student, algorithm.student_taps, "student")
        self.teacher_recorders = [
            FeatureRecorder(t, algorithm.teacher_taps_of(i), teacher_role(i)) for i, t in enumerate(teachers)
        ]
        teacher_shapes = [
            probe_shapes(t, r.paths, teacher_example) for t, r in zip(teachers, self.teacher_recorders, strict=True)
        ]
        self.teacher_feature_shapes = teacher_shapes
        student_features = self._probe_features(example_input)
        algorithm.build(
            {path: f.shape for path, f in student_features.items()},
            teacher_shapes[0] if teachers else {},
            BuildContext(
                task,
                num_train,
                train_targets,
                all_teacher_shapes=teacher_shapes,
                input_key=input_key,
                teacher_input_key=teacher_input_key,
                input_shape=tuple(example_input.shape[1:]),
            ),
        )
        # Other models evaluated next to the student, each under its own prefix (<name>/val/acc):
        # teachers that learn, the algorithm's extra exits, and their ensemble.
        self.learning_teacher_names = (
            [algorithm.teacher_name(i) for i in range(len(teachers))] if scheme.trains_teacher else []
        )
        self.extra_names = [*self.learning_teacher_names, *self._probe_exits(student_features)]
        if self.extra_names:
            self.extra_names.append("ensemble")

    @property
    def teacher(self) -> nn.Module | None:
        """The first (reference) teacher: test metrics compare the student with it."""
        return self.teachers[0] if self.teachers else None

    # -- build-time probes (eval mode, so normalization statistics are untouched) ------------------------
    def logits(self, output, role: str) -> Tensor:
        """A model's output as the losses see it: the adapter's logits, in the task's view."""
        return self.task.output_view(logits_of(output, role))

    @torch.no_grad()
    def _probe_logits(self, model: nn.Module, example: Tensor, role: str) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            output = model(example)
        except (RuntimeError, IndexError, TypeError, ValueError) as e:  # the model cannot read this data at all
            raise KDLabError(
                f"the {role} ({type(model).__name__}) cannot take the data's input (a {example.dtype} tensor of "
                f"shape {tuple(example.shape)}): {type(e).__name__}: {e}. Pick a {role} made for this data "
                f"(the task is {self.task.name})."
            ) from e
        finally:
            model.train(was_training)
        return self.logits(output, role)

    @torch.no_grad()
    def _probe_features(self, example: Tensor) -> dict[str, Tensor]:
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
        was_training = self.algorithm.training
        self.algorithm.eval()
        try:
            return self.algorithm.exit_logits(features)
        finally:
            self.algorithm.train(was_training)

    # -- training --------------------------------------------------------------------------------------
    def model_input(self, batch: dict[str, Tensor], key: str) -> Tensor:
        x = batch[key]
        return x.contiguous(memory_format=torch.channels_last) if self.plan.channels_last and x.dim() == 4 else x

    def outputs(self, batch: dict[str, Tensor], with_teacher: bool = True, view: int | None = None) -> StepOutputs:
        """Every model's forward on ``batch``, recorded as the algorithm asked. ``view``: the batch's index in
        its training epoch, where a view store may hold the teachers' outputs (None: compute them)."""
        batch = self.algorithm.training_batch(batch)  # data-free methods swap in synthetic inputs here
        out = StepOutputs(logits=None, batch=batch, task=self.task)  # type: ignore[arg-type]
        if with_teacher and self.teachers:
            self._teacher_outputs(out, batch, view)
        with self.student_recorder:
            out.logits = self.logits(self.student(self.model_input(batch, self.input_key)), "student")
        out.features = self.student_recorder.features
        return out

    def _teacher_outputs(self, out: StepOutputs, batch: dict[str, Tensor], view: int | None = None) -> None:
        store = self.view_store if view is not None else None
        stored = store.lookup(view, batch[self.input_key].device) if store is not None else None
        if self.teacher_cache is not None:
            if not self.teacher_cache.filled:  # once, on the run's device (every DDP rank caches all samples)
                self.teacher_cache.fill(self.teachers, self.teacher_recorders, batch[self.input_key].device)
            out.all_teacher_logits, out.all_teacher_features = self.teacher_cache.lookup(batch["index"])
        elif stored is not None and not store.needs_check:
            out.all_teacher_logits, out.all_teacher_features = stored
        else:
            x_t = self.model_input(batch, self.teacher_input_key)
            learning = self.scheme.trains_teacher and torch.is_grad_enabled()
            inference = self.plan.teacher_inference_mode and not learning
            with torch.inference_mode() if inference else torch.set_grad_enabled(learning):
                for i, (teacher, recorder) in enumerate(zip(self.teachers, self.teacher_recorders, strict=True)):
                    with recorder:
                        out.all_teacher_logits.append(self.logits(teacher(x_t), teacher_role(i)))
                    out.all_teacher_features.append(recorder.features)
            if inference:  # inference tensors cannot be saved for backward: normal copies for the losses
                out.all_teacher_logits = [z.clone() for z in out.all_teacher_logits]
                out.all_teacher_features = [{k: v.clone() for k, v in f.items()} for f in out.all_teacher_features]
            if learning:  # the algorithm sees detached copies; the teachers' own terms use the live logits
                out.live_teacher_logits = out.all_teacher_logits
                out.all_teacher_logits = [z.detach() for z in out.all_teacher_logits]
                out.all_teacher_features = [{k: v.detach() for k, v in f.items()} for f in out.all_teacher_features]
            if stored is not None:  # the run's first stored batch, computed live as well: do they agree?
                store.check(stored[0], out.all_teacher_logits)
                out.all_teacher_logits, out.all_teacher_features = stored
            elif store is not None:  # filled (or computed live while another run fills this epoch)
                store.record(view, out.all_teacher_logits, out.all_teacher_features)
                out.all_teacher_logits = [store.view_of(z) for z in out.all_teacher_logits]
        out.teacher_logits, out.teacher_features = out.all_teacher_logits[0], out.all_teacher_features[0]

    def terms(self, out: StepOutputs) -> dict[str, Tensor]:
        """The algorithm's terms, plus the learning teachers' own terms unless the algorithm writes them."""
        terms = self.algorithm(out)
        if out.live_teacher_logits and not self.algorithm.trains_teachers:
            terms.update(self.scheme.teacher_terms(out))
        return terms

    def training_terms(self, batch: dict[str, Tensor], view: int | None = None) -> dict[str, Tensor]:
        """One training batch's loss terms (what a test without a Trainer calls)."""
        return self.terms(self.outputs(batch, with_teacher=self.algorithm.needs_teacher, view=view))

    # -- evaluation ------------------------------------------------------------------------------------
    def eval_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's logits, and those of every other model evaluated next to it (``extra_names``)."""
        x = batch[self.input_key]
        if not self.extra_names:
            return self.logits(self.student(x), "student"), {}
        with self.student_recorder:
            logits = self.logits(self.student(x), "student")
        extra = self.algorithm.exit_logits(self.student_recorder.features)
        for name, teacher in zip(self.learning_teacher_names, self.teachers, strict=True):
            extra[name] = self.logits(teacher(batch[self.teacher_input_key]), name)
        extra["ensemble"] = self.task.ensemble([logits, *extra.values()])
        return logits, extra

    def reference_teacher_logits(self, batch: dict[str, Tensor], extra: dict[str, Tensor]) -> Tensor | None:
        """The reference teacher's logits on an evaluation batch (a learning teacher's are in ``extra``)."""
        if self.teacher is None:
            return None
        if self.learning_teacher_names:
            return extra[self.learning_teacher_names[0]]
        return self.logits(self.teacher(batch[self.teacher_input_key]), "teacher")
