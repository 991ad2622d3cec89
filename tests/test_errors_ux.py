"""How a run and a sweep end for the user and for a scheduler (kd_lab/run/outcome.py): a KDLabError is one
message and exit status 1 (the traceback in results.json and under HYDRA_FULL_ERROR=1); a sweep with failed jobs
says which and exits 1; SIGINT / SIGTERM record ``status: interrupted`` with the resume command and exit 130 / 143."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import TINY, run_kd_lab, start
from hydra.errors import InstantiationException

from kd_lab.errors import KDLabError
from kd_lab.run import outcome
from kd_lab.run.outcome import Interrupted, interrupt_handlers, interruption, sweep_report, user_error
from kd_lab.run.resume import resume_checkpoint

SENTENCE = "algorithm.temperature=-1 is out of range: it must be > 0 and finite; set e.g. algorithm.temperature=1.0."


def the_run(root: Path) -> Path:
    (run,) = (root / "logs" / "runs").iterdir()
    return run


@pytest.mark.slow
def test_a_kdlab_error_is_one_message_and_exit_status_1(tmp_path):
    """A mistake found before any compute: one message, exit status 1, and no run directory left behind (it
    used to leave a failed run in logs/runs for every typo)."""
    proc = run_kd_lab(tmp_path, *TINY, "logger=none", "algorithm.temperature=-1", check=False)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert proc.stderr.splitlines() == [
        f"kd-lab: {SENTENCE}",
        "(found before any compute, so no run directory was kept; HYDRA_FULL_ERROR=1 prints the traceback here)",
    ]
    assert len(out.strip().splitlines()) <= 4, out
    assert list((tmp_path / "logs" / "runs").iterdir()) == []


@pytest.mark.slow
def test_a_failure_after_compute_keeps_its_run_and_says_where(tmp_path):
    """The teacher's training diverged: that run spent compute, so its directory stays, with the record."""
    proc = run_kd_lab(tmp_path, *TINY, "logger=none", "teacher.optim.optimizer.lr=1e30", check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = the_run(tmp_path) / "results.json"
    recorded = json.loads(results.read_text())
    assert recorded["status"] == "failed" and recorded["stage"] == "teacher", recorded.get("error")
    assert "non-finite loss while training the teacher" in recorded["error"]
    assert f"(recorded as failed in {results}, with the traceback;" in proc.stderr


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    proc = run_kd_lab(tmp_path, *TINY, "logger=none", "algorithm.temperature=-1", check=False)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and SENTENCE in proc.stderr


def test_a_kdlab_error_wrapped_by_hydra_is_found(tmp_path, capsys):
    try:
        try:
            raise KDLabError("student.model.hidden=[] is empty; set e.g. student.model.hidden=[64].")
        except KDLabError as inner:
            raise InstantiationException("Error in call to target 'kd_lab.models.MLP':\nKDLabError(...)") from inner
    except InstantiationException as e:
        wrapped = e
    assert str(user_error(wrapped)).startswith("student.model.hidden=[] is empty")
    assert user_error(ValueError("a bug")) is None
    with pytest.raises(SystemExit) as stop:
        outcome.exit_on_user_error(wrapped, tmp_path)
    assert stop.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "kd-lab: student.model.hidden=[] is empty; set e.g. student.model.hidden=[64].",
        "(HYDRA_FULL_ERROR=1 prints the traceback here)",  # nothing recorded in tmp_path
    ]
    outcome.exit_on_user_error(ValueError("a bug"), tmp_path)  # returns: the caller re-raises, traceback shown


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_a_sweep_with_a_failed_job_says_which_and_exits_1(tmp_path, launcher):
    """Both launchers (basic: the jobs in this process; joblib: in worker processes) end with the report from
    results.json files, and exit status 1. Before SweepReport the sweep exited 0."""
    args = ["-m", f"hydra/launcher={launcher}", *TINY, "logger=none", "debug=fdr", "algorithm.temperature=-1,4"]
    proc = run_kd_lab(tmp_path, *args, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    # the job that failed before any compute left no directory, only its record (for this report)
    assert not list(sweep.glob("0_*"))
    (record,), (finished,) = (sweep / outcome.RECORDS_DIR).glob("0_*.json"), sweep.glob("1_*")
    assert json.loads(record.read_text())["status"] == "failed"
    assert json.loads((finished / "results.json").read_text())["status"] == "finished"
    failed = sweep / record.stem  # names cut by kd_short_name: TINY is long
    report = proc.stderr[proc.stderr.index("kd-lab: 1 of 2 jobs finished") :].splitlines()
    assert report == [
        "kd-lab: 1 of 2 jobs finished; failed:",
        f"  {failed}: failed: KDLabError: {SENTENCE} (found before any compute: nothing ran, and the job's "
        "directory was removed)",
    ]
    assert "Traceback" not in proc.stderr
    # the table of the sweep (kd-lab-compare's, Markdown into a pipe) and the command that prints it again
    assert "| kd |" in proc.stdout and f"kd-lab: print this table again with: kd-lab-compare {sweep}" in proc.stderr


def test_the_sweep_report_lists_jobs_without_results(tmp_path):
    (tmp_path / "0_seed=0").mkdir()
    jobs = [
        (tmp_path / "0_seed=0", {"status": "finished"}),
        (tmp_path / "1_seed=1", {"status": "interrupted", "error": "interrupted by SIGTERM\nmore"}),
        (tmp_path / "2_seed=2", None),
    ]
    assert sweep_report(jobs[:1]) == ("1 of 1 jobs finished", False)
    text, failed = sweep_report(jobs)
    assert failed and text.splitlines() == [
        "1 of 3 jobs finished; failed:",
        f"  {tmp_path / '1_seed=1'}: interrupted: interrupted by SIGTERM",
        f"  {tmp_path / '2_seed=2'}: no results.json (the job stopped before kd-lab could record it; see its "
        "train.log)",
    ]


def test_sigterm_outside_a_fit_stops_the_run_and_within_one_lets_lightning_stop_it():
    previous = signal.getsignal(signal.SIGTERM)
    with interrupt_handlers():
        with pytest.raises(Interrupted) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert interruption(stop.value) == signal.SIGTERM
        # inside a fit Lightning's handler calls ours: we only note the signal, Lightning stops at the batch end
        ours = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: ours(signum, frame))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert interruption(SystemExit(0)) == signal.SIGTERM  # what was received decides, not the exception type
    assert signal.getsignal(signal.SIGTERM) is previous
    assert interruption(SystemExit(0)) is None  # nothing received any more


def wait_for(predicate, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the signal: give it more epochs"
    assert predicate(), "timed out"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_training_is_recorded_as_interrupted_with_the_resume_command(tmp_path, signum, status):
    """SIGTERM used to end the process with status 0 (Lightning's SIGTERMException is a SystemExit) while
    results.json said failed; SIGINT with 1 and "SystemExit: 1"."""
    proc = start(tmp_path, *TINY, "trainer.max_epochs=2000", "logger=csv")
    wait_for(lambda: list(tmp_path.glob("logs/runs/*/checkpoints/last.ckpt")), proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == status, out[-3000:]
    run = the_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    name = signal.Signals(signum).name
    assert results["status"] == "interrupted" and results["error"] == f"interrupted by {name}"
    assert results["resume"] == f"kd-lab resume={run}"
    assert (
        f"kd-lab: interrupted by {name}; continue with: kd-lab resume={run} (recorded in {run / 'results.json'})" in out
    )
    assert "Traceback" not in out
    assert resume_checkpoint(run) == str(run / "checkpoints" / "last.ckpt")  # what the resume continues from


@pytest.mark.slow
def test_sigterm_during_the_teachers_training_is_an_interruption_with_nothing_to_resume(tmp_path):
    proc = start(tmp_path, *TINY, "teacher.max_epochs=2000", "logger=none")
    wait_for(lambda: list(tmp_path.glob("teachers/mlp_large-*.lock")), proc)  # taken to train the teacher
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]
    assert "No cached teacher mlp_large: training it for 2000 epochs" in out
    results = json.loads((the_run(tmp_path) / "results.json").read_text())
    assert results["status"] == "interrupted" and results["resume"] is None
    assert results["error"].startswith("interrupted by SIGTERM before its first checkpoint: nothing to resume")
    assert not list((tmp_path / "teachers").glob("mlp_large-*/meta.json"))  # no teacher entry from it


def test_a_resume_that_cannot_go_on_is_refused_before_hydra_starts(tmp_path, monkeypatch, capsys):
    """``kd-lab resume=<dir>`` checks the directory before Hydra creates it or opens its log file there (a
    read-only directory would otherwise end in Hydra's "Unable to configure handler 'file'")."""
    import os

    from kd_lab.run import train as train_module

    missing = tmp_path / "nowhere"
    monkeypatch.setattr("sys.argv", ["kd-lab", f"resume={missing}"])
    with pytest.raises(SystemExit) as stop:
        train_module.cli()
    assert stop.value.code == 1 and not missing.exists()
    assert f"kd-lab: resume={missing}: no such run directory." in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "resume.yaml").write_text("{}")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root writes anywhere: a read-only mount, faked
    monkeypatch.setattr("sys.argv", ["kd-lab", f"resume={run}"])
    with pytest.raises(SystemExit):
        train_module.cli()
    assert "the run directory cannot be written" in capsys.readouterr().err
