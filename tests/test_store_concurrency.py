"""The teacher store under kills and concurrency: a teacher training killed half-way leaves nothing a later
run trusts; two runs that need the same uncached teacher at once train it once; a run whose teacher training
fails still records itself as failed."""

import json
import signal
import time
from pathlib import Path

import lightning as L
import pytest
from helpers import finish, start

import kd_lab.run.teacher_store
from kd_lab.run.train import train

FAST = ["data=fake", "teacher=mlp_large", "student=mlp_small", "trainer.max_epochs=2", "trainer.accelerator=cpu"]
TRAINING, REUSING = "No cached teacher mlp_large", "Reusing cached teacher mlp_large"


def store_contents(root: Path) -> list[str]:
    """The teacher entries and locks (``views/`` holds the teacher view store's files)."""
    return sorted(p.name for p in (root / "teachers").iterdir() if p.name != "views")


@pytest.mark.slow
def test_a_killed_teacher_training_is_retrained_not_trusted(tmp_path):
    run = [*FAST, "teacher.max_epochs=60", "logger=none"]
    proc = start(tmp_path, *run)
    deadline = time.monotonic() + 180
    staged = []
    while time.monotonic() < deadline and proc.poll() is None and not staged:
        staged = list((tmp_path / "teachers").glob(".mlp_large-*.tmp/metrics.csv"))  # an epoch is logged
        time.sleep(0.1)
    assert proc.poll() is None, "the teacher finished before it could be killed: give it more epochs"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (staging,) = (tmp_path / "teachers").glob(".mlp_large-*.tmp")
    entry = staging.name[1 : -len(".tmp")]
    assert store_contents(tmp_path) == [staging.name, f"{entry}.lock"]  # no entry a later run could trust

    out = finish(start(tmp_path, *run))
    assert TRAINING in out and REUSING not in out
    assert store_contents(tmp_path) == [entry, f"{entry}.lock"]  # the staging dir became the entry
    meta = json.loads((tmp_path / "teachers" / entry / "meta.json").read_text())
    assert meta["config"]["max_epochs"] == 60 and (tmp_path / "teachers" / entry / "teacher.pt").is_file()


@pytest.mark.slow
def test_two_runs_needing_one_uncached_teacher_train_it_once(tmp_path):
    """A parallel sweep: the file lock makes the second run wait for the first one's entry, then reuse it."""
    procs = [start(tmp_path, *FAST, "teacher.max_epochs=3", "logger=none", f"seed={seed}") for seed in (0, 1)]
    outs = [finish(p) for p in procs]
    assert sum(TRAINING in out for out in outs) == 1 and sum(REUSING in out for out in outs) == 1
    (entry,) = [name for name in store_contents(tmp_path) if not name.endswith(".lock")]
    assert (tmp_path / "teachers" / entry / "meta.json").is_file()
    results = [json.loads(p.read_text()) for p in (tmp_path / "logs" / "runs").glob("*/results.json")]
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert {r["teacher"]["path"] for r in results} == {str(tmp_path / "teachers" / entry)}
    assert len({r["best"]["test/teacher_acc"] for r in results}) == 1  # both were taught by the same weights


class FailAt(L.Callback):
    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("teacher training failed at epoch 1")


def test_a_run_whose_teacher_training_fails_is_recorded_as_failed(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(kd_lab.run.teacher_store, "EpochSummary", lambda every: FailAt())
    with pytest.raises(RuntimeError, match="teacher training failed"):
        train(make_cfg("teacher.max_epochs=3", run="a"))
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["status"] == "failed" and "teacher training failed at epoch 1" in results["error"]
    assert not list((tmp_path / "teachers").glob("mlp_large-*/meta.json"))  # nothing a later run trusts

    monkeypatch.undo()
    results, _ = train(make_cfg("teacher.max_epochs=3", run="b"))
    assert results["status"] == "finished" and results["teacher"]["reused"] is False
    assert len(list((tmp_path / "teachers").glob("mlp_large-*/meta.json"))) == 1
    assert not list((tmp_path / "teachers").glob(".*.tmp"))
