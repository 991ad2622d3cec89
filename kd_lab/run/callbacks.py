"""Callbacks kd-lab adds to Lightning's."""

import logging
import sys
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

from kd_lab.errors import KDLabError, brief
from kd_lab.utils.io import move_into_place

log = logging.getLogger(__name__)


class EpochSummary(L.Callback):
    """One compact line per ``every`` epochs and after the last: ``epoch 50/300  train/loss ...``, counted from
    1 as the bar, the summary and results.json count. It is what logs that are not a terminal (CI, SLURM,
    sweeps) show, where no bar is drawn; in a terminal it prints above the bar (``ProgressBar``)."""

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


def epoch_label(trainer: L.Trainer) -> str:
    """``Epoch 50/300``: the epoch running now, counted from 1, of ``max_epochs`` (as EpochSummary's lines,
    the summary and results.json count; Lightning's own bar shows ``Epoch 49/299``, counted from 0)."""
    epoch, total = trainer.current_epoch + 1, trainer.max_epochs
    return f"Epoch {epoch}/{total}" if total is not None and total > 0 else f"Epoch {epoch}"


class _BarLogHandler(logging.StreamHandler):
    """A console handler that writes through tqdm: the bar is cleared, the line printed, the bar drawn again."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            Tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr)


class ProgressBar(TQDMProgressBar):
    """The progress bar of a run in a terminal (``trainer.enable_progress_bar``; kd_lab.run.builders adds it).

    Lightning's default bar (Rich when installed, tqdm otherwise) said ``Epoch 49/299`` where kd-lab's epoch
    lines say ``epoch 50/300``, showed ``v_num`` (the logger's version: the run dir already names the run), and
    log lines written meanwhile overwrote it or were overwritten by it. This one counts epochs as kd-lab does
    (``epoch_label``), drops ``v_num``, and while it is drawn every console log record goes through tqdm's
    ``write`` (the console handlers of the root logger are swapped for ones that do; the log file is left as
    it is). The bar stays, rather than being turned off when epoch lines print: within-epoch progress matters
    when an epoch takes minutes (CIFAR, language models). tqdm rather than Rich: Lightning always installs
    tqdm, so every machine draws the same bar."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.is_enabled:
            self._route_console_logs()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_console_logs()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_console_logs()  # teardown is not called after an exception

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # Lightning's, with kd-lab's label (calling it first would draw "Epoch <n - 1>" for a moment)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(convert_inf(self.total_train_batches))
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(epoch_label(trainer))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _route_console_logs(self) -> None:
        if self._swapped:
            return
        root = logging.getLogger()
        for handler in [h for h in root.handlers if _is_console(h)]:
            routed = _BarLogHandler(handler.stream)
            routed.setLevel(handler.level)
            routed.setFormatter(handler.formatter)
            for log_filter in handler.filters:
                routed.addFilter(log_filter)
            root.handlers[root.handlers.index(handler)] = routed
            self._swapped.append((handler, routed))

    def _restore_console_logs(self) -> None:
        root = logging.getLogger()
        for handler, routed in self._swapped:
            if routed in root.handlers:
                root.handlers[root.handlers.index(routed)] = handler
        self._swapped.clear()


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
