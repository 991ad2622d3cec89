"""The loggers a run writes to: W&B without its terminal banners, TensorBoard, and the store teacher's training
logged through the run's loggers (without changing the teacher)."""

import re
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import TINY, subprocess_env
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import open_dict

import kd_lab.run.loggers as loggers
import kd_lab.run.teacher_store as teacher_store
from kd_lab.run.loggers import INIT_TIMEOUT, build_loggers
from kd_lab.run.train import train

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.mark.slow
def test_offline_wandb_run_prints_no_wandb_lines(tmp_path):
    """A whole run with the W&B logger offline, as a user starts it (no WANDB_SILENT): W&B's banner, history,
    summary and sync hint stay out of the terminal; kd-lab's one line says how to sync and view the run.
    W&B still captures the console into the run (output.log), and the teacher gets a W&B run of its own."""
    env = subprocess_env(tmp_path)
    env.pop("WANDB_SILENT", None)  # tests/conftest.py sets it for in-process runs; a user's shell does not
    cmd = [sys.executable, "-m", "kd_lab.run.train", *TINY, "logger=wandb", "trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = ANSI.sub("", proc.stdout + proc.stderr)
    assert proc.returncode == 0, out[-4000:]
    wandb_lines = [line for line in out.splitlines() if line.lstrip().startswith("wandb:")]
    assert wandb_lines == [], "\n".join(wandb_lines)
    (run,) = (tmp_path / "logs" / "runs").iterdir()
    assert f"logs offline: `wandb sync {run}/wandb/offline-run-*` uploads it, `wandb leet {run}/wandb`" in out
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the teacher's, then the student's
    student_id = yaml.safe_load((run / "resume.yaml").read_text())["logger"]["wandb"]["id"]
    assert runs[1].name.endswith(f"-{student_id}") and not runs[0].name.endswith(f"-{student_id}")
    assert "epoch 2/2" in (runs[1] / "files" / "output.log").read_text()  # the console is still captured


def test_wandb_settings_silence_offline_quiet_online_and_user_settings_win(make_cfg, monkeypatch):
    (logger,) = build_loggers(make_cfg("logger=wandb").logger)
    settings = logger._wandb_init["settings"]
    assert type(settings) is dict and settings == {"silent": True}  # a DictConfig would be ignored by wandb.init
    assert "anonymous" not in logger._wandb_init  # Lightning's None made W&B print a deprecation warning

    (logger,) = build_loggers(make_cfg("logger=wandb", "+logger.wandb.settings.silent=false").logger)
    assert logger._wandb_init["settings"] == {"silent": False}

    monkeypatch.setattr(loggers, "wandb_mode", lambda requested: "online")
    monkeypatch.setattr(WandbLogger, "experiment", property(lambda self: None))  # no wandb.init, no server
    (logger,) = build_loggers(make_cfg("logger=wandb").logger)
    assert logger._wandb_init["mode"] == "online"
    assert logger._wandb_init["settings"] == {"quiet": True, "init_timeout": INIT_TIMEOUT}


def _scalar_tags(directory) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_tensorboard_logger_writes_events_for_the_run_and_its_teacher(make_cfg, tmp_path):
    assert set(make_cfg("logger=many").logger) == {"wandb", "csv", "tensorboard"}
    train(make_cfg("logger=tensorboard"))
    run = tmp_path / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert {"train/loss", "val/acc", "test/acc", "test/teacher_acc"} <= _scalar_tags(run / "tensorboard")
    assert list((run / "teacher" / "tensorboard").glob("events.out.tfevents.*"))
    assert {"train/loss", "val/acc", "test/acc"} <= _scalar_tags(run / "teacher" / "tensorboard")
    assert "test/teacher_acc" not in _scalar_tags(run / "teacher" / "tensorboard")  # the teacher's own curve


def test_store_teacher_is_logged_with_the_runs_loggers_and_stays_the_same(make_cfg, tmp_path, monkeypatch):
    """The teacher's training goes to a W&B run of its own (project and group of the run, job_type teacher)
    and to <run dir>/teacher/ for CSV and TensorBoard; its store key and weights are those of a run with no
    logger. A reused teacher is not logged again."""
    built = []

    def recording(*args, **kwargs):
        built.extend(made := loggers.build_teacher_loggers(*args, **kwargs))
        return made

    monkeypatch.setattr(teacher_store, "build_teacher_loggers", recording)
    plain = make_cfg("logger=none", run="plain")
    with open_dict(plain):
        plain.paths.teacher_store = str(tmp_path / "store_plain")
    reference, _ = train(plain)
    assert built == []

    logged, _ = train(make_cfg("logger=many", run="logged"))
    assert logged["teacher"]["reused"] is False and logged["teacher"]["key"] == reference["teacher"]["key"]
    ours = torch.load(f"{logged['teacher']['path']}/teacher.pt", weights_only=True)
    theirs = torch.load(f"{reference['teacher']['path']}/teacher.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert logged["teacher"]["metrics"] == reference["teacher"]["metrics"]

    wandb_logger = next(x for x in built if isinstance(x, WandbLogger))
    run = tmp_path / "logged"
    student = make_cfg("logger=many", run="logged").logger.wandb
    init = wandb_logger._wandb_init
    assert init["name"] == f"teacher-mlp_large-{logged['teacher']['key']}" and init["job_type"] == "teacher"
    assert (init["project"], init["group"], init["dir"]) == (student.project, student.group, str(run))
    assert init["tags"] == ["mlp_large", "fake", "teacher"]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # the teacher's and the student's
    assert {type(x) for x in built} == {WandbLogger, CSVLogger, TensorBoardLogger}
    header = (run / "teacher" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/acc", "test/acc"} <= set(header)
    assert "store_entry" in (run / "teacher" / "csv" / "hparams.yaml").read_text()

    built.clear()
    again, _ = train(make_cfg("logger=many", "seed=1", run="again"))
    assert again["teacher"]["reused"] is True and built == []
    assert not (tmp_path / "again" / "teacher").exists()
    assert len(list((tmp_path / "again" / "wandb").glob("offline-run-*"))) == 1
