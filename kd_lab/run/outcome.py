"""How a run or a sweep ends, as a user and a scheduler see it (docs/reliability.md, docs/errors.md).

- A mistake the user can fix (a ``KDLabError``, also inside an error Hydra wraps around it) is one message on
  stderr, plus where ``results.json`` recorded the failure, and exit status 1; the traceback stays in
  ``results.json``, and ``HYDRA_FULL_ERROR=1`` prints it as before.
- A run stopped by SIGINT or SIGTERM is recorded as ``status: interrupted`` with the ``kd-lab resume=<dir>``
  command that continues it, and exits with 130 or 143 (128 + the signal), so a scheduler sees a failure.
  Lightning's own SIGTERM handling (``_SignalConnector``: a flag, then ``SIGTERMException`` -- a ``SystemExit``
  with status 0 -- at the end of the batch) runs during a fit; outside a fit, kd-lab's handler stops the run.
- A mistake found before any compute (a bad key or value, a check, the build: ``results.json`` stage
  ``checks``) leaves no run directory: the directory Hydra created for the run is removed when it holds only
  Hydra's files, the log and kd-lab's own records of the run (``discard_unstarted_run``). In a multirun the
  job's record is kept in ``<sweep dir>/.failed_before_compute/<job>.json``, for the sweep report.
- A multirun prints the ``kd-lab-compare`` table of its directory and the command that prints it again, then
  ``N of M jobs finished; failed: ...`` when all its jobs ran (``SweepReport``, a Hydra callback registered in
  conf/hydra/default.yaml) and exits with status 1 if one failed.
"""

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd_lab.errors import KDLabError

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}

_received: list[int] = []  # the signals received during the current job (set by the handler below)


class Interrupted(BaseException):
    """SIGTERM outside a Lightning fit (data, teacher checks, tests between fits): the run stops where it is.
    A BaseException, as KeyboardInterrupt, so that no ``except Exception`` takes it for an ordinary error."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _handle(signum: int, frame: Any) -> None:
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt  # as Python's own handler; inside a fit Lightning turns it into SystemExit(1)
    if signal.getsignal(signal.SIGTERM) is not _handle:
        return  # called by Lightning's handler (a fit is running): it stops the fit at the end of the batch
    raise Interrupted(signum)


class interrupt_handlers:
    """``with interrupt_handlers(): train(cfg)``: SIGINT and SIGTERM are remembered and stop the run (see the
    module docstring); the previous handlers are restored after. Signals can be set in the main thread only."""

    def __enter__(self) -> "interrupt_handlers":
        _received.clear()
        self.saved: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_STATUS:
                self.saved[signum] = signal.signal(signum, _handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        _received.clear()  # a later train() in this process (a test, the next job) starts with none


def interruption(e: BaseException) -> int | None:
    """The signal that ended the run with ``e``, or None if ``e`` is an ordinary error."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if _received:
        return _received[-1]
    if isinstance(e, Interrupted):
        return e.signum
    if isinstance(e, SIGTERMException):
        return signal.SIGTERM
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt)):
        return signal.SIGINT  # Lightning answers Ctrl-C inside a fit with sys.exit(1)
    return None


def user_error(e: BaseException) -> KDLabError | None:
    """The ``KDLabError`` behind ``e``: ``e`` itself, or the cause of an error Hydra or OmegaConf wrapped
    around it (``InstantiationException``, an interpolation's resolver)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KDLabError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def error_record(e: BaseException) -> str:
    """How results.json records ``e``: the KDLabError behind a wrapper (Hydra's ``InstantiationException`` of a
    model that refused to build), so a sweep's report line shows the reason, not the wrapper."""
    cause = user_error(e) or e
    return f"{type(cause).__name__}: {cause}"


def _recorded(run_dir: str | Path, e: BaseException) -> Path | None:
    """``<run_dir>/results.json`` if it records ``e`` (train() writes it for every failure after it started)."""
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return path if results.get("error") == error_record(e) else None


def exit_on_user_error(e: Exception, run_dir: str | Path, discarded: bool = False) -> None:
    """For a KDLabError (not under ``HYDRA_FULL_ERROR=1``): its message and where it is recorded on stderr,
    then exit status 1. Returns for any other error, which the caller re-raises (a bug: its traceback shows).
    ``discarded``: the run failed before any compute and its directory was removed (``discard_unstarted_run``)."""
    error = user_error(e)
    if error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    print(f"kd-lab: {error}", file=sys.stderr)
    path = _recorded(run_dir, e)
    if discarded:
        where = "found before any compute, so no run directory was kept; "
    else:
        where = f"recorded as failed in {path}, with the traceback; " if path else ""
    print(f"({where}HYDRA_FULL_ERROR=1 prints the traceback here)", file=sys.stderr)
    sys.exit(1)


# What a run directory holds before compute: Hydra's files, the job's log, kd-lab's resume.yaml, run lock and
# results.json. A directory with anything else in it is never removed.
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
KD_LAB_FILES = ("results.json", "resume.yaml", ".kd-lab.lock")
RECORDS_DIR = ".failed_before_compute"  # in a sweep dir: the records of jobs whose directory was removed


def discard_unstarted_run(
    run_dir: str | Path, e: BaseException, before: Callable[[], None] | None = None, log_name: str | None = None
) -> dict[str, Any] | None:
    """Remove the directory Hydra created for a run that failed with the user error ``e`` before any compute
    (its results.json records ``e`` at stage ``checks``); return that record, or None when nothing is removed.
    Only known files are deleted, one by one, then the empty directories: a file of any other name keeps the
    directory and everything in it. ``before``: called first (it releases the run's lock). ``log_name``: the
    job's log file (Hydra's ``<job name>.log``; by default every ``*.log`` directly in the run dir)."""
    run_dir = Path(run_dir)
    path = _recorded(run_dir, e)
    if user_error(e) is None or path is None:
        return None
    try:
        record = json.loads(path.read_text())
        hydra_dir = run_dir / ".hydra"
        files = [p for p in run_dir.iterdir() if p != hydra_dir]
        hydra_files = list(hydra_dir.iterdir()) if hydra_dir.is_dir() else []
    except (OSError, ValueError):
        return None

    def known(p: Path) -> bool:
        log_file = p.name == log_name if log_name else p.suffix == ".log"
        return p.is_file() and not p.is_symlink() and (p.name in KD_LAB_FILES or log_file)

    if record.get("stage") != "checks" or not all(known(p) for p in files):
        return None
    if not all(p.is_file() and p.name in HYDRA_FILES for p in hydra_files):
        return None
    if before is not None:
        before()
    try:
        for p in [*files, *hydra_files]:
            p.unlink(missing_ok=True)
        if hydra_dir.is_dir():
            hydra_dir.rmdir()
        run_dir.rmdir()  # fails, and keeps the directory, if a file appeared meanwhile
    except OSError:
        pass
    return record


def keep_failure_record(sweep_dir: str | Path, run_dir: str | Path, record: dict[str, Any]) -> Path | None:
    """Write the record of a multirun job whose directory ``discard_unstarted_run`` removed to
    ``<sweep dir>/.failed_before_compute/<job dir name>.json``, where ``sweep_jobs`` finds it (the job may have
    run in another process: joblib, submitit). None if it cannot be written (the sweep report then misses it)."""
    path = Path(sweep_dir) / RECORDS_DIR / f"{Path(run_dir).name}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({**record, "directory_removed": str(run_dir)}, indent=1, default=str))
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def exit_on_interrupt(e: BaseException, run_dir: str | Path) -> None:
    """For a run stopped by SIGINT or SIGTERM: how to continue it on stderr, then exit status 128 + signal.
    Returns for anything else."""
    signum = interruption(e)
    if signum is None:
        return
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    if results.get("status") == "interrupted":
        command = results.get("resume")
        then = f"; continue with: {command}" if command else ""
        print(f"kd-lab: {results.get('error')}{then} (recorded in {path})", file=sys.stderr)
    else:
        print(f"kd-lab: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
    sys.exit(EXIT_STATUS.get(signum, 128 + signum))


def one_line(text: str, limit: int = 200) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def sweep_jobs(sweep_dir: Path, since: float = 0.0) -> list[tuple[Path, dict[str, Any] | None]]:
    """``(job dir, its results.json or None)`` for each job of ``sweep_dir`` that ran since ``since`` (a
    directory with a ``.hydra/overrides.yaml`` or a ``results.json`` written since): a sweep dir reused by
    ``hydra.sweep.dir=<dir>`` keeps the jobs of an earlier sweep, which are not this one's."""
    jobs = []
    for record in sorted((Path(sweep_dir) / RECORDS_DIR).glob("*.json")):  # jobs whose directory was removed
        with contextlib.suppress(OSError, ValueError):
            if record.stat().st_mtime >= since and not (Path(sweep_dir) / record.stem).is_dir():
                jobs.append((Path(sweep_dir) / record.stem, json.loads(record.read_text())))
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        markers = [m for m in (job / ".hydra" / "overrides.yaml", job / "results.json") if m.is_file()]
        if not markers or max(m.stat().st_mtime for m in markers) < since:
            continue
        results_file = job / "results.json"
        results = None
        if results_file.is_file() and results_file.stat().st_mtime >= since:
            try:
                results = json.loads(results_file.read_text())
            except ValueError:
                results = {"status": "unreadable", "error": f"{results_file} is not valid JSON"}
        jobs.append((job, results))
    return sorted(jobs, key=lambda job: _job_order(job[0]))


def _job_order(job: Path) -> tuple[int, str]:
    number = job.name.split("_", 1)[0]  # <job number>_<overrides> (conf/hydra/default.yaml)
    return (int(number) if number.isdigit() else sys.maxsize, job.name)


def sweep_report(jobs: list[tuple[Path, dict[str, Any] | None]]) -> tuple[str, bool]:
    """``("N of M jobs finished; failed: ...", any failed)``: one line per job that did not finish."""
    failed = [(job, r) for job, r in jobs if not r or r.get("status") != "finished"]
    head = f"{len(jobs) - len(failed)} of {len(jobs)} jobs finished"
    if not failed:
        return head, False
    lines = [f"{head}; failed:"]
    for job, results in failed:
        if results is None:
            why = "no results.json (the job stopped before kd-lab could record it; see its train.log)"
        else:
            why = f"{results.get('status')}: {one_line(results.get('error', ''))}"
            if results.get("directory_removed"):
                why += " (found before any compute: nothing ran, and the job's directory was removed)"
        lines.append(f"  {job}: {why}")
    return "\n".join(lines), True


def compare_table(sweep_dir: Path) -> str | None:
    """Print the ``kd-lab-compare`` table of ``sweep_dir`` through its public ``main``, in this process (a
    subprocess would pay Python's start again); None when it printed, else why it could not."""
    try:
        from kd_lab.tools import compare

        status = compare.main([str(sweep_dir)])
    except SystemExit as e:  # argparse's exit
        status = e.code
    except Exception as e:
        return f"{type(e).__name__}: {one_line(str(e), 120)}"
    finally:
        sys.stdout.flush()
    return None if status in (0, None) else f"kd-lab-compare exited with status {status}"


class SweepReport(Callback):
    """After a multirun: the ``kd-lab-compare`` table of its directory and the command that prints it again,
    then how many of its jobs finished, the failed ones with their error, and exit status 1 if any failed
    (without it a sweep with failed jobs exited 0). It reads each job's results.json (or the record of a job
    that failed before compute), so it works with any launcher: the jobs of joblib, submitit and DDP ranks
    run in other processes."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times may be rounded to the second

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        jobs = sweep_jobs(sweep_dir, getattr(self, "started", 0.0))
        text, failed = sweep_report(jobs)
        command = f"kd-lab-compare {shlex.quote(str(sweep_dir))}"
        if any(not (results or {}).get("directory_removed") for _, results in jobs):  # a job left a run dir
            why = compare_table(sweep_dir)
            said = f"print this table again with: {command}" if why is None else f"its table: {command} ({why})"
            print(f"kd-lab: {said}", file=sys.stderr, flush=True)
        print(f"kd-lab: {text}", file=sys.stderr, flush=True)
        if failed:
            sys.exit(1)
