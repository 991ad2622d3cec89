"""The checks of a lifelong config before anything is built or loaded (no torch import here).

Every mistake is one KDLabError that names the key, the bad value and the fix.
"""

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from kd_lab.errors import KDLabError
from kd_lab.lifelong.tasks import check_split

METHODS = ("lwf", "finetune", "joint")
KEYS = {
    "method", "seed", "threads", "tasks", "epochs_per_task", "warmup_epochs", "lambda_o", "temperature",
    "limit_batches", "optimizer", "data", "trunk", "paths",
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """The checked values the loop reads."""

    method: str
    seed: int
    tasks: list[list[int]]
    epochs: int
    warmup_epochs: int
    lambda_o: float
    temperature: float
    limit_batches: int | None


def _number(cfg: DictConfig, key: str, lower: float, strict: bool, hint: str) -> float:
    value = cfg.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lower or (strict and value == lower):
        bound = f"> {lower:g}" if strict else f">= {lower:g}"
        raise KDLabError(f"{key}={value!r} is out of range: it must be a finite number {bound}; set e.g. {hint}.")
    return float(value)


def _int(cfg: DictConfig, key: str, lower: int, hint: str, optional: bool = False) -> int | None:
    value = cfg.get(key)
    if optional and value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < lower:
        none = " or null" if optional else ""
        raise KDLabError(f"{key}={value!r} is out of range: it must be an int >= {lower}{none}; set e.g. {hint}.")
    return value


def check_config(cfg: DictConfig) -> Settings:
    """The checked settings of ``cfg`` (conf/lifelong.yaml), or the first mistake as a KDLabError."""
    unknown = sorted(set(cfg.keys()) - KEYS)
    if unknown:
        raise KDLabError(
            f"unknown key(s) {unknown} in the lifelong config: it takes {sorted(KEYS)} (conf/lifelong.yaml); "
            "fix the spelling, or drop the key."
        )
    method = cfg.get("method")
    if method not in METHODS:
        raise KDLabError(
            f"method={method!r} is not a lifelong method: pick one of {list(METHODS)} (lwf: Learning without "
            "Forgetting; finetune: the same sequence without the KD term; joint: every task's data at once)."
        )
    if cfg.data.get("augment") is not None:
        # the loop trains on the plain tensors; mixup would mix the labels of two tasks
        raise KDLabError(
            "data.augment is set, but the lifelong loop trains without augmentation (mixup would mix the "
            "labels of two tasks); set data.augment=null."
        )
    _int(cfg, "threads", 1, "threads=1 (null: one per core)", optional=True)
    split = cfg.get("tasks")
    tasks = check_split(OmegaConf.to_object(split) if OmegaConf.is_config(split) else split, int(cfg.data.num_classes))
    return Settings(
        method=method,
        seed=_int(cfg, "seed", 0, "seed=0"),
        tasks=tasks,
        epochs=_int(cfg, "epochs_per_task", 1, "epochs_per_task=30"),
        warmup_epochs=_int(cfg, "warmup_epochs", 0, "warmup_epochs=5 (0 skips the warm-up)"),
        lambda_o=_number(cfg, "lambda_o", 0.0, False, "lambda_o=1.0 (the paper's value; 0 is fine-tuning)"),
        temperature=_number(cfg, "temperature", 0.0, True, "temperature=2.0 (the paper's value)"),
        limit_batches=_int(cfg, "limit_batches", 1, "limit_batches=null (every batch)", optional=True),
    )
