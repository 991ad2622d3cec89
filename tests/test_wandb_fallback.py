"""W&B asked to run online against a server that answers but is not W&B, rejects the key, or never answers:
the run logs offline with a warning (docs/errors.md), and never waits on the server for long."""

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import TINY, subprocess_env

import kd_lab.run.loggers as loggers
from kd_lab.run.loggers import build_loggers

KEY = "0" * 40
ANSWERS = {  # what the fake server answers to every request: status, content type, body
    "html": (200, "text/html", b"<html><body>a web page, not W&B</body></html>"),
    "not_found": (404, "text/html", b"<html>404 Not Found</html>"),
    "rejects_key": (401, "application/json", b'{"errors": [{"message": "invalid API key"}]}'),
    "no_user": (200, "application/json", b'{"data": {"viewer": null}}'),
}


def serve(answer: tuple[int, str, bytes]) -> ThreadingHTTPServer:
    status, kind, body = answer

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def online_env(monkeypatch, tmp_path, url: str) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


@pytest.fixture(params=sorted(ANSWERS))
def fake_server(request):
    server = serve(ANSWERS[request.param])
    yield request.param, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


EXPECTED = {
    "html": "is not W&B (HTTP 200 on {url}/graphql, but no GraphQL reply): logging offline; check WANDB_BASE_URL",
    "not_found": "is not W&B (HTTP 404 on {url}/graphql): logging offline; check WANDB_BASE_URL",
    "rejects_key": "rejects the API key (HTTP 401): logging offline; check WANDB_API_KEY or `wandb login`",
    "no_user": "rejects the API key (no user for it): logging offline; check WANDB_API_KEY or `wandb login`",
}


def test_not_wandb_or_key_rejected_means_offline(make_cfg, monkeypatch, caplog, tmp_path, fake_server):
    name, url = fake_server
    online_env(monkeypatch, tmp_path, url)
    start = time.monotonic()
    (logger,) = build_loggers(make_cfg("logger=wandb").logger)
    assert time.monotonic() - start < 10
    assert logger._wandb_init["mode"] == "offline"
    warning = f"W&B server {url} {EXPECTED[name].format(url=url)}, and sync later with `wandb sync <run dir>/wandb/"
    assert warning in caplog.text


def test_server_that_never_answers_means_offline_within_the_deadline(make_cfg, monkeypatch, caplog, tmp_path):
    """A server that accepts the connection and never answers (a hung proxy) holds nothing: the probe's own
    deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    online_env(monkeypatch, tmp_path, url)
    monkeypatch.setattr(loggers, "ANSWER_TIMEOUT", 1.0)
    try:
        start = time.monotonic()
        (logger,) = build_loggers(make_cfg("logger=wandb").logger)
        assert time.monotonic() - start < 5
    finally:
        listener.close()
    assert logger._wandb_init["mode"] == "offline"
    assert f"W&B server {url} did not answer {url}/graphql within 1 s: logging offline" in caplog.text


def test_wandb_init_that_fails_anyway_means_offline(make_cfg, monkeypatch, caplog, tmp_path):
    """A server that passes the probe but fails ``wandb.init`` (here: the probe is skipped, and wandb.init meets a
    web page): the online run is started when the logger is built, and its failure gives an offline run."""
    import wandb

    server = serve(ANSWERS["html"])
    url = f"http://127.0.0.1:{server.server_address[1]}"
    online_env(monkeypatch, tmp_path, url)
    monkeypatch.setattr(loggers, "_not_wandb", lambda *args: None)
    try:
        (logger,) = build_loggers(make_cfg("logger=wandb").logger)  # wandb.init gives up after INIT_TIMEOUT s
    finally:
        server.shutdown()
        server.server_close()
    try:
        assert logger._wandb_init["mode"] == "offline"
        assert f"W&B server {url} could not start an online run (" in caplog.text
        assert "): logging offline; sync later with `wandb sync <run dir>/wandb/offline-run-*`." in caplog.text
        assert logger.experiment.settings.mode == "offline"  # the offline run starts
    finally:
        wandb.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_run_against_a_web_page_finishes_offline(tmp_path):
    """The whole run, as a user starts it: a teacher trained, the student logged offline, results finished."""
    import subprocess

    server = serve(ANSWERS["html"])
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = subprocess_env(tmp_path)
    env.update(WANDB_MODE="online", WANDB_BASE_URL=url, WANDB_API_KEY=KEY, NETRC=str(tmp_path / "no-netrc"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    cmd = [sys.executable, "-m", "kd_lab.run.train", *TINY, "logger=wandb", "trainer.accelerator=cpu"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    finally:
        server.shutdown()
        server.server_close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"W&B server {url} is not W&B (HTTP 200 on {url}/graphql, but no GraphQL reply): logging offline" in out
    (results,) = tmp_path.glob("logs/**/results.json")
    assert json.loads(results.read_text())["status"] == "finished"
    assert list(results.parent.glob("wandb/offline-run-*"))
