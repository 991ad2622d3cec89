"""DDP under Hydra multirun, made correct.

Lightning's ``ddp`` strategy starts ranks 1..N-1 by re-running ``sys.argv``. Under ``-m`` that argv is the
whole sweep, so each child runs a sweep of its own and may train another config than rank 0 of the same
job (observed with the Optuna sweeper; Lightning PR #18175, hydra#2070), and the run dir is the sweep's,
not the job's. We replace the command Lightning builds: children re-compose exactly this job's config
(its task overrides, no ``-m``) into this job's output directory. ``DistillationModule.on_fit_start``
then checks that every rank hashed the same config.
"""

import os
import sys
from collections.abc import Sequence

import torch
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.strategies.launchers import subprocess_script as pytorch_launcher

IGNORED_OVERRIDE_PREFIXES = ("hydra.", "hydra/")


def job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    config_dir = next(s.path for s in hc.runtime.config_sources if s.provider == "main")
    command = [
        sys.executable,
        "-m",
        "kd_lab.run.train",
        f"--config-path={config_dir}",
        f"--config-name={hc.job.config_name}",
    ]
    command += [o for o in hc.overrides.task if not o.startswith(IGNORED_OVERRIDE_PREFIXES)]
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',  # quoted: job dirs contain = and ,
        f"hydra.job.name=ddp_rank_{local_rank}",
        "hydra.output_subdir=null",
        "hydra/hydra_logging=disabled",
    ]
    return command, get_original_cwd()


def patch_lightning_hydra_launcher() -> None:
    pytorch_launcher._hydra_subprocess_cmd = job_subprocess_cmd
    fabric_launcher._hydra_subprocess_cmd = job_subprocess_cmd


# What Lightning's launcher sets in the parent's environment; left there, the next job of a multirun would
# believe its ranks were already started and wait for children that have exited.
LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_WORLD_SIZE")


class job_scope:
    """``with job_scope(): train(cfg)`` leaves the process as it found it: no process group, and the
    launcher's environment variables restored (those set by torchrun or SLURM before the job stay)."""

    def __enter__(self) -> "job_scope":
        self.saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
        return self

    def __exit__(self, *exc) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def global_rank() -> int:
    """This process's global rank: set by torchrun or SLURM from the start, by Lightning for its children."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0
