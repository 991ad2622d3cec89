"""Callbacks kd-lab adds to Lightning's."""

import logging
import time

import lightning as L

log = logging.getLogger(__name__)


class EpochSummary(L.Callback):
    """One compact line per ``every`` epochs, for logs that are not a terminal (CI, SLURM, sweeps), where a
    progress bar would print thousands of carriage-return updates."""

    def __init__(self, every: int = 1):
        self.every = every
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (epoch + 1) % self.every and epoch + 1 != trainer.max_epochs:
            return
        monitor = getattr(pl_module, "monitor", "val/acc")  # the task's monitored metric
        keys = ("train/loss", monitor, f"{monitor}_best")
        shown = "  ".join(
            f"{k} {float(trainer.callback_metrics[k]):.4f}" for k in keys if k in trainer.callback_metrics
        )
        log.info("epoch %d/%d  %s  (%.1fs)", epoch + 1, trainer.max_epochs, shown, time.perf_counter() - self._start)
