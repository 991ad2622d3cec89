"""Shared test helpers: test-only algorithms and callbacks (reachable from configs as ``helpers.<Name>``; pytest puts
tests/ on sys.path), kd-lab subprocess runners, module builders, result comparisons, fake CIFAR files."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor

from kd_lab.algorithms.base import Algorithm, StepOutputs
from kd_lab.core.tasks import Classification


class NaNAfter(Algorithm):
    """Cross-entropy plus a term that turns NaN at step ``after``: exercises the non-finite-loss guard."""

    name = "nan_after"
    needs_teacher = False

    def __init__(self, after: int = 2, ce_weight: float = 1.0):
        super().__init__(ce_weight)
        self.after = after
        self.calls = 0

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        self.calls += 1
        bad = torch.tensor(float("nan") if self.calls > self.after else 0.0)
        return {**self.ce_term(out), "exploding": out.logits.sum() * 0 + bad}


def subprocess_env(root: Path) -> dict[str, str]:
    """The environment of a ``kd-lab`` subprocess: everything under ``root``, W&B offline, one thread, and no
    ``WANDB_SERVICE`` inherited from this pytest process (an in-process W&B run of an earlier test starts a
    service that would otherwise be shared by every subprocess and keep a killed run's id "in use")."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "KD_LAB_ROOT": str(root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


# the smallest real run: fake data, a 2-epoch MLP teacher and student
TINY = ["data=fake", "teacher=mlp_large", "student=mlp_small", "teacher.max_epochs=2", "trainer.max_epochs=2"]


def run_kd_lab(root: Path, *args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """``kd-lab <args>`` in a subprocess writing under ``root``; with ``check``, a non-zero exit fails the test
    and shows the end of its output."""
    cmd = [sys.executable, "-m", "kd_lab.run.train", *args]
    proc = subprocess.run(cmd, cwd=root, env=subprocess_env(root), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class BackwardCounter(L.Callback):
    """Counts ``on_after_backward`` calls: a callback that needs Lightning's own backward and step."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer, module) -> None:
        self.calls += 1


class BatchPeeker(L.Callback):
    """Looks at every training batch."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.sizes.append(len(batch["target"]))


def build_run_module(cfg):
    """``(module, datamodule)`` as ``train`` builds them, with an untrained teacher (seeded: repeatable)."""
    from kd_lab.run.assemble import build_run
    from kd_lab.run.builders import build_datamodule

    datamodule = build_datamodule(cfg)
    torch.manual_seed(0)
    run = build_run(cfg, datamodule)
    return run.module, datamodule


def assert_same_results(reference: dict, other: dict, abs_tol: float = 1e-6, protocols=("best", "last")) -> None:
    """Every metric of ``reference``'s protocols (results.json's ``best`` / ``last``) equal in ``other``."""
    for protocol in protocols:
        for key, value in reference[protocol].items():
            assert other[protocol][key] == pytest.approx(value, abs=abs_tol), (protocol, key)


def start(root: Path, *args: str, new_session: bool = False) -> subprocess.Popen:
    """``kd-lab <args>`` started in a subprocess under ``root`` (to be killed, or ``finish``ed). ``new_session``:
    in a process group of its own, with the DDP ranks it starts, so ``os.killpg(proc.pid, ...)`` kills them all."""
    env = subprocess_env(root)
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kd_lab.run.train", *args]
    return subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


def finish(proc: subprocess.Popen, timeout: int = 240) -> str:
    """Wait for a ``start``ed run; a non-zero exit fails the test with the end of its output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


# -- fake CIFAR files in the official layout --------------------------------------------------------------
LAYOUT = {  # variant: (folder, train files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def write_fake_cifar(root: Path, variant: str = "cifar100", per_file: int = 12, seed: int = 0) -> Path:
    """Files as the official archive has them: pickled dicts with bytes keys, ``data`` uint8 (n, 3072)."""
    folder, train, test, label_key, classes = LAYOUT[variant]
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name in train + test:
        entry = {
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, per_file).tolist(),
            b"batch_label": b"fake",
        }
        (root / folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    return root


def step_outputs(*args, **kwargs) -> StepOutputs:
    """``StepOutputs`` of a classification step (the task gives the label loss), for tests without a run."""
    return StepOutputs(*args, task=kwargs.pop("task", Classification(2)), **kwargs)


class OwnDrawsAugment:
    """An augmentation with random draws of its own (not from the loader's generator): a view store refuses it."""

    def __call__(self, batch, g):
        return {**batch, "input": batch["input"] + 0.1 * torch.randn(batch["input"].shape)}
