"""What can go wrong with the files of a store entry or a run, and what kd-lab does about it: the store key
follows the world size; an incomplete entry is retrained and replaced, a damaged one named with its fix; a
read-only store is read; a run that takes no optimizer step fails; a finished run is not resumed; a run is
resumed by one process at a time; a checkpoint is never truncated under its final name."""

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import lightning.fabric.plugins.io.torch_io as torch_io
import pytest
import torch
from helpers import run_kd_lab
from omegaconf import open_dict

from kd_lab.errors import KDLabError
from kd_lab.run.builders import build_model
from kd_lab.run.checkpoints import load_weights
from kd_lab.run.resume import RUN_LOCK, record_start, start_or_resume
from kd_lab.run.teacher_store import teacher_key, world_size
from kd_lab.run.train import train


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only: by its permissions for a user; for root, whom permissions do not stop, by a read-only
    bind mount of it onto itself (skipped where root may not mount)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode:
        pytest.skip("root without permission to mount: no way to make a directory read-only here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", path, path], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", path], check=True)


def entries(store: Path) -> list[str]:
    """The store's teacher entries (not their locks, nor ``views/``: the teacher view store's files)."""
    return sorted(p.name for p in store.iterdir() if not p.name.endswith(".lock") and p.name != "views")


# -- the store key ------------------------------------------------------------------------------------------
def test_the_store_key_follows_the_world_size_and_the_effective_batch(make_cfg):
    """2 DDP ranks train on twice the batch of one process: another teacher, so another key."""
    one = teacher_key(make_cfg())
    assert teacher_key(make_cfg()) == one  # the same config, the same key
    assert teacher_key(make_cfg("trainer=cpu")) == one  # where it runs is not what it learns
    assert teacher_key(make_cfg("trainer=ddp_cpu")) != one
    assert teacher_key(make_cfg("trainer=ddp_cpu", "data.batch_size=16")) != one  # same effective batch, 2 ranks
    assert teacher_key(make_cfg("+trainer.accumulate_grad_batches=2")) != one
    assert teacher_key(make_cfg("+trainer.num_nodes=2")) != one
    assert teacher_key(make_cfg("trainer=ddp_cpu")) == teacher_key(make_cfg("trainer=ddp_cpu"))
    trainer = make_cfg().trainer
    with open_dict(trainer):
        for devices, expected in ((2, 2), ("3", 3), ([0, 1], 2), ("0,1", 2), ("auto", 1)):
            trainer.devices, trainer.accelerator = devices, "cpu"
            assert world_size(trainer) == expected, devices
        trainer.num_nodes = 2
        assert world_size(trainer) == 2


def test_one_key_one_teacher_whichever_run_trains_it(make_cfg, tmp_path):
    """Runs of seeds 0 and 1 share a teacher key; the teacher's initial weights used to come from the run's
    seed, so the store held whichever teacher the first of them trained (found by tests/test_fault_injection)."""
    weights = []
    for seed in (0, 1):
        cfg = make_cfg(f"seed={seed}", run=f"s{seed}")
        cfg.paths.teacher_store = str(tmp_path / f"store{seed}")
        results, _ = train(cfg)
        weights.append(torch.load(Path(results["teacher"]["path"]) / "teacher.pt"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# -- checkpoints of the model's own architecture with keys lost ---------------------------------------------
def test_a_state_dict_with_keys_missing_is_incomplete_not_another_architecture(make_cfg, tmp_path):
    model = build_model(make_cfg().teacher.model)
    state = model.state_dict()
    cut = dict(list(state.items())[:-2])  # the same architecture, two keys lost
    torch.save(cut, tmp_path / "cut.pt")
    with pytest.raises(KDLabError) as err:
        load_weights(model, tmp_path / "cut.pt")
    message = str(err.value)
    assert f"it has {len(cut)} of its {len(state)} keys, all with the right shapes, but lacks" in message
    assert "incomplete or damaged" in message and "another architecture:" not in message
    assert "set teacher.ckpt_path=null" in message  # not a store entry: re-create it or train the teacher

    wider = build_model(make_cfg("teacher.model.num_classes=7").teacher.model)  # a real mismatch: the head
    torch.save(wider.state_dict(), tmp_path / "wider.pt")
    with pytest.raises(KDLabError, match=r"shape mismatches .* It was saved from another architecture"):
        load_weights(model, tmp_path / "wider.pt")
    other = build_model(make_cfg("teacher=cnn1d_large").teacher.model)
    with pytest.raises(KDLabError, match="It was saved from another architecture"):
        load_weights(other, tmp_path / "cut.pt")


# -- store damage -------------------------------------------------------------------------------------------
def test_an_entry_without_meta_json_is_retrained_once_and_replaced(make_cfg, tmp_path, caplog):
    first, _ = train(make_cfg(run="a"))
    entry = Path(first["teacher"]["path"])
    (entry / "meta.json").unlink()  # a copy or hand edit left it incomplete
    with caplog.at_level(logging.WARNING, logger="kd_lab.run.teacher_store"):
        second, _ = train(make_cfg(run="b"))
    assert f"Teacher-store entry {entry} is incomplete (no meta.json): training it again to replace it" in caplog.text
    assert second["teacher"]["reused"] is False and (entry / "meta.json").is_file()
    assert entries(tmp_path / "teachers") == [entry.name]  # no staging or set-aside directory left
    third, _ = train(make_cfg(run="c"))
    assert third["teacher"]["reused"] is True  # repaired: trained once, not on every run
    assert third["best"]["test/teacher_acc"] == first["best"]["test/teacher_acc"]


def test_a_damaged_entry_names_the_file_and_says_to_delete_it(make_cfg, tmp_path):
    first, _ = train(make_cfg(run="a"))
    entry = Path(first["teacher"]["path"])
    meta = (entry / "meta.json").read_bytes()
    (entry / "meta.json").write_bytes(meta[: len(meta) // 2])
    with pytest.raises(KDLabError) as err:
        train(make_cfg(run="b"))
    assert str(err.value).startswith(
        f"teacher-store entry {entry} is damaged: {entry / 'meta.json'} cannot be read (JSONDecodeError: "
    )
    assert str(err.value).endswith(f"; delete the entry (rm -r {entry}) and the next run trains it again.")

    (entry / "meta.json").write_bytes(meta)
    (entry / "teacher.pt").unlink()
    with pytest.raises(KDLabError) as err:
        train(make_cfg(run="c"))
    assert str(err.value) == (
        f"teacher-store entry {entry} is damaged: it has a meta.json but no teacher.pt; delete the entry "
        f"(rm -r {entry}) and the next run trains it again."
    )
    assert "ckpt_path=null" not in str(err.value)  # it is null already


def test_a_read_only_store_is_read_and_says_why_it_cannot_train(make_cfg, tmp_path):
    train(make_cfg(run="a"))
    store = tmp_path / "teachers"
    with read_only(store):
        reused, _ = train(make_cfg(run="b"))  # a complete entry needs no lock
        assert reused["status"] == "finished" and reused["teacher"]["reused"] is True
        with pytest.raises(KDLabError) as err:
            train(make_cfg("teacher.max_epochs=3", run="c"))  # another key: it would have to be trained
    message = str(err.value)
    assert message.startswith(f"teacher store {store} cannot be written (")  # EROFS for root, EACCES for a user
    assert "Read-only file system" in message or "Permission denied" in message
    assert "make the store writable, or point paths.teacher_store at a writable directory" in message
    assert json.loads((tmp_path / "c" / "results.json").read_text())["status"] == "failed"


# -- zero optimizer steps -----------------------------------------------------------------------------------
def test_a_teacher_or_a_run_without_an_optimizer_step_is_an_error_never_an_entry(make_cfg, tmp_path):
    huge = "data.batch_size=100000"  # more than the 192 training samples: no full batch, no step
    with pytest.raises(KDLabError) as err:
        train(make_cfg(huge, run="a"))
    assert str(err.value) == (
        "teacher mlp_large took no optimizer step (nothing was cached): data.batch_size=100000 is larger than "
        "the 192 training samples, and a training epoch uses full batches only; set data.batch_size to at most 192."
    )
    assert not (tmp_path / "teachers").exists() or entries(tmp_path / "teachers") == []  # no entry, no staging
    assert json.loads((tmp_path / "a" / "results.json").read_text())["status"] == "failed"

    first, _ = train(make_cfg(run="b"))
    teacher = f"teacher.ckpt_path={first['teacher']['path']}/teacher.pt"
    with pytest.raises(KDLabError, match=r"^the run took no optimizer step \(nothing was learned\): data.batch_"):
        train(make_cfg(huge, teacher, run="c"))
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["status"] == "failed" and "took no optimizer step" in results["error"]


# -- resume ---------------------------------------------------------------------------------------------------
def resume_of(cfg):
    resumed = cfg.copy()
    with open_dict(resumed):
        resumed.resume = cfg.paths.output_dir
    return resumed


def test_a_finished_run_is_not_resumed_and_keeps_its_results(make_cfg, tmp_path):
    cfg = make_cfg()
    record_start(cfg)
    train(cfg)
    recorded = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(KDLabError) as err:
        start_or_resume(resume_of(cfg), [f"resume={tmp_path / 'run'}"])
    assert str(err.value) == (
        f"resume={tmp_path / 'run'}: the run finished; its results are in {tmp_path / 'run' / 'results.json'}, and "
        "a resume would overwrite them. There is nothing to continue: start a new run instead (kd-lab <the "
        "original overrides>)."
    )
    assert (tmp_path / "run" / "results.json").read_bytes() == recorded


def test_a_run_is_resumed_by_one_process_at_a_time(make_cfg, tmp_path):
    cfg = make_cfg()
    record_start(cfg)
    run = tmp_path / "run"
    with open(run / RUN_LOCK, "a") as held:  # another process running this run holds its lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(KDLabError) as err:
            start_or_resume(resume_of(cfg), [f"resume={run}"])
        assert str(err.value) == (
            f"resume={run}: another kd-lab process is running this run now (it holds {run / RUN_LOCK}); wait for "
            "it to end, or stop it, and resume then."
        )
        with pytest.raises(KDLabError, match=f"run directory {run} is in use by another kd-lab process"):
            start_or_resume(cfg)  # a fresh run into its directory: refused too
        fcntl.flock(held, fcntl.LOCK_UN)
    with pytest.raises(KDLabError, match="no checkpoint in it"):  # the lock is free: on to the checkpoint
        start_or_resume(resume_of(cfg), [f"resume={run}"])


def test_a_read_only_run_is_not_resumed(make_cfg, tmp_path):
    cfg = make_cfg()
    record_start(cfg)
    run = tmp_path / "run"
    with read_only(run), pytest.raises(KDLabError) as err:
        start_or_resume(resume_of(cfg), [f"resume={run}"])
    assert str(err.value) == (
        f"resume={run}: the run directory cannot be written (a read-only copy or mount?), and a resume writes "
        "its checkpoints, logs and results.json there: make it writable, or resume a writable copy."
    )


@pytest.mark.slow
def test_a_refused_resume_leaves_nothing_behind(make_cfg, tmp_path):
    """``kd-lab resume=<no such dir>`` (Hydra makes the directory before kd-lab runs) and ``resume=<a finished
    run>``: the error, and no directory or Hydra files left by the resume."""
    nowhere = tmp_path / "nowhere"
    proc = run_kd_lab(tmp_path, f"resume={nowhere}", check=False)
    assert proc.returncode != 0 and f"resume={nowhere}: no such run directory." in proc.stderr, proc.stderr[-2000:]
    assert not nowhere.exists()

    cfg = make_cfg()
    record_start(cfg)
    train(cfg)
    run = tmp_path / "run"
    before = sorted(p.name for p in run.iterdir())
    recorded = (run / "results.json").read_bytes()
    proc = run_kd_lab(tmp_path, f"resume={run}", check=False)
    assert proc.returncode != 0 and f"resume={run}: the run finished; its results are in" in proc.stderr
    assert (run / "results.json").read_bytes() == recorded
    assert sorted(p.name for p in run.iterdir() if p.name != "train.log") == before  # no .hydra-resume-<time>


# -- checkpoints on a full disk -------------------------------------------------------------------------------
def test_a_failed_checkpoint_write_is_reported_and_truncates_nothing(make_cfg, tmp_path, monkeypatch):
    """The third checkpoint write runs out of space half-way (as on a full disk): the run fails with the file
    and the cause, the file keeps its previous version, no temporary file is left, results.json is written."""
    real, calls = torch_io._atomic_save, []

    def disk_fills(checkpoint, path) -> None:
        calls.append(path)
        if len(calls) < 3:
            return real(checkpoint, path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch_io, "_atomic_save", disk_fills)
    with pytest.raises(KDLabError) as err:
        train(make_cfg())
    checkpoints = tmp_path / "run" / "checkpoints"
    failed = checkpoints / Path(calls[-1]).name.removeprefix(".").removesuffix(".tmp")
    assert str(err.value).startswith(
        f"checkpoint {failed} could not be written (OSError: [Errno 28] No space left on device); its previous "
        "version is kept. Free space on that disk"
    )
    assert torch.load(failed, weights_only=False)["epoch"] == 0  # whole: epoch 0's
    assert not list(checkpoints.glob(".*"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "could not be written" in results["error"]


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root with permission to mount; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", disk]).returncode:
        pytest.skip("no permission to mount a tmpfs")
    try:
        yield disk
    finally:
        subprocess.run(["umount", disk], check=True)


def test_a_full_disk_leaves_no_truncated_checkpoint_and_records_the_failure(make_cfg, small_disk):
    cfg = make_cfg("student.model.hidden=[512]")  # a checkpoint of ~300 KiB, a results.json of ~20 KiB
    with open_dict(cfg):
        cfg.paths.output_dir = str(small_disk / "run")
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - 96 * 1024))  # room for results.json, not a checkpoint
    with pytest.raises(KDLabError, match=r"could not be written \(OSError: \[Errno 28\] No space left on device"):
        train(cfg)
    run = small_disk / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []  # nothing truncated, no temporary file
    assert json.loads((run / "results.json").read_text())["status"] == "failed"
