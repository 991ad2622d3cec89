"""``kd-lab resume=<run dir>``: a run killed with SIGKILL mid-training and resumed ends with the metrics of
the same run left alone; resume errors name the path and the fix."""

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import assert_same_results, finish, start
from omegaconf import OmegaConf, open_dict

import kd_lab.run.resume
import kd_lab.run.train
from kd_lab.errors import KDLabError
from kd_lab.run.resume import RESUME_FILE, record_start, resume_checkpoint, resume_config, start_or_resume

# CRD: a memory bank (buffers), sampled negatives (the global generator), a projection head; a CNN student
RUN = [
    "data=fake",
    "teacher=mlp_large",
    "teacher.max_epochs=2",
    "student=cnn1d_tiny",
    "algorithm=crd",
    "trainer.max_epochs=30",
    "trainer.accelerator=cpu",
    "logger=many",
]


def run_dir(root: Path) -> Path:
    (path,) = (root / "logs" / "runs").iterdir()
    return path


def checkpoint_epoch(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except Exception:  # missing, or being written right now
        return -1


def kill_mid_training(
    proc: subprocess.Popen, root: Path, epoch: int, run: str = "logs/runs/*", group: bool = False, timeout: float = 180
) -> Path:
    """SIGKILL ``proc`` once the run dir matching ``root / run`` has checkpointed ``epoch``; ``group``: its whole
    process group (a DDP run's ranks, started with ``start(..., new_session=True)``), as a job's kill would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list(root.glob(f"{run}/checkpoints/last.ckpt"))
        if runs and checkpoint_epoch(runs[0]) >= epoch:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: give it more epochs"
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    (path,) = root.glob(run)
    return path


def final_metrics(path: Path) -> dict[str, float]:
    results = json.loads((path / "results.json").read_text())
    assert results["status"] == "finished", results.get("error")
    return {f"{protocol}/{k}": v for protocol in ("best", "last") for k, v in results[protocol].items()}


def csv_epochs(run: Path) -> list[int]:
    """The epochs of the validation rows of ``run``'s CSV log."""
    with (run / "csv" / "metrics.csv").open() as f:
        return [int(r["epoch"]) for r in csv.DictReader(f) if r["val/acc"]]


@pytest.mark.slow
def test_killed_run_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path):
    killed = start(tmp_path / "killed", *RUN)
    alone = start(tmp_path / "alone", *RUN)  # in parallel: each root has its own teacher store
    run = kill_mid_training(killed, tmp_path / "killed", epoch=3)
    assert not (run / "results.json").exists()  # SIGKILL: nothing ran after the kill
    original_hydra = (run / ".hydra" / "config.yaml").read_text()

    out = finish(start(tmp_path / "killed", f"resume={run}"))
    finish(alone)
    assert "Reusing cached teacher" in out  # the resumed run did not retrain its teacher
    resumed, reference = final_metrics(run), final_metrics(run_dir(tmp_path / "alone"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert results["last"]["epoch"] == 30  # epochs counted from 1

    # the same directory, the original's files kept; the loggers continue their runs
    assert (run / ".hydra" / "config.yaml").read_text() == original_hydra
    assert len(list(run.glob(".hydra-resume-*/overrides.yaml"))) == 1
    wandb_id = OmegaConf.load(run / RESUME_FILE).logger.wandb.id
    assert len(list((run / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2  # `wandb sync` appends them
    assert csv_epochs(run) == list(range(30))  # the killed part's rows kept, the re-run epoch not twice


@pytest.mark.slow
def test_a_killed_multirun_job_resumes_to_the_metrics_of_the_sweep_left_alone(tmp_path):
    """``kd-lab -m`` with 2 jobs, killed during job 1 (the process runs the jobs one after the other, so the sweep
    stops there); ``kd-lab resume=<job 1's dir>`` continues that job in its own directory with its own config."""
    sweep = [*(a for a in RUN if not a.startswith("logger=")), "logger=csv", "seed=0,1"]
    killed = start(tmp_path / "killed", "-m", *sweep)
    alone = start(tmp_path / "alone", "-m", *sweep)
    job = kill_mid_training(killed, tmp_path / "killed", epoch=3, run="logs/multiruns/*/1_*")
    assert not (job / "results.json").exists()
    (first,) = job.parent.glob("0_*")
    assert json.loads((first / "results.json").read_text())["status"] == "finished"  # job 0 had finished
    original_hydra = (job / ".hydra" / "config.yaml").read_text()

    # quoted: a job dir's name has = and , (Hydra's override grammar would read them as its own)
    out = finish(start(tmp_path / "killed", f"resume={job}"))  # unquoted: kd-lab quotes it for Hydra
    finish(alone)
    assert "Reusing cached teacher" in out
    (reference,) = (tmp_path / "alone" / "logs" / "multiruns").glob("*/1_*")
    resumed, expected = final_metrics(job), final_metrics(reference)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key
    results = json.loads((job / "results.json").read_text())
    assert results["seed"] == 1 and results["resumed_from"] == str(job / "checkpoints" / "last.ckpt")
    assert results["last"]["epoch"] == 30  # epochs counted from 1
    assert (job / ".hydra" / "config.yaml").read_text() == original_hydra
    assert not list((tmp_path / "killed" / "logs" / "runs").glob("*"))  # no new run dir: the job's own
    assert csv_epochs(job) == list(range(30))


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path):
    """``trainer=ddp_cpu`` (2 processes, gloo): both ranks SIGKILLed mid-training; the resume starts both
    again, every rank restores rank 0's checkpoint (weights, optimizer, CRD's all-gathered banks, generators)."""
    ddp = [a for a in RUN if not a.startswith(("logger=", "trainer.max_epochs="))]
    ddp += ["trainer=ddp_cpu", "trainer.max_epochs=16", "logger=csv"]  # 16: ample after a kill at epoch 3
    killed = start(tmp_path / "killed", *ddp, new_session=True)
    alone = start(tmp_path / "alone", *ddp)
    run = kill_mid_training(killed, tmp_path / "killed", epoch=3, group=True)
    assert not (run / "results.json").exists()

    finish(start(tmp_path / "killed", f"resume={run}"))
    finish(alone)
    resumed, reference = final_metrics(run), final_metrics(run_dir(tmp_path / "alone"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["last"]["epoch"] == 16
    assert results["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert (run / "ddp_rank_1.log").is_file()  # rank 1 of the resume ran in the run's directory
    assert csv_epochs(run) == list(range(16))


def test_resume_errors_name_the_path_and_the_fix(make_cfg, tmp_path):
    with pytest.raises(KDLabError, match="no such run directory"):
        resume_config(tmp_path / "nowhere")
    with pytest.raises(KDLabError, match=f"{RESUME_FILE} is missing.*start a fresh run"):
        resume_config(tmp_path)

    cfg = make_cfg("logger=wandb")
    record_start(cfg)
    run = Path(cfg.paths.output_dir)
    resumed = resume_config(run)
    assert resumed.logger.wandb.id == cfg.logger.wandb.id and resumed.logger.wandb.resume == "allow"
    assert resumed.paths.output_dir == str(run.absolute()) and resumed.resume == str(run.absolute())
    with pytest.raises(KDLabError, match=f"{run}: no checkpoint in it.*start a fresh run"):
        resume_checkpoint(run)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(KDLabError, match=r"last\.ckpt is corrupt or truncated.*start a fresh run"):
        resume_checkpoint(run)
    with open_dict(cfg):
        cfg.resume = str(run)
    with pytest.raises(KDLabError, match=r"also sets \['seed=3'\]: drop them"):
        start_or_resume(cfg, [f"resume={run}", "seed=3"])


def test_a_fresh_run_in_a_recorded_directory_keeps_its_wandb_id(make_cfg):
    """A SLURM job requeued into the same run dir (or a DDP rank > 0) logs to the run already recorded."""
    first = record_start(make_cfg("logger=wandb")).logger.wandb.id
    assert record_start(make_cfg("logger=wandb")).logger.wandb.id == first
    assert record_start(make_cfg("logger=wandb", run="other")).logger.wandb.id != first


class Interrupted(RuntimeError):
    pass


class InterruptAt(L.Callback):
    """Stops a run as a kill would: at the start of ``epoch``, after the previous epoch's checkpoint."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"stopped at epoch {self.epoch}")


def test_adversarial_run_interrupted_and_resumed_in_process_matches(make_cfg, monkeypatch):
    """The discriminator, its optimizer and the student's schedule under manual optimization survive."""
    overrides = ["student=cnn1d_tiny", "algorithm=adversarial", "trainer.max_epochs=5"]
    reference, _ = kd_lab.run.train.train(make_cfg(*overrides, run="alone"))
    cfg = make_cfg(*overrides, run="interrupted")
    build_callbacks = kd_lab.run.train.build_callbacks
    monkeypatch.setattr(kd_lab.run.train, "build_callbacks", lambda c: [*build_callbacks(c), InterruptAt(3)])
    with pytest.raises(Interrupted):
        kd_lab.run.train.train(cfg)
    monkeypatch.setattr(kd_lab.run.train, "build_callbacks", build_callbacks)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 2
    resumed, _ = kd_lab.run.train.train(cfg, str(checkpoint))
    for protocol in ("best", "last"):
        assert resumed[protocol].keys() == reference[protocol].keys()
    assert_same_results(reference, resumed)


def test_a_requeued_slurm_job_continues_from_its_run_dir(make_cfg, monkeypatch):
    """Lightning's SLURM requeue left hpc_ckpt_<n>.ckpt in the run dir: the requeued job (same dir) continues,
    from last.ckpt when there is one (an exact resume), else from the newest hpc checkpoint."""
    cfg = make_cfg("trainer.max_epochs=1")
    kd_lab.run.train.train(cfg)
    run = Path(cfg.paths.output_dir)
    last = run / "checkpoints" / "last.ckpt"
    for n in (1, 2):
        (run / f"hpc_ckpt_{n}.ckpt").write_bytes(last.read_bytes())
    assert start_or_resume(cfg)[1] is None  # not under SLURM: a fresh start
    monkeypatch.setattr(kd_lab.run.resume.SLURMEnvironment, "detect", staticmethod(lambda: True))
    assert start_or_resume(cfg)[1] == str(last.absolute())
    last.unlink()
    assert start_or_resume(cfg)[1] == str((run / "hpc_ckpt_2.ckpt").absolute())
