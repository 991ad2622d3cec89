"""DDP under Hydra multirun, made correct.

Lightning's ``ddp`` strategy starts ranks 1..N-1 by re-running ``sys.argv``. Under ``-m`` that argv is the
whole sweep, so each child runs a sweep of its own and may train another config than rank 0 of the same
job (observed with the Optuna sweeper; Lightning PR #18175, hydra#2070), and the run dir is the sweep's,
not the job's. We replace the command Lightning builds: children re-compose exactly this job's config
(its task overrides, no ``-m``) into this job's output directory. ``DistillationModule.on_fit_start``
then checks that every rank hashed the same config.
"""

import sys
from collections.abc import Sequence

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
        "kd_lab.train",
        f"--config-path={config_dir}",
        f"--config-name={hc.job.config_name}",
    ]
    command += [o for o in hc.overrides.task if not o.startswith(IGNORED_OVERRIDE_PREFIXES)]
    command += [
        f"hydra.run.dir={hc.runtime.output_dir}",
        f"hydra.job.name=ddp_rank_{local_rank}",
        "hydra.output_subdir=null",
        "hydra/hydra_logging=disabled",
    ]
    return command, get_original_cwd()


def patch_lightning_hydra_launcher() -> None:
    pytorch_launcher._hydra_subprocess_cmd = job_subprocess_cmd
    fabric_launcher._hydra_subprocess_cmd = job_subprocess_cmd
