"""The teacher store: an offline teacher is loaded from ``teacher.ckpt_path`` or trained once and cached.

The cache key hashes what determines the teacher: its model, optimizer and schedule, epochs, seed, the
data config (minus where the data lives) and the trainer settings that change training (world size, effective
batch, precision, ...). A sweep over students, algorithms and their seeds therefore trains each teacher once.
An entry is a directory written under a temporary name and renamed when complete, so a killed training leaves
nothing a later run trusts; a file lock makes concurrent runs that need the same teacher train it once (the
others wait, then reuse it). A complete entry is never changed, so it is read without the lock (a read-only
store works); an incomplete one (no ``meta.json``) is trained again and replaced.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, ListConfig
from torch import nn

from kd_lab.algorithms.none import NoDistillation
from kd_lab.data.base import TensorDataModule
from kd_lab.errors import KDLabError, brief
from kd_lab.run.assemble import build_module, build_step, build_task, extra_teacher_cfg, perf_plan
from kd_lab.run.builders import build_model, build_trainer, to_dict
from kd_lab.run.callbacks import EpochSummary
from kd_lab.run.checkpoints import load_weights
from kd_lab.run.ddp import global_rank
from kd_lab.run.loggers import build_teacher_loggers, finish_loggers
from kd_lab.run.module import NoOptimizerStep, count_parameters
from kd_lab.schemes.offline import Offline
from kd_lab.utils.io import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)
KEY_VERSION = 3  # 2: the world size and the effective batch are part of the key; 3: the thread count
# where the data lives, eval batching and the run's seed (the teacher's data order follows teacher.seed)
DATA_KEYS_IGNORED = (
    "data_dir",
    "eval_batch_size",
    "seed",
    "serve",
    "device_max_mb",
    "num_workers",
    "pin_memory",
    "persistent_workers",  # how batches are served
)


# trainer settings that change what is learned (a fast_dev_run teacher is not a teacher)
TRAINER_KEYS = (
    "fast_dev_run",
    "limit_train_batches",
    "max_steps",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "sync_batchnorm",
)


def world_size(trainer: DictConfig) -> int:
    """The processes that train together, ``devices`` x ``num_nodes``, as Lightning counts them: a count, a
    list or ``"0,1"`` of device indices; ``auto`` (or -1) is every GPU of this machine, or one CPU process."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, list | tuple | ListConfig):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif str(devices).strip().isdigit() and int(str(devices).strip()) > 0:
        count = int(str(devices).strip())
    else:  # auto, -1
        accelerator = str(trainer.get("accelerator") or "auto").lower()
        count = (torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0) or 1
    return count * int(trainer.get("num_nodes") or 1)


def learning_context(cfg: DictConfig) -> dict[str, Any]:
    """The data and trainer settings that change what a model learns: part of every store key (teachers and
    chain stages). The world size and the effective batch (processes x accumulated batches x data.batch_size)
    too: 2 DDP ranks train on twice the batch of one process, so they learn another teacher."""
    processes = world_size(cfg.trainer)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    return {
        "data": {k: v for k, v in to_dict(cfg.data).items() if k not in DATA_KEYS_IGNORED},
        "trainer": {k: cfg.trainer.get(k) for k in TRAINER_KEYS},
        "world_size": processes,
        "accumulate_grad_batches": accumulate,
        "effective_batch": processes * accumulate * int(cfg.data.get("batch_size") or 1),
        "threads": cfg.get("threads"),  # CPU threads change the trained weights (kd_lab/run/threads.py)
    }


def short_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def teacher_key(cfg: DictConfig) -> str:
    t = cfg.teacher
    spec = {
        "version": KEY_VERSION,
        "model": to_dict(t.model),
        "optim": to_dict(t.optim),
        "max_epochs": t.max_epochs,
        "seed": t.seed,
        **learning_context(cfg),
    }
    return short_hash(spec)


def fill_teachers(cfg: DictConfig, teachers: list[nn.Module], datamodule: TensorDataModule) -> dict[str, Any]:
    """Give the run's store teachers (built by ``kd_lab.run.assemble``) their weights, in place: the run's
    teacher and the algorithm's extra teachers. Returns what results.json records about them."""
    info = fill_teacher(cfg, teachers[0], datamodule)
    for i, name in enumerate(cfg.algorithm.get("extra_teachers") or [], start=1):
        info[f"extra_{i}"] = fill_teacher(extra_teacher_cfg(cfg, name), teachers[i], datamodule)
    return info


def fill_teacher(cfg: DictConfig, model: nn.Module, datamodule: TensorDataModule) -> dict[str, Any]:
    """Load ``cfg.teacher``'s weights into ``model`` from its checkpoint or the store, training and caching
    them first when the store has none."""
    t = cfg.teacher
    info: dict[str, Any] = {"name": t.name, "params": count_parameters(model)}
    if t.get("ckpt_path"):
        load_weights(model, t.ckpt_path, "teacher")
        log.info("Teacher %s loaded from %s", t.name, t.ckpt_path)
        return {**info, "source": "checkpoint", "path": str(t.ckpt_path)}
    key = teacher_key(cfg)
    entry = Path(cfg.paths.teacher_store) / f"{t.name}-{key}"
    meta, reused = cached_entry(entry, lambda staging: train_teacher(cfg, model, datamodule, staging, entry.name))
    if reused:  # otherwise ``model`` holds the weights just trained (ranks > 0 never wait for rank 0's file)
        load_weights(model, entry / "teacher.pt", "teacher")
        log.info("Reusing cached teacher %s (key %s, %s) from %s", t.name, key, headline(meta["metrics"]), entry)
    return {**info, "source": "cache", "reused": reused, "path": str(entry), "key": key, **meta}


def teacher_loggers(cfg: DictConfig, entry_name: str) -> list:
    """The run's loggers for the teacher trained into the store entry ``entry_name``: a W&B run named
    ``teacher-<entry>`` (job_type teacher), CSV and TensorBoard logs under ``<run dir>/teacher/``. They hold
    the teacher's config and store key as hyperparameters."""
    tags = [name for name in (cfg.teacher.get("name"), cfg.data.get("name"), "teacher") if name]
    loggers = build_teacher_loggers(cfg.get("logger"), f"teacher-{entry_name}", tags)
    for logger in loggers:
        logger.log_hyperparams({"teacher": to_dict(cfg.teacher), "store_entry": entry_name, **learning_context(cfg)})
    return loggers


def headline(metrics: dict[str, float], name: str | None = None) -> str:
    """``test/<headline> <value>`` of a store entry's metrics (the task's headline, else the first test metric)."""
    key = f"test/{name}" if name else next((k for k in metrics if k.startswith("test/")), None)
    return f"{key} {metrics[key]:.4f}" if key in metrics else "no test metric"


def complete_meta(entry: Path) -> dict[str, Any] | None:
    """The meta of a complete store entry, None when there is none (missing, or no ``meta.json``: a copy or a
    hand edit left it incomplete). An entry whose ``meta.json`` is unreadable, or that lost its ``teacher.pt``,
    was damaged after it was written (both are renamed into place whole): the error says to delete it."""
    if not (entry / "meta.json").is_file():
        return None
    fix = f"delete the entry (rm -r {entry}) and the next run trains it again"
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta, dict) or "metrics" not in meta:
            raise ValueError("no 'metrics' in it")
    except (OSError, ValueError) as e:
        raise KDLabError(
            f"teacher-store entry {entry} is damaged: {entry / 'meta.json'} cannot be read ({brief(e)}); {fix}."
        ) from e
    if not (entry / "teacher.pt").is_file():
        raise KDLabError(f"teacher-store entry {entry} is damaged: it has a meta.json but no teacher.pt; {fix}.")
    return meta


def _store_lock(entry: Path) -> FileLock:
    """The entry's lock, acquired; a store that cannot be written says so (a complete entry needs no lock)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry) + ".lock")
        lock.acquire()
    except OSError as e:
        raise KDLabError(
            f"teacher store {entry.parent} cannot be written ({brief(e)}), and it holds no complete entry "
            f"{entry.name} to reuse, so it cannot train one into it: make the store writable, or point "
            "paths.teacher_store at a writable directory (complete entries of a read-only store are reused)."
        ) from e
    return lock


def _install(staging: Path, entry: Path) -> None:
    """Rename the complete ``staging`` directory into place; an incomplete entry there is set aside first and
    deleted after (a reader sees no entry or a complete one)."""
    old = entry.with_name(f".{entry.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if entry.exists() and not (entry / "meta.json").is_file():  # a complete one (another writer's) stays
        os.replace(entry, old)
    os.replace(staging, entry)
    shutil.rmtree(old, ignore_errors=True)


def cached_entry(entry: Path, make: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """``(meta, reused)`` of a store entry (a directory holding ``teacher.pt`` and ``meta.json``). When it is
    missing or incomplete, ``make(staging)`` trains the model, writes ``teacher.pt`` into ``staging`` and
    returns the meta; the staging directory is renamed into place only when complete. Rank 0 holds a file lock
    meanwhile (ranks > 0 of a DDP job must not take it: they train in lockstep with rank 0). A complete entry
    is never changed, so it is read without the lock."""
    meta = complete_meta(entry)
    if meta is not None:
        return meta, True
    lock = _store_lock(entry) if global_rank() == 0 else None
    try:
        meta = complete_meta(entry)  # another run may have trained it while this one waited for the lock
        if meta is not None:
            return meta, True
        if entry.exists():
            log.warning("Teacher-store entry %s is incomplete (no meta.json): training it again to replace it", entry)
        # One staging name per entry (every rank of a DDP job must see the same paths; runs are serialized by
        # the lock). Whatever a killed run left there is discarded, never trusted.
        staging = entry.with_name(f".{entry.name}.tmp")
        if global_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            meta = make(staging)
        except BaseException:
            if global_rank() == 0:  # a failed or interrupted training leaves nothing behind (a kill does)
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if global_rank() == 0:
            atomic_write_json(meta, staging / "meta.json")
            try:
                _install(staging, entry)
            except OSError:  # another writer finished first (a file system without working locks)
                if complete_meta(entry) is None:
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # theirs is as good as ours
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # ranks > 0 may read the entry next (a chain's next stage): wait for it
        return meta, False
    finally:
        if lock:
            lock.release()


def train_teacher(
    cfg: DictConfig, model: nn.Module, datamodule: TensorDataModule, staging: Path, entry_name: str | None = None
) -> dict[str, Any]:
    """Train the teacher of ``cfg`` into ``model``; write its weights into ``staging``; return the meta. Its
    training is logged into the entry (``metrics.csv``) and through the run's loggers (``teacher_loggers``)."""
    t = cfg.teacher
    log.info("No cached teacher %s: training it for %d epochs", t.name, t.max_epochs)
    is_zero = global_rank() == 0
    # built before the seed is set, and they draw from no generator of torch: the teacher is the same with
    # or without them (tests/test_loggers.py)
    loggers = teacher_loggers(cfg, entry_name or t.name) if is_zero else []
    try:
        return _fit_teacher(cfg, model, datamodule, staging, loggers)
    finally:
        finish_loggers(loggers)  # the teacher's W&B run ends here; the student's starts after


def _fit_teacher(
    cfg: DictConfig, model: nn.Module, datamodule: TensorDataModule, staging: Path, loggers: list
) -> dict[str, Any]:
    t = cfg.teacher
    is_zero = global_rank() == 0
    L.seed_everything(t.seed, workers=True, verbose=False)
    # The initial weights follow teacher.seed (part of the key), not the run's seed the model was built with:
    # whichever run of a sweep trains the entry first, the same key holds the same teacher.
    model.load_state_dict(build_model(t.model).state_dict())
    was_training = model.training
    model.train()  # the run's step froze it (eval mode, no gradients); it learns here
    model.requires_grad_(True)
    plan = perf_plan(cfg)
    step = build_step(datamodule, model, NoDistillation(), Offline(), build_task(cfg), [], plan, trains_a_teacher=True)
    module = build_module(cfg, step, t.optim, plan, role="teacher")
    trainer = build_trainer(
        cfg.trainer,
        callbacks=[EpochSummary(every=max(1, t.max_epochs // 5))],
        loggers=[CSVLogger(staging, name="", version=""), *loggers] if is_zero else False,
        max_epochs=t.max_epochs,
        enable_checkpointing=False,
        default_root_dir=str(staging),
    )
    start = time.perf_counter()
    run_seed, datamodule.seed = datamodule.seed, t.seed  # the teacher does not depend on the student's seed
    try:
        try:
            trainer.fit(module, datamodule)
        except NoOptimizerStep as e:  # a teacher that learned nothing is an error, never a store entry
            raise NoOptimizerStep(e.reason, f"teacher {t.name}", "nothing was cached") from None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        metrics.update({k: float(v) for k, v in trainer.test(module, datamodule, verbose=False)[0].items()})
    finally:
        datamodule.seed = run_seed
        model.requires_grad_(False)  # frozen again, as the run's offline scheme prepared it
        model.train(was_training)
    if is_zero:
        atomic_torch_save(model.state_dict(), staging / "teacher.pt")
    log.info("Teacher %s trained: %s", t.name, headline(metrics, step.task.headline))
    return {"metrics": metrics, "train_seconds": time.perf_counter() - start, "config": to_dict(t)}
