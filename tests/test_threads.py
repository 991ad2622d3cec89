"""The run's CPU thread count (``threads`` in conf/train.yaml, kd_lab/run/threads.py): applied at the start of
``train()``, in effect during the fit, recorded in results.json and in the teacher-store key."""

import json
import os
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

from kd_lab.errors import KDLabError
from kd_lab.run.checks.schema import validate_config
from kd_lab.run.teacher_store import teacher_key
from kd_lab.run.threads import apply_threads
from kd_lab.run.train import train

PROBE = "+callbacks.threads_probe._target_=test_threads.ThreadsProbe"


class ThreadsProbe(L.Callback):
    """Records torch's thread count when the fit starts (after Lightning's launcher has set up the run)."""

    seen: ClassVar[list[int]] = []

    def on_train_start(self, trainer, module) -> None:
        ThreadsProbe.seen.append(torch.get_num_threads())


@pytest.fixture(autouse=True)
def restore_threads():
    """Each test leaves the process's thread count and OMP_NUM_THREADS as it found them."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    ThreadsProbe.seen = []
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


def _results(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())


def test_threads_2_is_in_effect_during_the_run_and_recorded(make_cfg):
    cfg = make_cfg("debug=fdr", "threads=2", PROBE)
    train(cfg)
    assert ThreadsProbe.seen == [2]  # the student's fit (the fdr teacher is trained by the store, unprobed)
    results = _results(cfg)
    assert results["threads"] == 2
    assert results["config"]["threads"] == 2


def test_the_default_1_wins_over_a_launcher_cap(make_cfg):
    """joblib's parallel launcher caps a worker at cores // n_jobs through OMP_NUM_THREADS before the job
    starts; the config's count is set after, so a job's numbers do not depend on the launcher."""
    os.environ["OMP_NUM_THREADS"] = "2"
    torch.set_num_threads(2)
    cfg = make_cfg("debug=fdr", PROBE)
    train(cfg)
    assert ThreadsProbe.seen == [1]
    assert _results(cfg)["threads"] == 1


def test_threads_null_keeps_the_count_in_effect(make_cfg):
    torch.set_num_threads(2)
    os.environ["OMP_NUM_THREADS"] = "2"
    cfg = make_cfg("debug=fdr", "threads=null", PROBE)
    train(cfg)
    assert ThreadsProbe.seen == [2]
    assert _results(cfg)["threads"] == 2  # what was in effect, not the config's null


def test_lightning_ddp_launcher_keeps_the_config_count():
    """Lightning's DDP launcher sets torch's threads to cores // ranks unless OMP_NUM_THREADS is set; the
    config's count sets it, so the launcher leaves the count alone (and the ranks inherit it)."""
    os.environ.pop("OMP_NUM_THREADS", None)
    assert apply_threads(1) == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    _set_num_threads_if_needed(num_processes=1)
    assert torch.get_num_threads() == 1


def test_the_teacher_store_key_holds_the_thread_count(make_cfg):
    """A teacher trained with 2 threads has other weights than one trained with 1: another store entry."""
    one = teacher_key(make_cfg())
    assert teacher_key(make_cfg("threads=1")) == one
    assert teacher_key(make_cfg("threads=2")) != one
    assert teacher_key(make_cfg("threads=null")) != one


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "threads=0 is out of range: it must be >= 1"),
        ("many", "threads='many' has the wrong type"),
    ],
)
def test_a_bad_thread_count_is_refused_before_compute(make_cfg, value, message):
    with pytest.raises(KDLabError, match=message):
        validate_config(make_cfg(f"threads={value}"))
