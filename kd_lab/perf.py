"""The ``perf`` config group applied to a built module: speed switches that leave the run's math alone.

- ``cache_teacher``: teacher outputs computed once for the training set (``kd_lab.teacher_cache``); refused
  with a clear error when augmentation or a learning teacher would make them wrong.
- ``teacher_inference_mode``: frozen teachers run under ``torch.inference_mode`` (no autograd bookkeeping at
  all); their outputs are cloned into normal tensors, which the losses may save for backward.
- ``channels_last``: NHWC memory format for the models and for 4-D (image) batches, what cuDNN's tensor-core
  convolutions want under bf16; a no-op for 1-D signals and MLPs.
- ``compile``: ``nn.Module.compile()`` of student and teacher, in place, so state-dict keys (checkpoints) are
  unchanged; ``compile_backend`` picks torch.compile's backend.
- ``check_finite_every``: steps between non-finite loss checks (``kd_lab.step_stats.FiniteGuard``).
- ``steps_per_batch``: Lightning gets lists of that many training batches and the module takes one optimizer
  step per batch in a list (manual optimization), so Lightning's per-batch machinery (~0.3-0.5 ms of hooks
  and bookkeeping, a third of a small model's step) runs once per list. The same optimizer steps on the same
  batches with the same schedule; but Lightning's batch counts count lists (``limit_train_batches``,
  ``val_check_interval``, ``fast_dev_run``, ``max_steps`` is checked after a whole list).
"""

import difflib

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig

from kd_lab.errors import KDLabError
from kd_lab.module import DistillationModule, SchedulerFactory
from kd_lab.teacher_cache import TeacherCache, check_cacheable

DEFAULTS = {
    "cache_teacher": False,
    "teacher_inference_mode": False,
    "channels_last": False,
    "compile": False,
    "compile_backend": "inductor",
    "check_finite_every": None,
    "steps_per_batch": 1,
}


def apply_perf(perf: DictConfig | dict | None, module: DistillationModule, datamodule) -> DistillationModule:
    settings = {**DEFAULTS, **(dict(perf) if perf else {})}
    for key in set(settings) - set(DEFAULTS):
        near = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f"did you mean perf.{near[0]}? " if near else ""
        raise KDLabError(f"unknown key perf.{key}: {hint}perf takes {sorted(DEFAULTS)} (conf/perf/default.yaml).")
    module.check_finite_every = settings["check_finite_every"]
    module.teacher_inference_mode = bool(settings["teacher_inference_mode"])
    models = [module.student, *module.teachers]
    if settings["channels_last"]:
        module.channels_last = True
        for model in models:
            model.to(memory_format=torch.channels_last)
    if settings["cache_teacher"] and len(module.teachers) and module.algorithm.needs_teacher:
        check_cacheable(datamodule, module.scheme.trains_teacher)
        inputs = datamodule.splits["train"][datamodule.teacher_input_key]
        module.teacher_cache = TeacherCache(inputs, datamodule.eval_batch_size)
    if int(settings["steps_per_batch"]) != 1:
        fuse_steps(module, datamodule, int(settings["steps_per_batch"]))
    if settings["compile"]:
        for model in models:
            model.compile(backend=settings["compile_backend"])
    return module


def fuse_steps(module: DistillationModule, datamodule, steps: int) -> None:
    """``perf.steps_per_batch``: see the module docstring."""
    if steps < 1:
        raise KDLabError(f"perf.steps_per_batch={steps} must be >= 1 (1: one optimizer step per Lightning batch).")
    if module.algorithm.manual_optimization:
        raise KDLabError(
            f"perf.steps_per_batch={steps}: algorithm '{module.algorithm.name}' steps an adversary with its own "
            "optimizer, which chunked steps do not drive; set perf.steps_per_batch=1."
        )
    if is_overridden("on_after_batch_transfer", datamodule, L.LightningDataModule):
        raise KDLabError(
            f"perf.steps_per_batch={steps}: {type(datamodule).__name__} finishes each batch on the device "
            "(on_after_batch_transfer, e.g. on-device augmentation), which a list of batches would skip; set "
            "perf.steps_per_batch=1 (its steps are long enough that Lightning's per-batch cost is small)."
        )
    module.automatic_optimization = False
    datamodule.steps_per_batch = steps
    if module.scheduler_factory is not None:
        module.scheduler_factory = StepsNotChunks(module.scheduler_factory, module, steps)


class StepsNotChunks:
    """Lightning counts one list as one batch when it estimates a run's steps (``configure_optimizers``); a
    per-step schedule needs the optimizer steps: the batches of the chunks an epoch runs."""

    def __init__(self, factory: SchedulerFactory, module: DistillationModule, steps: int):
        self.factory, self.module, self.steps = factory, module, steps

    def __call__(self, optimizer, total_epochs: int, chunks_per_epoch: int):
        batches = getattr(self.module.trainer.train_dataloader, "num_steps", None)
        per_epoch = chunks_per_epoch * self.steps
        return self.factory(optimizer, total_epochs, min(per_epoch, batches) if batches else per_epoch)
