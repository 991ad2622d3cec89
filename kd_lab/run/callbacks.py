"""Callbacks kd-lab adds to Lightning's."""

import logging
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lab.errors import KDLabError, brief
from kd_lab.utils.io import move_into_place

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


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files are whole under their final name (``best.ckpt``, ``last.ckpt``): each is
    written to ``.<name>.tmp`` next to it, flushed to disk and renamed. Lightning writes through a temporary
    file of the system's temp directory and moves it, which is a copy, not a rename, when that is another file
    system: a full disk then left a truncated checkpoint under its final name. A failed write stops the run
    with the file and the cause; the previous version of the file is kept."""

    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"{ModelCheckpoint.__qualname__}{kwargs!r}"  # ModelCheckpoint's: checkpoints of either resume

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        path = Path(filepath)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            trainer.save_checkpoint(str(tmp), self.save_weights_only)  # rank 0 writes, every rank waits
            if trainer.is_global_zero:
                move_into_place(tmp, path)
        except OSError as e:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
            kept = "its previous version is kept" if path.exists() else "nothing was written under that name"
            raise KDLabError(
                f"checkpoint {path} could not be written ({brief(e)}); {kept}. Free space on that disk (or "
                f"write runs elsewhere: paths.log_dir), then continue with kd-lab resume={trainer.default_root_dir}."
            ) from e
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:  # as Lightning's: loggers that upload checkpoints hear of it
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
