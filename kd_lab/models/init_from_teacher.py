"""``student.init_from_teacher``: the student starts from the teacher's weights, one teacher block per student
block, plus the embeddings, the final norm and the head.

DistilBERT (Sanh et al. 2019) initializes its student "by taking one layer out of two" of the teacher:
``layers: every_other`` copies teacher blocks 0, 2, 4, ... A list (``layers: [0, 2, 4]``) names the teacher
block of each student block. Every other tensor is copied by name. The copy needs the same architecture
family, width and heads: a mismatch is refused, naming the first mismatching parameter, because a partial
copy would silently train a different model than the config says.

The config accepts ``null`` (off), ``every_other``, a list of teacher layers, or ``{layers: <one of those>}``.
The plan is checked right after the run's build, before the teacher store trains a teacher; it is applied
once the teacher has its weights, before the student's first step (kd_lab/run/train.py).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd_lab.core.recorder import block_paths
from kd_lab.errors import KDLabError

EVERY_OTHER = "every_other"
KEY = "student.init_from_teacher"


@dataclass(frozen=True)
class InitPlan:
    """Which teacher tensor goes into which student tensor; checked, not yet applied."""

    student: nn.Module
    teacher: nn.Module
    teacher_layers: tuple[int, ...]  # teacher block of student block j
    names: tuple[tuple[str, str], ...]  # (student tensor, teacher tensor)

    def apply(self) -> dict[str, Any]:
        """Copy the weights in place; returns what results.json records."""
        theirs = self.teacher.state_dict()
        ours = self.student.state_dict(keep_vars=True)
        with torch.no_grad():
            for mine, source in self.names:
                ours[mine].copy_(theirs[source])
        return {
            "teacher_layers": list(self.teacher_layers),
            "student_layers": list(range(len(self.teacher_layers))),
            "tensors": len(self.names),
        }


def parse_layers(spec: Any) -> str | list[int]:
    """The ``layers`` of the config node: ``every_other`` or a list of teacher layers."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"layers"}
        if unknown:
            raise KDLabError(
                f"{KEY} has unknown keys {sorted(unknown)}; it takes only 'layers' (every_other or a list of "
                "teacher layers), e.g. student.init_from_teacher={layers:[0,2]}."
            )
        spec = spec.get("layers", EVERY_OTHER)
    if spec is True:
        spec = EVERY_OTHER
    if isinstance(spec, str):
        if spec != EVERY_OTHER:
            raise KDLabError(
                f"{KEY}={spec!r} is unknown; use {EVERY_OTHER!r} (teacher layers 0, 2, 4, ...) or a list of "
                "teacher layers, one per student layer, e.g. [0, 2]."
            )
        return spec
    if isinstance(spec, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        return list(spec)
    raise KDLabError(
        f"{KEY}={spec!r} is not valid; give null (off), {EVERY_OTHER!r} or a list of teacher layers (0-based), "
        "one per student layer."
    )


def plan_init(student: nn.Module, teacher: nn.Module, spec: Any) -> InitPlan:
    """Check that ``teacher`` can initialize ``student`` as ``spec`` says; nothing is copied yet."""
    family_s, family_t = _family(student, "student"), _family(teacher, "teacher")
    if family_s != family_t:
        raise KDLabError(
            f"{KEY} copies weights within one architecture family, but the student is {family_s} and the "
            f"teacher {family_t}; use a student of the teacher's family, or set {KEY}=null."
        )
    heads_s, heads_t = _heads(student), _heads(teacher)
    if heads_s != heads_t:
        raise KDLabError(
            f"{KEY}: the student has {heads_s} attention heads and the teacher {heads_t}; copied attention "
            f"weights would be split into other heads. Give the student {heads_t} heads, or set {KEY}=null."
        )
    blocks_s, blocks_t = block_paths(student), block_paths(teacher)
    layers = _teacher_layers(parse_layers(spec), len(blocks_s), len(blocks_t))
    theirs = teacher.state_dict()
    names = []
    for name, tensor in student.state_dict().items():
        source = _source_name(name, blocks_s, blocks_t, layers)
        if source not in theirs:
            raise KDLabError(
                f"{KEY}: the student's parameter {name} has no teacher counterpart {source}; the two models are "
                f"not built alike. Use the same model config with fewer layers, or set {KEY}=null."
            )
        if theirs[source].shape != tensor.shape:
            raise KDLabError(
                f"{KEY}: the student's {name} has shape {tuple(tensor.shape)} but the teacher's {source} has "
                f"{tuple(theirs[source].shape)}: the copy needs the same width and vocabulary. Give the student "
                f"the teacher's hidden size, or set {KEY}=null and bridge the widths with algorithm=fitnet."
            )
        names.append((name, source))
    return InitPlan(student, teacher, tuple(layers), tuple(names))


def plan_from_config(cfg, run) -> InitPlan | None:
    """The plan of ``cfg.student.init_from_teacher`` for a built run, or None when it is off."""
    spec = cfg.student.get("init_from_teacher")
    if spec is None or spec is False:
        return None
    if run.scheme.teacher_source != "store" or not run.teachers:
        raise KDLabError(
            f"{KEY} needs a trained teacher before the fit (scheme=offline); scheme={cfg.scheme.name} has "
            f"{'no teacher' if not run.teachers else 'a teacher that learns with the student'}. "
            f"Use scheme=offline, or set {KEY}=null."
        )
    container = spec if isinstance(spec, (str, bool, int)) else _plain(spec)
    return plan_init(run.student, run.teachers[0], container)


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _teacher_layers(layers: str | list[int], m: int, n: int) -> list[int]:
    if layers == EVERY_OTHER:
        if 2 * (m - 1) >= n:
            raise KDLabError(
                f"{KEY}=every_other needs at least {2 * m - 1} teacher layers for {m} student layers, but the "
                f"teacher has {n}; give a list of {m} teacher layers instead, e.g. {list(range(m))}."
            )
        return list(range(0, 2 * m, 2))
    if len(layers) != m:
        raise KDLabError(
            f"{KEY} lists {len(layers)} teacher layers {layers}, but the student has {m} layers; give one "
            f"teacher layer per student layer."
        )
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise KDLabError(f"{KEY}: teacher layer {bad[0]} is out of range; the teacher has layers 0..{n - 1}.")
    return layers


def _source_name(name: str, blocks_s: list[str], blocks_t: list[str], layers: list[int]) -> str:
    for j, prefix in enumerate(blocks_s):
        if name.startswith(prefix + "."):
            return blocks_t[layers[j]] + name[len(prefix) :]
    return name  # embeddings, final norm, head: the same name in both


def _family(model: nn.Module, role: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not model_type or not block_paths(model):
        raise KDLabError(
            f"{KEY}: the {role} ({type(model).__name__}) is not a Hugging Face transformer with a block list; "
            f"it works for GPT-2, BERT and Llama models (kd_lab.models.hf). Set {KEY}=null."
        )
    return f"{model_type} ({type(model).__name__})"


def _heads(model: nn.Module) -> int | None:
    return getattr(model.config, "num_attention_heads", None)
