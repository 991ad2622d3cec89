"""The ``perf`` config group applied to a built module: speed switches that leave the run's math alone.

- ``cache_teacher``: teacher outputs computed once for the training set (``kd_lab.run.teacher_cache``); refused
  with a clear error when augmentation or a learning teacher would make them wrong.
- ``teacher_inference_mode``: frozen teachers run under ``torch.inference_mode`` (no autograd bookkeeping at
  all); their outputs are cloned into normal tensors, which the losses may save for backward.
- ``channels_last``: NHWC memory format for the models and for 4-D (image) batches, what cuDNN's tensor-core
  convolutions want under bf16; a no-op for 1-D signals and MLPs.
- ``compile``: ``nn.Module.compile()`` of student and teacher, in place, so state-dict keys (checkpoints) are
  unchanged; ``compile_backend`` picks torch.compile's backend.
- ``check_finite_every``: steps between non-finite loss checks (``kd_lab.core.step_stats.FiniteGuard``).
- ``steps_per_batch``: Lightning gets lists of that many training batches and the module takes one optimizer
  step per batch in a list (manual optimization), so Lightning's per-batch machinery (~0.3-0.5 ms of hooks
  and bookkeeping, a third of a small model's step) runs once per list. The same optimizer steps on the same
  batches with the same schedule; but Lightning's batch counts count lists (``limit_train_batches``,
  ``val_check_interval``, ``fast_dev_run``, ``max_steps`` is checked after a whole list). ``auto`` (the
  default) fuses ``AUTO_STEPS`` batches where nothing can tell the difference (``auto_steps_blocker``) and
  takes one step per batch elsewhere.
"""

import difflib
import logging

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig

from kd_lab.errors import KDLabError
from kd_lab.run.module import DistillationModule, SchedulerFactory
from kd_lab.run.teacher_cache import TeacherCache, check_cacheable

log = logging.getLogger(__name__)

DEFAULTS = {
    "cache_teacher": False,
    "teacher_inference_mode": False,
    "channels_last": False,
    "compile": False,
    "compile_backend": "inductor",
    "check_finite_every": None,
    "steps_per_batch": "auto",
}
# perf.steps_per_batch=auto: measured on the MNIST-1D default (docs/performance.md), 8 takes kd-lab's KD epoch
# from 1.10x to 1.02x the plain loop's; a list of 8 batches keeps progress and SLURM checkpoints fine-grained.
AUTO_STEPS = 8


def apply_perf(
    perf: DictConfig | dict | None, module: DistillationModule, datamodule, run_cfg: DictConfig | None = None
) -> DistillationModule:
    """Apply the ``perf`` settings to a built module; ``run_cfg`` (the run's config: its trainer and callbacks)
    tells ``steps_per_batch=auto`` what counts batches."""
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
    run_cfg = run_cfg or {}
    steps = resolve_steps_per_batch(settings["steps_per_batch"], module, datamodule, run_cfg)
    datamodule.steps_per_batch = 1  # a data module shared with an earlier build (the teacher's) starts over
    if steps != 1:
        fuse_steps(module, datamodule, steps, run_cfg.get("trainer") or {})
    if settings["compile"]:
        for model in models:
            model.compile(backend=settings["compile_backend"])
    return module


def resolve_steps_per_batch(value, module: DistillationModule, datamodule, run_cfg) -> int:
    """``perf.steps_per_batch`` as a number: ``auto`` is ``AUTO_STEPS`` unless ``auto_steps_blocker`` says no."""
    if value == "auto":
        blocker = auto_steps_blocker(module, datamodule, run_cfg)
        module.steps_per_batch_reason = blocker or "auto"
        log.debug("perf.steps_per_batch=auto: %s", f"1 ({blocker})" if blocker else f"{AUTO_STEPS} (fused steps)")
        return 1 if blocker else AUTO_STEPS
    try:
        return int(value)
    except (TypeError, ValueError):
        raise KDLabError(
            f"perf.steps_per_batch={value!r} is not a number: give a count (1: one optimizer step per Lightning "
            "batch) or auto."
        ) from None


def auto_steps_blocker(module: DistillationModule, datamodule, run_cfg) -> str | None:
    """Why ``auto`` takes one step per batch, or None: where fused steps cannot work (``fusing_refusal``), where
    data come through DataLoader workers (their loading overlaps the steps; those steps are long anyway), where
    the run counts Lightning batches (a list would count as one), and where a configured callback looks at every
    batch."""
    trainer_cfg = run_cfg.get("trainer") or {}
    refusal = fusing_refusal(module, datamodule, trainer_cfg)
    if refusal:
        return refusal
    if getattr(datamodule, "may_use_loader", lambda: False)():
        return "the data may come through DataLoader workers (data.serve)"
    counted = [key for key, is_default in BATCH_COUNTS.items() if not is_default(trainer_cfg.get(key))]
    if counted:
        return f"trainer.{counted[0]}={trainer_cfg.get(counted[0])} counts batches"
    for name, spec in (run_cfg.get("callbacks") or {}).items():
        target = spec.get("_target_") if spec else None
        callback = get_class(target) if target else None
        hooks = [h for h in BATCH_HOOKS if callback and getattr(callback, h, None) is not getattr(L.Callback, h)]
        if hooks and not _epoch_checkpoints(callback, spec):
            return f"callbacks.{name} implements {hooks[0]}"
    return None


def fusing_refusal(module: DistillationModule, datamodule, trainer_cfg) -> str | None:
    """Why fused steps cannot work at all (an explicit ``perf.steps_per_batch`` > 1 is refused with it)."""
    if module.algorithm.manual_optimization:
        return (
            f"algorithm '{module.algorithm.name}' steps two optimizers (an adversary with its own optimizer), "
            "which fused steps do not drive"
        )
    if is_overridden("on_after_batch_transfer", datamodule, L.LightningDataModule):
        return (
            f"{type(datamodule).__name__} finishes each batch on the device (on_after_batch_transfer, e.g. "
            "on-device augmentation), which a list of batches would skip; its steps are long enough that "
            "Lightning's per-batch cost is small"
        )
    accumulate = trainer_cfg.get("accumulate_grad_batches") or 1
    if accumulate != 1:
        return (
            f"trainer.accumulate_grad_batches={accumulate} counts batches (one optimizer step per {accumulate}); "
            f"with a list counted as one batch, accumulate_grad_batches={accumulate} would change the steps"
        )
    return None


BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end")  # they would see lists of batches


def _epoch_checkpoints(callback: type, spec) -> bool:
    """A ``ModelCheckpoint`` that saves per epoch: its batch hook only counts steps and time."""
    per_step = spec.get("every_n_train_steps") or spec.get("train_time_interval")
    return issubclass(callback, ModelCheckpoint) and not per_step


def _whole_epoch(value) -> bool:  # 1.0 (a float: the whole epoch) or unset; an int counts batches
    return value is None or (isinstance(value, float) and value == 1.0)


# trainer settings that count Lightning batches, and whether a value leaves them alone (a list counts as one);
# accumulate_grad_batches is a refusal (fusing_refusal)
BATCH_COUNTS = {
    "fast_dev_run": lambda v: v is None or v is False or v == 0,
    "limit_train_batches": _whole_epoch,
    "val_check_interval": _whole_epoch,
    "max_steps": lambda v: v is None or v == -1,
}


def fuse_steps(module: DistillationModule, datamodule, steps: int, trainer_cfg=None) -> None:
    """``perf.steps_per_batch``: see the module docstring."""
    if steps < 1:
        raise KDLabError(f"perf.steps_per_batch={steps} must be >= 1 (1: one optimizer step per Lightning batch).")
    refusal = fusing_refusal(module, datamodule, trainer_cfg or {})
    if refusal:
        raise KDLabError(f"perf.steps_per_batch={steps}: {refusal}; set perf.steps_per_batch=1.")
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
