"""Loggers from config: W&B (offline unless the user has configured it), CSV, TensorBoard, or none.

W&B facts that shape this file (measured with W&B 0.31 on machines without network): online with a key but
no network hangs ~100 s, so online is used only when credentials exist *and* the server answers within a
second or two (name lookup included: a resolver without network can stall for many seconds, so it runs in a
thread with a deadline); online without credentials would ask for a login (an error without a terminal, a
prompt that blocks with one), so it falls back to offline with a warning too. ``WandbLogger(offline=True)``
leaks ``WANDB_MODE=dryrun`` into the environment, so the mode is passed through to ``wandb.init`` instead;
every job of a multirun must ``wandb.finish()`` (or all of its jobs log into one run). A server that opens a
connection but is not W&B, or rejects the key, made ``wandb.init`` fail with a ``CommError`` (after the
teacher was trained), so the probe also asks the server who the key belongs to (W&B's GraphQL ``viewer``,
one request with a deadline), and an online ``wandb.init`` that fails anyway is retried offline.
"""

import base64
import contextlib
import json
import logging
import netrc
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from kd_lab.errors import brief

log = logging.getLogger(__name__)
SYNC_HINT = "<run dir>/wandb/offline-run-*"
CONNECT_TIMEOUT = 2.0  # name lookup and TCP connect
ANSWER_TIMEOUT = 5.0  # the server's answer to one GraphQL query
VIEWER_QUERY = "query Viewer { viewer { id } }"


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


def _api_key() -> str | None:
    """The API key ``wandb`` would send: ``WANDB_API_KEY``, else the netrc entry of the server's host (None for
    an identity token file, which ``wandb`` exchanges itself)."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        found = netrc.netrc(path).authenticators(urlparse(_wandb_base_url()).hostname or "")
    except (netrc.NetrcParseError, OSError):
        return None
    return found[2] if found else None


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _not_wandb(url: str, key: str, timeout: float | None = None) -> str | None:
    """None when ``url`` answers W&B's GraphQL API with the user of ``key``; otherwise what it did instead, as
    the warning says it. One POST, given up after ``timeout`` seconds whatever the server does (a server that
    accepts the connection and never answers, or answers byte by byte, cannot hold the run)."""
    timeout = ANSWER_TIMEOUT if timeout is None else timeout
    endpoint = url.rstrip("/") + "/graphql"
    found: list[str | None] = []
    ask = threading.Thread(target=_ask_viewer, args=(endpoint, key, timeout, found), daemon=True)
    ask.start()
    ask.join(timeout)
    return found[0] if found else f"did not answer {endpoint} within {timeout:g} s"


def _ask_viewer(endpoint: str, key: str, timeout: float, found: list) -> None:
    token = base64.b64encode(f"api:{key}".encode()).decode()
    request = urllib.request.Request(
        endpoint,
        data=json.dumps({"query": VIEWER_QUERY}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(1 << 20)
    except urllib.error.HTTPError as e:
        rejected = e.code in (401, 403)
        answer = f"rejects the API key (HTTP {e.code})" if rejected else f"is not W&B (HTTP {e.code} on {endpoint})"
        found.append(answer)
        return
    except Exception as e:  # refused, reset, timed out, bad TLS: no W&B answer
        if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
            found.append(f"did not answer {endpoint} within {timeout:g} s")  # as when the join gives up first
        else:
            found.append(f"gave no W&B answer for {endpoint} ({brief(e, 100)})")
        return
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not ("data" in reply or "errors" in reply):
        found.append(f"is not W&B (HTTP 200 on {endpoint}, but no GraphQL reply)")
    elif not (reply.get("data") or {}).get("viewer"):
        found.append("rejects the API key (no user for it)")
    else:
        found.append(None)


def _reachable(url: str, timeout: float = CONNECT_TIMEOUT) -> bool:
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
    """``requested`` (config) > ``WANDB_MODE`` > online if credentials and a W&B server that accepts them >
    offline. Online asked for but impossible (no credentials, no server, a server that is not W&B or rejects
    the key) falls back to offline with a warning."""
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
    url = _wandb_base_url()
    if not _reachable(url):
        log.warning(
            "W&B server %s unreachable within %g s: logging offline; sync later with `wandb sync %s`.",
            url,
            CONNECT_TIMEOUT,
            SYNC_HINT,
        )
        return "offline"
    key = _api_key()
    why = _not_wandb(url, key) if key else None
    if why is None:
        return "online"
    fix = "WANDB_API_KEY or `wandb login`" if why.startswith("rejects") else "WANDB_BASE_URL"
    log.warning(
        "W&B server %s %s: logging offline; check %s, and sync later with `wandb sync %s`.", url, why, fix, SYNC_HINT
    )
    return "offline"


# seconds an online wandb.init may take before the run goes offline (W&B's own default waits 90 s)
INIT_TIMEOUT = 20


def _wandb_settings(mode: str, spec: dict) -> dict:
    """``wandb.init``'s settings: W&B's own terminal lines off, the user's ``settings`` keys on top.

    W&B prints ~30 lines per run (banner, history, summary, sync hint) that bury kd-lab's summary. Offline,
    ``silent`` drops them all; kd-lab's own line says where the run is and how to sync or view it. Warnings W&B
    prints with ``termwarn`` (those meant for the user) still show: ``silent`` of one run only stops that run's
    printer. Online, ``quiet`` keeps the run's name and link. The console capture stays W&B's default, so the
    run's ``output.log`` still holds the terminal output.
    """
    ours: dict = {"silent": True} if mode == "offline" else {"quiet": True}
    if mode == "online":
        ours["init_timeout"] = INIT_TIMEOUT
    theirs = spec.get("settings") or {}
    if isinstance(theirs, DictConfig):
        theirs = OmegaConf.to_container(theirs, resolve=True)
    return {**ours, **theirs}


def _instantiate_wandb(spec: dict, mode: str) -> WandbLogger:
    # _convert_="all": wandb.init takes a plain dict as settings and ignores a DictConfig
    logger = instantiate(spec, mode=mode, settings=_wandb_settings(mode, spec), _convert_="all")
    if logger._wandb_init.get("anonymous") is None:  # Lightning passes None, which W&B warns is deprecated
        logger._wandb_init.pop("anonymous", None)
    return logger


def _wandb_logger(spec: dict) -> WandbLogger:
    """The W&B logger of ``spec``; an online run is started here, so that a server that fails ``wandb.init``
    anyway (after the probe) makes an offline run with a warning instead of ending the training."""
    logger = _instantiate_wandb(spec, wandb_mode(spec.get("mode")))
    if logger._wandb_init["mode"] != "online":
        return logger
    try:
        logger.experiment  # noqa: B018  (wandb.init on rank zero; a no-op elsewhere)
    except Exception as e:  # wandb.errors.CommError, UsageError, AuthenticationError, a timeout
        import wandb

        if wandb.run is not None:
            wandb.finish()
        log.warning(
            "W&B server %s could not start an online run (%s): logging offline; sync later with `wandb sync %s`.",
            _wandb_base_url(),
            brief(e, 200, sentence=True),
            SYNC_HINT,
        )
        logger = _instantiate_wandb(spec, "offline")
    return logger


def _say_where(logger: WandbLogger) -> None:
    """One line in place of W&B's banner: the run, its mode and, offline, how to upload or view it."""
    mode, name = logger._wandb_init["mode"], logger._wandb_init.get("name")
    where = Path(logger._wandb_init.get("dir") or ".") / "wandb"
    if mode == "offline":
        log.info(
            "W&B run %s logs offline: `wandb sync %s/offline-run-*` uploads it, "
            "`wandb leet %s` shows it in the terminal",
            name,
            where,
            where,
        )
    else:
        log.info("W&B run %s logging %s to %s", name, mode, where)


def build_loggers(cfg: DictConfig | dict | None) -> list[Logger]:
    loggers: list[Logger] = []
    for _name, spec in (cfg or {}).items():
        if not spec or "_target_" not in spec:
            continue
        if spec["_target_"].endswith("WandbLogger"):
            loggers.append(_wandb_logger(spec))
            _say_where(loggers[-1])
        else:
            loggers.append(instantiate(spec))
    return loggers


TEACHER_DIR = "teacher"  # a store teacher's CSV and TensorBoard logs: <the run's save_dir>/teacher/


def build_teacher_loggers(cfg: DictConfig | None, name: str, tags: list[str]) -> list[Logger]:
    """The run's loggers (its ``logger`` config) for a teacher that the store trains now, so its training curve
    is kept: a W&B run of its own (same project and group, ``job_type`` teacher, named ``name``), and every
    other logger writing under ``<its save_dir>/teacher``. Nothing here changes what the teacher learns."""
    specs: dict[str, dict] = {}
    for key, spec in (cfg or {}).items():
        if not spec or "_target_" not in spec:
            continue
        spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
        if spec["_target_"].endswith("WandbLogger"):
            spec.pop("id", None)  # a run id or version of the run's own would resume that run
            spec.pop("version", None)
            spec.update(name=name, job_type="teacher", tags=tags)
        elif spec.get("save_dir") is not None:
            spec["save_dir"] = str(Path(spec["save_dir"]) / TEACHER_DIR)
        specs[key] = spec
    return build_loggers(specs)


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
