"""Loggers from config: W&B (offline unless the user has configured it), CSV, or none.

W&B facts that shape this file (measured with W&B 0.31 on machines without network): online with a key but
no network hangs ~100 s, so online is used only when credentials exist *and* the server answers within a
second or two (name lookup included: a resolver without network can stall for many seconds, so it runs in a
thread with a deadline); online without credentials would ask for a login (an error without a terminal, a
prompt that blocks with one), so it falls back to offline with a warning too. ``WandbLogger(offline=True)``
leaks ``WANDB_MODE=dryrun`` into the environment, so the mode is passed through to ``wandb.init`` instead;
every job of a multirun must ``wandb.finish()`` (or all of its jobs log into one run).
"""

import contextlib
import logging
import netrc
import os
import socket
import threading
import time
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig

log = logging.getLogger(__name__)
SYNC_HINT = "<run dir>/wandb/offline-run-*"


def _has_wandb_credentials() -> bool:
    """Where ``wandb`` itself looks: the key or an identity token in the environment, then the netrc file
    (``NETRC``, else ``~/.netrc``, written by ``wandb login``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(urlparse(_wandb_base_url()).hostname or "") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _reachable(url: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds, name lookup included."""
    parsed = urlparse(url)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    deadline = time.monotonic() + timeout
    found: list = []
    # getaddrinfo has no timeout of its own: look the name up in a daemon thread and stop waiting for it
    lookup = threading.Thread(target=_lookup, args=(parsed.hostname, port, found), daemon=True)
    lookup.start()
    lookup.join(timeout)
    for family, kind, proto, _, address in found:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(address)
                return True
        except OSError:
            continue
    return False


def _lookup(host: str | None, port: int, found: list) -> None:
    with contextlib.suppress(OSError):
        found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))


def wandb_mode(requested: str | None) -> str:
    """``requested`` (config) > ``WANDB_MODE`` > online if credentials and server reachable > offline.
    Online asked for but impossible (no credentials, no server) falls back to offline with a warning."""
    mode = requested or os.environ.get("WANDB_MODE")
    if mode == "dryrun":
        mode = "offline"
    if mode in ("offline", "disabled"):
        return mode
    if not _has_wandb_credentials():
        if mode is not None:  # asked for online: say why it is not
            log.warning(
                "W&B mode %s but no API key (WANDB_API_KEY or `wandb login`): logging offline; "
                "sync later with `wandb sync %s`.",
                mode,
                SYNC_HINT,
            )
        return "offline"
    if _reachable(_wandb_base_url()):
        return "online"
    log.warning(
        "W&B server %s unreachable within 2 s: logging offline; sync later with `wandb sync %s`.",
        _wandb_base_url(),
        SYNC_HINT,
    )
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
