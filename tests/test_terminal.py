"""What a researcher reads in the terminal: the progress bar and the epoch lines, the run summary, the end of a
sweep, and what a mistake found before compute leaves on disk (kd_lab/run/callbacks.py, train.py, outcome.py)."""

import json
import logging
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from kd_lab.errors import KDLabError
from kd_lab.run.builders import build_trainer
from kd_lab.run.callbacks import EpochSummary, ProgressBar
from kd_lab.run.outcome import (
    RECORDS_DIR,
    SweepReport,
    discard_unstarted_run,
    keep_failure_record,
    sweep_jobs,
    sweep_report,
)
from kd_lab.run.train import CONFIG_DIR, ConsoleFilter, summary

log = logging.getLogger("kd_lab.test_terminal")


class Seen(L.Callback):
    """What the bar showed at each epoch's end, and a log line written while it is drawn."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.metrics: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        bar = trainer.progress_bar_callback
        self.labels.append(bar.train_progress_bar.desc)
        self.metrics.append(bar.get_metrics(trainer, module))
        log.warning("a line during the fit")


def fit_with_bar(tmp_path: Path, *callbacks: L.Callback, epochs: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[ProgressBar(), *callbacks],
        logger=CSVLogger(tmp_path, name="csv"),  # a logger gives Lightning's bar its v_num
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel())
    return trainer


@pytest.fixture
def console():
    """A console handler on the root logger, as Hydra installs one (a plain StreamHandler on stdout)."""
    handler = logging.StreamHandler(sys.stdout)
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def test_the_bar_counts_epochs_from_1_of_max_epochs_and_shows_no_v_num(tmp_path):
    seen = Seen()
    fit_with_bar(tmp_path, seen)
    assert [label.split(":")[0] for label in seen.labels] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert all("v_num" not in metrics for metrics in seen.metrics)
    assert "v_num" in TQDMProgressBar.get_metrics(ProgressBar(), *_trainer_and_module(tmp_path))  # Lightning's has


def _trainer_and_module(tmp_path: Path):
    trainer = L.Trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="v"), enable_progress_bar=False)
    return trainer, BoringModel()


def test_log_lines_go_through_the_bar_while_it_is_drawn_and_not_after(tmp_path, console, monkeypatch, caplog):
    """Through tqdm's write, a line clears the bar, prints and draws the bar again: epoch lines no longer
    overwrite it or get overwritten. The console handler is the user's again after the fit."""
    written: list[str] = []
    real_write = Tqdm.write
    monkeypatch.setattr(Tqdm, "write", classmethod(lambda cls, s, **kw: (written.append(s), real_write(s, **kw))))
    root = logging.getLogger()
    caplog.set_level(logging.INFO, logger="kd_lab.run.callbacks")  # EpochSummary's lines are INFO
    fit_with_bar(tmp_path, Seen(), EpochSummary(every=1))
    assert sum("a line during the fit" in line for line in written) == 3
    assert sum("epoch 3/3" in line for line in written) == 1  # EpochSummary's line: the bar's count
    assert console in root.handlers and not any(type(h).__name__ == "_BarLogHandler" for h in root.handlers)
    written.clear()
    log.warning("after the fit")
    assert written == []


def test_the_console_handler_comes_back_after_a_failed_fit(tmp_path, console):
    class Boom(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit_with_bar(tmp_path, Boom())
    assert console in logging.getLogger().handlers


def test_build_trainer_draws_kd_labs_bar_only_when_a_bar_is_drawn():
    spec = OmegaConf.create({"_target_": "lightning.Trainer", "max_epochs": 1, "enable_progress_bar": True})
    bars = [type(c) for c in build_trainer(spec, [], False).callbacks if isinstance(c, TQDMProgressBar)]
    assert bars == [ProgressBar]
    spec.enable_progress_bar = False
    assert build_trainer(spec, [], False).progress_bar_callback is None
    spec.enable_progress_bar = True
    own = TQDMProgressBar()  # a user's own bar (callbacks config) is kept, and no second one added
    assert build_trainer(spec, [own], False).progress_bar_callback is own


def finished_results(**extra) -> dict:
    results = {
        "names": {
            "algorithm": "kd",
            "scheme": "offline",
            "student": "mlp_small",
            "teacher": "mlp_large",
            "data": "fake",
        },
        "seed": 0,
        "config": {"trainer": {"max_epochs": 10}},
        "task": {"headline": "test/acc"},
        "best": {"test/acc": 0.5, "epoch": 8},
        "last": {"test/acc": 0.4, "epoch": 10},
        "teacher": {"name": "mlp_large", "source": "cache", "reused": False},
        "params": {"student": 1000, "teacher": 5000, "compression": 5.0},
        "teacher_seconds": 42.0,
        "student_seconds": 7.5,
        "fit_seconds": 6.25,
        "wall_seconds": 50.0,
    }
    return {**results, **extra}


def test_the_summary_counts_epochs_from_1_and_times_the_teacher_apart(tmp_path):
    lines = summary(finished_results(), tmp_path / "results.json").splitlines()
    assert lines[1] == "  student test acc 0.5000 at best val epoch 8/10 | 0.4000 at last epoch 10/10"
    assert "  time: teacher 42.0s (trained now) | student 7.5s (fit 6.2s) | total 50.0s" in lines
    assert lines[-1] == f"  results: {tmp_path / 'results.json'}"
    reused = {"name": "mlp_large", "source": "cache", "reused": True, "train_seconds": 41.0}
    lines = summary(finished_results(teacher=reused, teacher_seconds=0.1), tmp_path / "results.json").splitlines()
    assert "  time: teacher 0.1s (reused from the store, where it took 41.0s to train) | student 7.5s (fit 6.2s) |" \
           " total 50.0s" in lines  # fmt: skip
    no_teacher = finished_results(teacher={}, params={"student": 1000})
    del no_teacher["teacher_seconds"]
    assert "  time: student 7.5s (fit 6.2s) | total 50.0s" in summary(no_teacher, tmp_path).splitlines()


# -- a mistake found before compute leaves no run -------------------------------------------------------------
ERROR = KDLabError("algorithm.temperature=-1 is out of range")


def a_run_dir(root: Path, stage: str = "checks", error: BaseException = ERROR, *extra: str, name: str = "") -> Path:
    """A run dir as Hydra and train() leave it after a failure at ``stage``, plus the files ``extra``; ``name``:
    a job's directory ``root/<name>`` (else a run's, in ``root/logs/runs``)."""
    run = root / name if name else root / "logs" / "runs" / "2026-01-01_00-00-00_kd"
    (run / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text("{}")
    for name in ("train.log", "resume.yaml", ".kd-lab.lock", *extra):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("")
    record = {"status": "failed", "stage": stage, "error": f"{type(error).__name__}: {error}", "config": {}}
    (run / "results.json").write_text(json.dumps(record))
    return run


def test_a_run_that_failed_at_the_checks_is_removed_and_its_record_returned(tmp_path):
    run = a_run_dir(tmp_path)
    released = []
    record = discard_unstarted_run(run, ERROR, before=lambda: released.append(True), log_name="train.log")
    assert record["stage"] == "checks" and released == [True]
    assert not run.exists() and (tmp_path / "logs" / "runs").is_dir()  # only the run's own directory goes


@pytest.mark.parametrize(
    ("stage", "error", "extra", "log_name"),
    [
        ("teacher", ERROR, (), "train.log"),  # compute was spent (a teacher trained): the run stays
        ("checks", ValueError("a bug"), (), "train.log"),  # not a user's mistake: its traceback matters
        ("checks", ERROR, ("notes.txt",), "train.log"),  # a file kd-lab did not write: nothing is deleted
        ("checks", ERROR, ("checkpoints/last.ckpt",), "train.log"),
        ("checks", ERROR, (), "other.log"),  # train.log is not this job's log
    ],
    ids=["after_compute", "a_bug", "a_users_file", "a_checkpoint", "another_log"],
)
def test_a_run_dir_is_kept_unless_it_holds_only_what_the_failed_checks_wrote(tmp_path, stage, error, extra, log_name):
    run = a_run_dir(tmp_path, stage, error, *extra)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert discard_unstarted_run(run, error, log_name=log_name) is None
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_another_error_than_the_recorded_one_removes_nothing(tmp_path):
    run = a_run_dir(tmp_path)
    assert discard_unstarted_run(run, KDLabError("another mistake")) is None and run.is_dir()


def test_the_sweep_report_lists_a_job_whose_directory_was_removed(tmp_path):
    sweep = tmp_path / "sweep"
    run = a_run_dir(sweep, name="0_seed=0")
    record = discard_unstarted_run(run, ERROR)
    path = keep_failure_record(sweep, run, record)
    assert path == sweep / RECORDS_DIR / f"{run.name}.json"
    (sweep / "1_seed=1").mkdir()
    (sweep / "1_seed=1" / "results.json").write_text(json.dumps({"status": "finished"}))
    jobs = sweep_jobs(sweep)
    assert [job for job, _ in jobs] == [sweep / "0_seed=0", sweep / "1_seed=1"]
    text, failed = sweep_report(jobs)
    assert failed and text.splitlines() == [
        "1 of 2 jobs finished; failed:",
        f"  {sweep / run.name}: failed: KDLabError: {ERROR} (found before any compute: nothing ran, and the job's "
        "directory was removed)",
    ]


def test_sweep_jobs_are_listed_in_job_number_order(tmp_path):
    for name in ("10_seed=10", "2_seed=2", "0_seed=0"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text("[]")
    assert [job.name for job, _ in sweep_jobs(tmp_path)] == ["0_seed=0", "2_seed=2", "10_seed=10"]


# -- the end of a sweep: the table and the command -----------------------------------------------------------
def a_finished_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00_default"
    (sweep / "0_seed=0").mkdir(parents=True)
    (sweep / "0_seed=0" / "results.json").write_text(json.dumps({"status": "finished"}))
    return sweep


def end_of_sweep(sweep: Path) -> None:
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))


def test_a_sweep_ends_with_its_table_and_the_command_that_prints_it_again(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("kd_lab.tools.compare.main", lambda argv: (calls.append(argv), print("TABLE"), 0)[-1])
    sweep = a_finished_sweep(tmp_path)
    end_of_sweep(sweep)
    out, err = capsys.readouterr()
    assert calls == [[str(sweep)]] and out == "TABLE\n"
    assert err.splitlines() == [
        f"kd-lab: print this table again with: kd-lab-compare {sweep}",
        "kd-lab: 1 of 1 jobs finished",
    ]


def test_a_table_that_cannot_be_printed_still_gives_the_command(tmp_path, monkeypatch, capsys):
    def broken(argv):
        raise KeyError("headline")

    monkeypatch.setattr("kd_lab.tools.compare.main", broken)
    sweep = a_finished_sweep(tmp_path)
    end_of_sweep(sweep)
    assert (
        capsys.readouterr().err.splitlines()[0] == f"kd-lab: its table: kd-lab-compare {sweep} (KeyError: 'headline')"
    )


def test_a_sweep_whose_jobs_all_failed_before_compute_prints_no_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kd_lab.tools.compare.main", lambda argv: pytest.fail("nothing to compare"))
    sweep = tmp_path / "sweep"
    run = a_run_dir(sweep, name="0_seed=0")
    keep_failure_record(sweep, run, discard_unstarted_run(run, ERROR))
    with pytest.raises(SystemExit) as stop:
        end_of_sweep(sweep)
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("kd-lab: 0 of 1 jobs finished; failed:")


# -- the console: Lightning's INFO lines in the log file only -------------------------------------------------
def test_lightning_info_lines_stay_off_the_console_and_warnings_do_not():
    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "a line", None, None)

    keep = ConsoleFilter().filter
    assert not keep(record("lightning.pytorch.utilities.rank_zero", logging.INFO))  # "GPU available: False ..."
    assert keep(record("lightning.pytorch.utilities.rank_zero", logging.WARNING))
    assert keep(record("kd_lab.run.callbacks", logging.INFO))  # kd-lab's epoch lines
    assert not keep(record("matplotlib.font_manager", logging.INFO))  # "generated new fontManager"
    assert keep(record("matplotlib.font_manager", logging.WARNING))


def test_the_console_handler_of_a_run_has_the_filter_and_the_log_file_not():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    handlers = cfg.hydra.job_logging.handlers
    assert list(handlers.console.filters) == ["no_lightning_info"] and "filters" not in handlers.file
    assert cfg.hydra.job_logging.filters.no_lightning_info["()"] == "kd_lab.run.train.ConsoleFilter"
