"""The contract every distillation algorithm follows (one file per algorithm in this package).

An algorithm is an ``nn.Module`` that
  1. names the module paths it taps on the student and the teacher (``student_taps``, ``teacher_taps``);
  2. builds its learnable parts (connectors, heads) in ``build()`` from shapes probed with one forward;
  3. maps one step's recorded outputs to a dict of named, already weighted loss terms; their sum is the
     loss, and each is logged as ``train/loss_<name>``.
Its parameters are trained with the student. Its hyperparameters come from ``conf/algorithm/<name>.yaml``.

An algorithm registers itself by what its class declares: ``schemes`` (the schemes it runs under) and
``task_kinds`` (the tasks whose outputs it understands). The compatibility table of ``kd_lab.schemes`` is
derived from them. Value bounds live in the constructor's signature (``kd_lab.core.bounds``): the checks
before compute read them, and a direct construction in Python checks them too.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kd_lab.core.bounds import NonNegative, install_bound_checks
from kd_lab.core.tasks.base import Task
from kd_lab.errors import KDLabError


@dataclass
class StepOutputs:
    """What one training step recorded, handed to ``Algorithm.forward``."""

    logits: Tensor  # student logits (B, K)
    batch: dict[str, Tensor]  # input, target, index, and mixup fields when mixup is on
    teacher_logits: Tensor | None = None  # the first teacher's
    features: dict[str, Tensor] = field(default_factory=dict)  # student taps
    teacher_features: dict[str, Tensor] = field(default_factory=dict)  # the first teacher's taps
    all_teacher_logits: list[Tensor] = field(default_factory=list)  # every teacher (multi-teacher methods)
    all_teacher_features: list[dict[str, Tensor]] = field(default_factory=list)
    # Teachers that learn (online scheme): their logits with gradients. The fields above then hold detached
    # copies, so a distillation term never pushes the teacher toward the student by accident.
    live_teacher_logits: list[Tensor] = field(default_factory=list)
    task: Task | None = None  # what the labels mean: the label loss and the positions that count

    @property
    def target(self) -> Tensor:
        return self.batch["target"]

    def label_loss(self, logits: Tensor | None = None) -> Tensor:
        """The task's supervised loss of ``logits`` (the student's by default) on this batch."""
        if self.task is None:
            raise KDLabError("StepOutputs has no task: build it with task=<a kd_lab.core.tasks.Task>.")
        return self.task.label_loss(self.logits if logits is None else logits, self.batch)

    def positions(self) -> tuple[Tensor | None, Tensor | int]:
        """The output positions that count and what a sum over them is divided by. A token task gives its
        mask of valid tokens and its normalizer; a task with one output per sample gives (None, batch size)."""
        mask = self.task.valid_positions(self.batch)
        count = self.task.token_normalizer(self.batch)
        return mask, (self.logits.shape[0] if count is None else count)


@dataclass(frozen=True)
class Adversary:
    """An algorithm's second player: ``module``'s parameters are stepped by their own optimizer on ``loss``,
    ``steps`` times every ``every`` training steps, before the student's step (manual optimization)."""

    module: nn.Module
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    loss: Callable[["StepOutputs"], dict[str, Tensor]]
    steps: int = 1
    every: int = 1


@dataclass(frozen=True)
class BuildContext:
    """What an algorithm may need to know about the task and the data when it builds its parts."""

    task: Task  # e.g. ``task.num_classes`` for a classification head
    num_train: int  # training-set size: memory banks (CRD) are indexed by the global sample index
    train_targets: torch.Tensor | None = None  # label of each training index (class-aware negative sampling)
    all_teacher_shapes: list[dict[str, torch.Size]] = field(default_factory=list)  # one dict per teacher
    input_key: str = "input"  # the batch key the student reads
    teacher_input_key: str = "input"  # the batch key the teachers read
    input_shape: tuple[int, ...] = ()  # one student input without the batch axis (a generator's output shape)

    @property
    def paired_inputs(self) -> bool:
        """Teacher and student read different inputs (cross-modal data)."""
        return self.teacher_input_key != self.input_key


class Algorithm(nn.Module):
    name: str = "base"
    # Registration: the schemes this algorithm runs under, and the task kinds it understands.
    schemes: frozenset[str] = frozenset({"offline"})
    task_kinds: frozenset[str] = frozenset({"classification"})
    needs_teacher: bool = True  # False: the training step skips the teacher forward
    # True: the algorithm writes the loss terms of the teachers that learn (a cohort of peers), from
    # ``live_teacher_logits``; otherwise the scheme adds its own teacher terms.
    trains_teachers: bool = False
    # True: the algorithm replaces the real training inputs with its own (data-free distillation, through
    # ``training_batch``). Stored or cached teacher outputs of the real inputs then do not apply.
    synthesizes_inputs: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        install_bound_checks(cls)  # the constructor checks the bounds its signature declares

    def __init__(self, ce_weight: NonNegative = 1.0):
        super().__init__()
        self.ce_weight = ce_weight

    @property
    def student_taps(self) -> list[str]:
        return []

    @property
    def teacher_taps(self) -> list[str]:
        return []

    def teacher_taps_of(self, index: int) -> list[str]:
        """Taps of teacher ``index`` (0 is the reference teacher; multi-teacher methods use the others)."""
        return self.teacher_taps if index == 0 else []

    def teacher_name(self, index: int) -> str:
        """The metric prefix of teacher ``index`` when it learns (``teacher/val/acc``; a cohort says ``peer1``)."""
        return "teacher" if index == 0 else f"teacher{index}"

    def exit_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra classifiers evaluated next to the student (multi-exit self-distillation), from the student's
        recorded features: ``{name: logits}``; each gets ``<name>/val/acc`` and ``<name>/test/acc``."""
        return {}

    def report(self, student: nn.Module, example: Tensor) -> dict:
        """What ``results.json`` should record about the algorithm's own parts (e.g. each exit's cost)."""
        return {}

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch a training step sees. The default is the data's own batch. A data-free method returns
        synthetic inputs of the same batch size instead (and sets ``synthesizes_inputs = True``)."""
        return batch

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:
        """Called at the start of every training epoch (warm-ups, schedules of loss weights)."""

    def adversary(self) -> "Adversary | None":
        """A second player with its own optimizer (adversarial methods), or None. Called once the algorithm
        is built."""
        return None

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Resolve configured tap specs (indices, "embedding", paths; ``kd_lab.core.recorder.resolve_tap``) into
        the module paths that ``student_taps`` / ``teacher_taps`` return. Called before shapes are probed."""

    def bind_teachers(self, teachers: list[nn.Module]) -> None:
        """Like ``bind``, for methods that tap several teachers (called after ``bind``)."""

    def build(
        self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size], context: BuildContext
    ) -> None:
        """Create connectors from probed shapes (batch axis included). Raise ``KDLabError`` for a pair the
        method cannot bridge, saying why and what to pick instead."""

    def ce_term(self, out: StepOutputs) -> dict[str, Tensor]:
        return {"ce": self.ce_weight * out.label_loss()} if self.ce_weight else {}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        raise NotImplementedError
