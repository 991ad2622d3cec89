"""Shared fixtures: compose configs in-process (imports and compose cost 4-5 s per process; subprocesses only for
CLI and sweep tests), with every path under pytest's tmp dirs and one thread per process (under CPU contention,
torch's default of 2 threads made a tiny model ~170x slower)."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import kd_lab  # noqa: F401  (registers the config resolvers)
from kd_lab.run.train import CONFIG_DIR

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

FAST = [
    "data=fake",
    "teacher=mlp_large",
    "teacher.max_epochs=2",
    "student=mlp_small",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "logger=none",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """MNIST-1D is generated once per test session."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path, data_dir) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, fast=True)`` -> a composed config writing only under ``tmp_path``."""

    def make(*overrides: str, fast: bool = True, run: str = "run") -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*(FAST if fast else []), *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / run)
            cfg.paths.data_dir = str(data_dir)
            cfg.paths.teacher_store = str(tmp_path / "teachers")
            cfg.paths.log_dir = str(tmp_path / "logs")
        return cfg

    return make
