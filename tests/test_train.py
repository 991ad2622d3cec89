"""train(cfg) end to end: results.json, repeatability, loggers, the default run in a shortened form."""

import json
import os

import pytest
import torch

from kd_lab.run.loggers import wandb_mode
from kd_lab.run.train import train


def test_results_json_records_the_run(make_cfg, tmp_path):
    train(make_cfg("callbacks=default", "seed=3"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "finished" and saved["seed"] == 3
    assert saved["config"]["algorithm"]["temperature"] == 4.0  # the resolved config
    assert saved["names"] == {
        "data": "fake",
        "teacher": "mlp_large",
        "student": "mlp_small",
        "algorithm": "kd",
        "scheme": "offline",
        "task": "classification",
    }
    for protocol in ("best", "last"):
        for key in ("test/acc", "test/teacher_acc", "test/agreement", "test/kl_to_teacher", "epoch"):
            assert key in saved[protocol], (protocol, key)
    assert saved["last"]["epoch"] == 2 and saved["best"]["epoch"] in (1, 2)  # counted from 1, of max_epochs=2
    assert 0 <= saved["best"]["val/acc"] <= 1
    assert saved["params"]["teacher"] / saved["params"]["student"] == pytest.approx(saved["params"]["compression"])
    assert saved["teacher"]["metrics"]["test/acc"] == pytest.approx(saved["best"]["test/teacher_acc"])
    assert saved["wall_seconds"] > 0 and saved["versions"]["torch"].startswith("2.")
    assert saved["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512"...
    assert saved["stage"] == "test" and saved["teacher"]["reused"] is False  # the stage it ended in; trained now
    assert 0 < saved["teacher_seconds"] < saved["wall_seconds"] and 0 < saved["fit_seconds"] < saved["student_seconds"]
    assert saved["teacher_seconds"] + saved["student_seconds"] <= saved["wall_seconds"]
    assert not list((tmp_path / "run").glob(".results.json*"))  # no temporary left behind


def test_same_seed_same_metrics(make_cfg):
    a, _ = train(make_cfg("student=cnn1d_tiny", "seed=5", run="a"))  # trains and caches the teacher
    b, _ = train(make_cfg("student=cnn1d_tiny", "seed=5", run="b"))  # reuses it: the student must not notice
    c, _ = train(make_cfg("student=cnn1d_tiny", "seed=6", run="c"))
    assert a["teacher"]["reused"] is False and b["teacher"]["reused"] is True
    for protocol in ("best", "last"):
        assert a[protocol] == b[protocol]
    assert a["last"] != c["last"]


def test_digits_with_2d_models(make_cfg):
    results, _ = train(make_cfg("data=digits", "teacher=cnn2d_large", "student=cnn2d_small", "debug=fdr"))
    assert results["status"] == "finished"


def test_csv_logger_gets_named_loss_terms(make_cfg, tmp_path):
    train(make_cfg("logger=csv"))
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in (
        "train/loss",
        "train/loss_ce",
        "train/loss_kd",
        "val/acc",
        "val/acc_best",
        "test/acc",
        "test/agreement",
    ):
        assert name in header


def test_wandb_logs_offline_without_network_or_key(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    assert wandb_mode(None) == "offline"
    train(make_cfg("logger=wandb"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    # the student's run and the teacher's: the store trained the teacher in this run and logged it as its own run
    assert len(runs) == 2 and all(r.stat().st_size > 0 for r in runs)
    assert "WANDB_MODE" not in os.environ  # nothing leaked into later jobs


def test_wandb_mode_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(None) == "offline"
    # credentials but an unreachable server: a fast fallback to offline, not a hang
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert wandb_mode(None) == "offline"


@pytest.mark.slow
def test_default_run_shortened(make_cfg):
    """The default composition (MNIST-1D, CNN teacher, MLP student, KD) end to end, fewer epochs."""
    results, _ = train(make_cfg("trainer.max_epochs=3", "teacher.max_epochs=3", "logger=csv", fast=False))
    assert results["names"]["data"] == "mnist1d" and results["names"]["algorithm"] == "kd"
    assert results["best"]["test/teacher_acc"] > 0.5  # 3 epochs: far above the 0.1 of chance
    assert results["best"]["test/acc"] > 0.2
