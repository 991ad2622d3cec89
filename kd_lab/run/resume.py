"""``kd-lab resume=<run dir>``: continue a killed or preempted run in its own directory, with its own config.

A fresh run records what a resume needs in ``<run dir>/resume.yaml`` before training: its config as composed
(unresolved, so ``paths.output_dir`` follows the run dir; the other ``paths`` made absolute, so a resume from
another working directory finds the same data and teacher store) and the W&B run id it logs to. A resume reads
that file, picks the run's checkpoint (``checkpoints/last.ckpt``, saved every epoch; a SLURM pre-emption
checkpoint ``hpc_ckpt_<n>.ckpt`` when there is no other) and continues: W&B appends to the same run id, the
CSV log keeps its rows up to the checkpoint's epoch. The checkpoint holds every state a resume needs to end
with the metrics of an uninterrupted run (``DistillationModule.on_save_checkpoint``, docs/reliability.md).

``conf/hydra/default.yaml`` points ``hydra.run.dir`` at the resumed directory and writes the resume's own
``.hydra`` files to ``.hydra-resume-<time>``, so the original run's files are never overwritten. A resume is
refused, before anything of the run is touched, when the directory is no kd-lab run, has finished or is being
run by another process: rank 0 of a run holds ``<run dir>/.kd-lab.lock`` while it trains, so a second resume of
the same run (or a second run into its directory) is refused instead of interleaving with it. A refused resume
removes what Hydra wrote for it (its ``.hydra-resume-<time>``; for ``resume=<no such dir>``, the directory).
"""

import csv
import json
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lab.errors import KDLabError, brief
from kd_lab.run.ddp import global_rank
from kd_lab.utils.io import _atomic_write

RESUME_FILE = "resume.yaml"
RUN_LOCK = ".kd-lab.lock"
FRESH_RUN = "start a fresh run (kd-lab <the original overrides>) instead"

# ``kd_if_resume`` (conf/hydra/default.yaml) is registered in kd_lab/__init__.py, imported before this.


def quote_resume_override(argv: list[str]) -> list[str]:
    """``resume=<dir>`` with the directory quoted for Hydra's override parser: a multirun job's directory
    (``3_algorithm=kd,seed=1``) holds ``=`` and ``,``, which an unquoted value may not. Quoted values pass."""
    quoted = []
    for arg in argv:
        if arg.startswith("resume=") and not arg[len("resume=") :].startswith(("'", '"')):
            value = arg[len("resume=") :].replace("\\", "\\\\").replace("'", "\\'")
            arg = f"resume='{value}'"
        quoted.append(arg)
    return quoted


def _wandb_node(cfg: DictConfig) -> DictConfig | None:
    for spec in (cfg.get("logger") or {}).values():
        if spec and str(spec.get("_target_", "")).endswith("WandbLogger"):
            return spec
    return None


def start_or_resume(cfg: DictConfig, overrides: list[str] = ()) -> tuple[DictConfig, str | None]:
    """``(config, checkpoint)`` of this invocation: the resumed run's own config and its checkpoint
    for ``resume=<dir>``; otherwise ``cfg`` itself (recorded in its run dir for a later resume) and None.
    ``overrides``: the command line's, which a resume refuses (it continues the run as it was configured).
    Either way this process holds the run's lock from here on (``hold_run_lock``)."""
    if cfg.get("resume") is None:
        hold_run_lock(Path(cfg.paths.output_dir), resuming=False)
        return record_start(cfg), requeued_checkpoint(Path(cfg.paths.output_dir))
    others = [o for o in overrides if not o.startswith("resume=")]
    if others:
        raise KDLabError(
            f"resume={cfg.resume} continues that run with its own config, but the command also sets {others}: "
            f"drop them, or {FRESH_RUN.replace('the original overrides', 'your overrides')}."
        )
    run_dir = Path(cfg.resume).absolute()
    hydra_files = _hydra_files()
    if hydra_files and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_files:
        shutil.rmtree(run_dir)  # Hydra made it for this resume (no run holds only Hydra's files): undone
    try:
        check_resume_dir(run_dir)  # before the lock file is created in it
    except KDLabError:
        for name in hydra_files:  # this refused resume's own Hydra files go; the run's train.log stays
            if name.startswith(".hydra-resume-"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
        raise
    # (refused here, a resume keeps its .hydra-resume-<time>: one started in the same second shares the name)
    hold_run_lock(run_dir, resuming=True)
    return resume_config(run_dir), resume_checkpoint(run_dir)  # checked again, under the lock


def _hydra_files() -> set[str]:
    """What Hydra wrote into the run dir of this invocation before kd-lab's code ran: its job log and its
    output subdir (``.hydra-resume-<time>`` for a resume). Empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    hydra = HydraConfig.get()
    return {f"{hydra.job.name}.log", *([str(hydra.output_subdir)] if hydra.output_subdir else [])}


_held: dict[str, Any] = {}  # the run lock this process holds: {"dir": Path, "lock": FileLock}


def hold_run_lock(run_dir: Path, resuming: bool) -> None:
    """Rank 0 takes ``<run dir>/.kd-lab.lock`` and holds it until the process ends (the OS releases the lock of
    a killed process) or starts another run (a multirun's jobs, one after the other). A run dir whose lock
    another process holds is refused: two resumes of one run at once rewrote each other's metrics.csv and
    results.json. Ranks > 0 train under rank 0's lock."""
    if global_rank() != 0:
        return
    run_dir = Path(run_dir).absolute()
    if _held.get("dir") == run_dir:
        return
    release_run_lock()
    path = run_dir / RUN_LOCK
    lock = FileLock(str(path))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(blocking=False)
    except Timeout:
        if resuming:
            raise KDLabError(
                f"resume={run_dir}: another kd-lab process is running this run now (it holds {path}); wait for "
                "it to end, or stop it, and resume then."
            ) from None
        raise KDLabError(
            f"run directory {run_dir} is in use by another kd-lab process (it holds {path}); two runs must not "
            "write into one directory: set another hydra.run.dir."
        ) from None
    except OSError as e:
        raise KDLabError(
            f"run directory {run_dir} cannot be written ({brief(e)}); a run writes its checkpoints, logs and "
            "results.json there: make it writable, or set hydra.run.dir (paths.log_dir) to a writable place."
        ) from e
    _held.update(dir=run_dir, lock=lock)


def release_run_lock() -> None:
    if _held:
        _held.pop("lock").release()
        _held.clear()


def finished_results(run_dir: Path) -> Path | None:
    """``<run dir>/results.json`` when it records a finished run."""
    path = Path(run_dir) / "results.json"
    try:
        return path if json.loads(path.read_text()).get("status") == "finished" else None
    except (OSError, ValueError, AttributeError):
        return None


def check_resume_dir(run_dir: str | Path) -> Path:
    """``run_dir``, absolute, if it can be resumed: it exists, it is a kd-lab run (``resume.yaml``), it has not
    finished (a resume would rewrite its results.json) and it can be written."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        raise KDLabError(f"resume={run_dir}: no such run directory. Pass the directory of the run to continue.")
    if not (run_dir / RESUME_FILE).is_file():
        raise KDLabError(
            f"resume={run_dir}: {RESUME_FILE} is missing, so this is not a kd-lab run directory (or one started "
            f"before resume existed); {FRESH_RUN}, or pass ckpt_path=<checkpoint> to a new run."
        )
    finished = finished_results(run_dir)
    if finished:
        raise KDLabError(
            f"resume={run_dir}: the run finished; its results are in {finished}, and a resume would overwrite "
            "them. There is nothing to continue: start a new run instead (kd-lab <the original overrides>)."
        )
    if not os.access(run_dir, os.W_OK):
        raise KDLabError(
            f"resume={run_dir}: the run directory cannot be written (a read-only copy or mount?), and a resume "
            "writes its checkpoints, logs and results.json there: make it writable, or resume a writable copy."
        )
    return run_dir


def record_start(cfg: DictConfig) -> DictConfig:
    """Give the W&B logger a run id (one already recorded in the run dir is kept: a requeued job or a DDP
    rank > 0 logs to the same run) and write ``resume.yaml`` (rank 0)."""
    recorded = Path(cfg.paths.output_dir) / RESUME_FILE
    wandb = _wandb_node(cfg)
    if wandb is not None and not wandb.get("id"):
        previous = _wandb_node(_read_config(recorded)) if recorded.is_file() else None
        with open_dict(wandb):
            wandb.id = (previous or {}).get("id") or secrets.token_hex(4)  # W&B style: 8 of [0-9a-z]
    if global_rank() == 0:
        snapshot = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # key order kept
        paths = OmegaConf.to_container(cfg.paths, resolve=True)
        snapshot.paths = {k: v if k == "output_dir" else str(Path(v).absolute()) for k, v in paths.items()}
        _atomic_write(recorded, lambda f: f.write(OmegaConf.to_yaml(snapshot).encode()))
    return cfg


def _read_config(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as e:
        raise KDLabError(f"{path} is unreadable ({e}): the run cannot be resumed; {FRESH_RUN}.") from e


def resume_config(run_dir: str | Path) -> DictConfig:
    """The config ``run_dir`` was started with, set to continue there (W&B: same run id, resume="allow")."""
    run_dir = check_resume_dir(run_dir)
    cfg = _read_config(run_dir / RESUME_FILE)
    with open_dict(cfg):
        cfg.resume = str(run_dir)
        cfg.paths.output_dir = str(run_dir)  # the directory may have moved since
        wandb = _wandb_node(cfg)
        if wandb is not None:
            wandb.resume = "allow"
    OmegaConf.set_struct(cfg, True)
    return cfg


def requeued_checkpoint(run_dir: Path) -> str | None:
    """A SLURM job that Lightning requeued on the pre-emption signal starts again in the same run dir (a
    multirun job's dir is pickled with it; a single run's is fixed with ``hydra.run.dir``): it continues from
    the newest checkpoint there, like ``resume=``, when Lightning left an ``hpc_ckpt_<n>.ckpt``."""
    if SLURMEnvironment.detect() and any(Path(run_dir).glob("hpc_ckpt_*.ckpt")):
        return resume_checkpoint(run_dir)
    return None


def resume_checkpoint(run_dir: Path) -> str:
    """``checkpoints/last.ckpt`` (end of the last finished epoch: an exact resume), else SLURM's newest
    ``hpc_ckpt_<n>.ckpt`` (taken mid-epoch on the pre-emption signal: the rest of that epoch sees the epoch's
    first batches again, so close to, not exactly, the uninterrupted run); checked readable."""
    run_dir = Path(run_dir).absolute()
    last = run_dir / "checkpoints" / "last.ckpt"
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not last.is_file() and not hpc:
        raise KDLabError(
            f"resume={run_dir}: no checkpoint in it (checkpoints/last.ckpt is written at the end of the first "
            f"epoch; the run was stopped before, or checkpointing was off): {FRESH_RUN}."
        )
    path = last if last.is_file() else hpc[-1]
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if not {"state_dict", "epoch", "loops"} <= set(checkpoint):
            raise ValueError("not a Lightning training checkpoint")
    except Exception as e:
        raise KDLabError(
            f"resume={run_dir}: checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}). Delete it to "
            f"resume from an older one if there is one, or {FRESH_RUN}."
        ) from e
    return str(path)


def continue_csv_logs(loggers: list[Logger], checkpoint: str) -> None:
    """CSV logs of a resumed run append to the original file. Lightning deletes an existing ``metrics.csv``
    when its writer starts, so its rows up to the checkpoint's epoch are read first and written back (the
    rows after it are logged again by the resumed epochs)."""
    csv_loggers = [logger for logger in loggers if isinstance(logger, CSVLogger)]
    epoch = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["epoch"] if csv_loggers else 0
    for logger in csv_loggers:
        path = Path(logger.log_dir) / "metrics.csv"
        header, rows = [], []
        if path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [r for r in reader if not r.get("epoch") or float(r["epoch"]) <= epoch]
        writer = logger.experiment  # starting the writer deletes metrics.csv
        if header:
            with path.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(rows)
            writer.metrics_keys = sorted(header)


def rng_states() -> dict[str, Any]:
    """The global generators (torch, CUDA, numpy, python) as types a ``weights_only`` load accepts (Lightning
    tests a checkpoint that way; numpy's own state holds an ndarray)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
