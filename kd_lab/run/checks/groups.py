"""Typed schemas of the config groups that have no ``_target_`` of their own: their dataclass is their
signature, so they are checked exactly like a node with a target."""

from dataclasses import dataclass
from typing import Any


@dataclass
class TeacherGroup:
    """``conf/teacher/*.yaml``: a teacher model and the recipe the teacher store trains it with."""

    name: str
    model: dict[str, Any]
    optim: dict[str, Any]
    ckpt_path: str | None = None
    seed: int = 0
    max_epochs: int = 30


@dataclass
class StudentGroup:
    """``conf/student/*.yaml``: the model being distilled."""

    name: str
    model: dict[str, Any]
    # null, "every_other", a list of teacher layers, or {layers: ...}: kd_lab/models/init_from_teacher.py
    init_from_teacher: Any = None


@dataclass
class OptimGroup:
    """``conf/optim/*.yaml`` (also ``teacher.optim``): an optimizer and an optional per-step schedule."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None


@dataclass
class RunScalars:
    """Typed scalar keys of ``conf/train.yaml`` itself. ``data.seed`` interpolates ``${seed}``: a bad seed is
    reported as ``seed``, the key that was set, before the node that follows it."""

    seed: int = 0
    threads: int | None = 1  # torch's CPU threads per process; None: torch's default


# dotted config path -> its schema
GROUP_SCHEMAS: dict[str, type] = {
    "teacher": TeacherGroup,
    "student": StudentGroup,
    "optim": OptimGroup,
    "teacher.optim": OptimGroup,
}
