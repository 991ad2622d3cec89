"""Build the run's module once with untrained teachers, before the teacher store trains anything.

A tap path that does not exist, feature shapes that no connector can bridge, or logits that disagree with
the data's class count raise when the module is built. In a run whose teacher comes from the store, that
happens only after the teacher has been loaded or trained (minutes to hours); building the same module
with freshly initialized teachers raises the same error first. The data module it loads (and checks) is
returned for the run to use, so the data are read once.
"""

from omegaconf import DictConfig

from kd_lab.data.base import TensorDataModule
from kd_lab.run.builders import build, build_datamodule, build_model, build_module, group_option


def dry_build(cfg: DictConfig) -> TensorDataModule | None:
    """The loaded data module of ``cfg`` (None where nothing was built)."""
    if "_target_" not in cfg.algorithm or not cfg.get("teacher"):
        return None  # a chain of stages (each stage is a run that validates itself), or no teacher to wait for
    scheme = build(cfg.scheme)
    if scheme.teacher_source != "store":
        return None  # teachers built inside the run: the run builds its module before any training anyway
    datamodule = build_datamodule(cfg)  # loads and checks the data (NaN/Inf, labels, shapes)
    teachers = [build_model(cfg.teacher.model)]
    for name in cfg.algorithm.get("extra_teachers") or []:
        extra = group_option(cfg, "teacher", name, "teacher", keep=("optim",))
        teachers.append(build_model(extra.teacher.model))
    student = build_model(cfg.student.model)
    build_module(cfg, datamodule, student, build(cfg.algorithm), scheme, cfg.optim, teachers)
    return datamodule
