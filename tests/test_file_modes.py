"""Files kd-lab writes get the mode a plain open() gives (0666 less the umask), atomic writes included:
tempfile.mkstemp alone made results.json, resume.yaml and the store's files readable by their owner only."""

import os
import stat
from pathlib import Path

import pytest
import torch

import kd_lab.utils.io as io
from kd_lab.run.resume import record_start
from kd_lab.run.train import train

EXPECTED = {0o022: 0o644, 0o077: 0o600, 0o027: 0o640}


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    """The process's umask set to the parameter for the test, restored after."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    io.atomic_write_json({"a": 1}, tmp_path / "a.json")
    io.atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    io.atomic_write_text("text", tmp_path / "t.txt")
    tmp = tmp_path / ".moved.tmp"
    tmp.write_bytes(b"x")
    tmp.chmod(0o600)  # as mkstemp (or fsspec with a umask read earlier) leaves it
    io.move_into_place(tmp, tmp_path / "moved")
    for name in ("a.json", "w.pt", "t.txt", "moved"):
        assert mode(tmp_path / name) == EXPECTED[umask], name


def no_proc(*args, **kwargs):
    raise OSError("no /proc here")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027])
def test_current_umask_read_without_proc(monkeypatch, mask):
    """Where /proc/self/status cannot be read, the umask is read by setting it back, and left as it was."""
    previous = os.umask(mask)
    try:
        assert io.current_umask() == mask
        monkeypatch.setattr(io, "open", no_proc, raising=False)
        assert io.current_umask() == mask
        assert os.umask(mask) == mask  # unchanged
    finally:
        os.umask(previous)


def test_run_files_follow_the_umask(make_cfg, tmp_path, umask):
    """results.json, resume.yaml, the checkpoints and the store entry's teacher.pt and meta.json."""
    cfg = make_cfg("callbacks=default")
    record_start(cfg)
    results, _ = train(cfg)
    run, entry = tmp_path / "run", Path(results["teacher"]["path"])
    written = [run / "results.json", run / "resume.yaml", entry / "teacher.pt", entry / "meta.json"]
    written += [run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"]
    assert {str(p): oct(mode(p)) for p in written} == {str(p): oct(EXPECTED[umask]) for p in written}
