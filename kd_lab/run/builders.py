"""Objects from config by ``_target_`` (the registry), and the config helpers that the run's assembly uses."""

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lab.errors import KDLabError
from kd_lab.run.callbacks import ProgressBar

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"  # kd_lab/conf: the configs ship inside the package

# keys of a group that describe it but are not constructor arguments
META_KEYS = ("name", "extra_teachers", "peer_models")


def to_dict(cfg: DictConfig | None) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else {}  # type: ignore[return-value]


def build(cfg: DictConfig, **kwargs) -> Any:
    spec = {k: v for k, v in to_dict(cfg).items() if k not in META_KEYS}
    return instantiate(spec, **kwargs)


def config_hash(cfg: DictConfig) -> int:
    """A 63-bit hash of the resolved config (every DDP rank must compute the same)."""
    digest = hashlib.sha1(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def build_datamodule(cfg: DictConfig):
    return build(cfg.data)


def build_model(model_cfg: DictConfig):
    return build(model_cfg)


def build_trainer(
    trainer_cfg: DictConfig,
    callbacks: list[L.Callback],
    loggers: list[Logger] | bool,
    **overrides: Any,
) -> L.Trainer:
    spec = to_dict(trainer_cfg)
    if spec.get("enable_progress_bar") is None:  # a bar in a terminal, compact epoch lines otherwise
        spec["enable_progress_bar"] = sys.stderr.isatty()
    spec.update(overrides)
    if spec.get("enable_progress_bar") and not any(isinstance(c, ProgressBarBase) for c in callbacks):
        callbacks = [*callbacks, ProgressBar()]  # kd-lab's bar: epochs counted from 1, log lines printed above it
    return instantiate(spec, callbacks=callbacks, logger=loggers)


def replace_nodes(cfg: DictConfig, **nodes: Any) -> DictConfig:
    """A copy of ``cfg`` with the top-level nodes ``nodes`` replaced (``None`` removes a group's choice)."""
    new = cfg.copy()
    with open_dict(new):
        for key, value in nodes.items():
            new[key] = value
    return new


def group_options(group: str) -> list[str]:
    """The options of a config group (``_name.yaml`` files are shared parts of options, not options)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("[!_]*.yaml"))


def group_option(cfg: DictConfig, group: str, option: str, into: str, keep: tuple[str, ...] = ()) -> DictConfig:
    """``cfg`` with ``cfg[into]`` replaced by ``conf/<group>/<option>.yaml``, keeping the ``keep`` keys of the
    old node (e.g. a teacher's ``optim``); interpolations resolve against the whole config."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if not path.is_file():
        raise KDLabError(f"unknown {group} '{option}'; valid options: {group_options(group)}.")
    kept = {k: cfg[into][k] for k in keep if k in cfg[into]}
    return replace_nodes(cfg, **{into: OmegaConf.merge(kept, OmegaConf.load(path))})


def build_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    return [instantiate(spec) for spec in to_dict(cfg).values() if spec and "_target_" in spec]
