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
"""

import torch
from omegaconf import DictConfig

from kd_lab.module import DistillationModule
from kd_lab.teacher_cache import TeacherCache, check_cacheable

DEFAULTS = {
    "cache_teacher": False,
    "teacher_inference_mode": False,
    "channels_last": False,
    "compile": False,
    "compile_backend": "inductor",
    "check_finite_every": None,
}


def apply_perf(perf: DictConfig | dict | None, module: DistillationModule, datamodule) -> DistillationModule:
    settings = {**DEFAULTS, **(dict(perf) if perf else {})}
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
    if settings["compile"]:
        for model in models:
            model.compile(backend=settings["compile_backend"])
    return module
