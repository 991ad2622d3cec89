"""The optimizer step of ``perf.steps_per_batch`` (manual optimization), with Lightning's machinery or without.

Lightning's manual step (``manual_backward`` + ``LightningOptimizer.step``) runs three hooks on every callback
and on the module, a precision-plugin closure and a profiler span around each backward and step: ~0.1-0.2 ms,
a tenth of a millisecond-long MLP step. When nothing listens to those hooks and they have nothing to do (one
device, fp32 or bf16 precision: no gradient scaler, no DDP gradient sync to prepare, no profiler), the step
calls ``loss.backward()`` and the torch optimizer directly. Lightning's step counter (``global_step``:
``max_steps``, checkpoint names, logging steps) still advances through the optimizer's own before/after-step
callbacks, which the manual loop installs for every batch. Anything else takes Lightning's path, unchanged.

Lightning refuses ``trainer.gradient_clip_val`` under manual optimization, so ``manual_step_overrides`` moves
it from the trainer to the module, which clips after every backward (``clip_gradients``), as Lightning's
automatic loop would; and it counts ``log_every_n_steps`` in lists of batches, as Lightning does.
"""

import lightning as L
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def direct_step_blocker(trainer: L.Trainer, module: L.LightningModule) -> str | None:
    """Why Lightning's own backward and step must run (a reason, for the debug log), or None."""
    if type(trainer.strategy) is not SingleDeviceStrategy:
        return f"strategy {type(trainer.strategy).__name__}"
    plugin = trainer.precision_plugin
    if not (type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)):
        return f"precision plugin {type(plugin).__name__} (a gradient scaler or a wrapped optimizer)"
    if not isinstance(trainer.profiler, PassThroughProfiler):
        return f"profiler {type(trainer.profiler).__name__}"
    for hook in STEP_HOOKS:
        for callback in trainer.callbacks:
            if is_overridden(hook, callback, L.Callback):
                return f"callback {type(callback).__name__} implements {hook}"
    for hook in (*STEP_HOOKS, "backward"):
        if is_overridden(hook, module, L.LightningModule):
            return f"the module implements {hook}"
    return None


def manual_step_overrides(trainer_cfg, module: L.LightningModule, steps_per_batch: int = 1) -> dict:
    """Trainer overrides for a module that steps its optimizers itself: its clipping settings move to
    ``module.gradient_clip`` (``(value, algorithm)``) and the trainer gets none; with lists of
    ``steps_per_batch`` batches, ``log_every_n_steps`` counts lists (Lightning warns when an epoch has fewer)."""
    overrides = {}
    every = trainer_cfg.get("log_every_n_steps")
    if steps_per_batch > 1 and every:
        overrides["log_every_n_steps"] = max(1, every // steps_per_batch)
    value = trainer_cfg.get("gradient_clip_val")
    if module.automatic_optimization or not value:
        return overrides
    module.gradient_clip = (float(value), trainer_cfg.get("gradient_clip_algorithm") or "norm")
    return {**overrides, "gradient_clip_val": None, "gradient_clip_algorithm": None}


def clip(module: L.LightningModule, optimizer) -> None:
    """Clip the gradients the last backward wrote, if the run asked for it (``manual_step_overrides``)."""
    if getattr(module, "gradient_clip", None):
        value, algorithm = module.gradient_clip
        module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)


def count_logger_steps(trainer: L.Trainer, batches: int) -> None:
    """Loggers' x axis (``step`` in CSV and W&B) counts Lightning batches; a list of ``batches`` is one, so it
    gets the other ``batches - 1`` here: fused and unfused runs of one config log at the same steps."""
    trainer.fit_loop.epoch_loop._batches_that_stepped += batches - 1


class OptimizerSteps:
    """One fit's optimizer step for fused batches: zero the gradients, backward, step, then the per-step
    schedule; what Lightning's automatic loop does per batch."""

    def __init__(self, module: L.LightningModule):
        self.module = module
        self.optimizer = module.optimizers()  # a LightningOptimizer
        self.scheduler = module.lr_schedulers()
        self.blocker = direct_step_blocker(module.trainer, module)

    @property
    def direct(self) -> bool:
        return self.blocker is None

    def __call__(self, loss: Tensor) -> None:
        optimizer = self.optimizer
        if self.direct:
            torch_optimizer = optimizer.optimizer
            torch_optimizer.zero_grad()
            loss.backward()
            clip(self.module, optimizer)
            optimizer._on_before_step()  # the manual loop's step counting (installed for every batch)
            torch_optimizer.step()
            optimizer._on_after_step()
        else:
            optimizer.zero_grad()
            self.module.manual_backward(loss)
            clip(self.module, optimizer)
            optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
