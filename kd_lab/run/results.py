"""``<run_dir>/results.json``: everything a comparison needs about one run, written atomically.

Two reporting protocols are recorded side by side because the benchmarks disagree (RepDistiller reports the
last epoch, mdistiller the best; RD#16, MD#30): ``best`` holds the test metrics of the weights with the best
*validation* accuracy, ``last`` those of the final weights. Test accuracy never selects anything.
"""

import contextlib
import platform
import shlex
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from kd_lab.run.outcome import interruption
from kd_lab.utils.io import atomic_write_json

PACKAGES = ("kd-lab", "torch", "lightning", "hydra-core", "omegaconf", "torchmetrics", "wandb", "mnist1d", "numpy")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    # torch picks its CPU kernels by the instruction set, and they may add floats in another order
    versions["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = Path(run_dir) / "results.json"
    # threads: the count in effect (conf/train.yaml `threads`, or torch's default): it changes the numbers
    atomic_write_json({**results, "threads": torch.get_num_threads(), "versions": package_versions()}, path)
    return path


def interrupted_record(e: BaseException, run_dir: Path) -> dict[str, Any]:
    """What results.json records of a run stopped by SIGINT or SIGTERM (``{}`` for an ordinary failure):
    ``status: interrupted`` and ``resume``, the command that continues it from its last checkpoint (None
    before the first one: nothing to resume, start the run again)."""
    signum = interruption(e)
    if signum is None:
        return {}
    run_dir = Path(run_dir).absolute()
    name = signal.Signals(signum).name
    if (run_dir / "checkpoints" / "last.ckpt").is_file() or any(run_dir.glob("hpc_ckpt_*.ckpt")):
        command = f"kd-lab resume={shlex.quote(str(run_dir))}"
        return {"status": "interrupted", "error": f"interrupted by {name}", "resume": command}
    error = f"interrupted by {name} before its first checkpoint: nothing to resume, start the run again"
    return {"status": "interrupted", "error": error, "resume": None}
