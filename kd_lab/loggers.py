"""Loggers from config: W&B (offline unless the user has configured it), CSV, or none.

W&B facts that shape this file (STACK-NOTES): online with a key but no network hangs ~100 s, so online is
used only when credentials exist *and* the server answers within a second or two; ``WandbLogger(offline=True)``
leaks ``WANDB_MODE=dryrun`` into the environment, so the mode is passed through to ``wandb.init`` instead;
every job of a multirun must ``wandb.finish()``.
"""

import logging
import netrc
import os
import socket
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(_wandb_base_url()).hostname or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _reachable(url: str, timeout: float = 2.0) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(requested: str | None) -> str:
    """``requested`` (config) > ``WANDB_MODE`` > online if credentials and server reachable > offline."""
    mode = requested or os.environ.get("WANDB_MODE")
    if mode == "dryrun":
        mode = "offline"
    if mode in ("offline", "disabled"):
        return mode
    if mode is None and not _has_wandb_credentials():
        return "offline"
    if _reachable(_wandb_base_url()):
        return "online"
    log.warning("W&B server %s unreachable: logging offline (sync later with `wandb sync`).", _wandb_base_url())
    return "offline"


def build_loggers(cfg: DictConfig | None) -> list[Logger]:
    loggers: list[Logger] = []
    for _name, spec in (cfg or {}).items():
        if not spec or "_target_" not in spec:
            continue
        if spec["_target_"].endswith("WandbLogger"):
            loggers.append(instantiate(spec, mode=wandb_mode(spec.get("mode"))))
            log.info("W&B logging %s to %s", loggers[-1]._wandb_init["mode"], spec.get("save_dir"))
        else:
            loggers.append(instantiate(spec))
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs so that the next job of a multirun starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None:
                wandb.finish()


def quiet_lightning_console() -> None:
    """Lightning adds its own console handler; under Hydra (which configures the root logger) every line
    would print twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
