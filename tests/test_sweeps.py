"""Sweeps beyond the sequential grid: joblib in parallel, Optuna (stored and resumed), submitit's local
executor (the SLURM launcher's code path), and the W&B sweep file. Subprocesses are slow (~10 s each)."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY, run_kd_lab, subprocess_env
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kd_lab import short_name
from kd_lab.run.outcome import RECORDS_DIR
from kd_lab.run.train import CONFIG_DIR
from kd_lab.tools.compare import find_results, summarize

REPO = Path(__file__).resolve().parents[1]


def job_results(sweep: Path) -> list[dict]:
    jobs = [job for job in sorted(sweep.iterdir()) if job.is_dir() and not job.name.startswith(".")]  # not .submitit
    return [json.loads((job / "results.json").read_text()) for job in jobs]


def the_sweep(tmp_path: Path) -> Path:
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    return sweep


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_processes_and_records_failures(tmp_path):
    """Two jobs on two loky workers at once; the one with a 7-class student fails inside train() and is
    recorded as failed while the other finishes (the sweep goes on)."""
    out = run_kd_lab(
        tmp_path, "-m", "hydra/launcher=parallel", "debug=fdr", *TINY, "student.model.num_classes=7,10", check=False
    )
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    assert out.returncode == 1 and "1 of 2 jobs finished; failed:" in out.stderr
    # the 7-class job failed before any compute: its directory is removed, its record kept for the report
    records = [json.loads(p.read_text()) for p in (the_sweep(tmp_path) / RECORDS_DIR).glob("*.json")]
    runs = job_results(the_sweep(tmp_path)) + records
    assert sorted((r["config"]["student"]["model"]["num_classes"], r["status"]) for r in runs) == [
        (7, "failed"),
        (10, "finished"),
    ]
    assert "KDLabError" in next(r["error"] for r in runs if r["status"] == "failed")


@pytest.mark.slow
def test_the_console_script_runs_a_parallel_sweep(tmp_path):
    """``kd-lab -m ... hydra/launcher=parallel`` through the installed console script: joblib's workers get
    the task function by value there (``python -m`` runs the module as ``__main__`` instead)."""
    script = Path(sys.executable).with_name("kd-lab")
    env = subprocess_env(tmp_path)
    cmd = [str(script), "-m", "hydra/launcher=parallel", "debug=fdr", *TINY, "seed=0,1"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "2 of 2 jobs finished" in out.stderr
    assert [r["status"] for r in job_results(the_sweep(tmp_path))] == ["finished", "finished"]


# twelve overrides, each 30+ characters as Hydra writes it into override_dirname (floats print short:
# 4.000000 is 4.0, so the length is in the keys and strings); one of them is the sweep's comma list
LONG_OVERRIDES = [
    "experiment_name=kd_lab_sweep_with_many_long_overrides",
    "run_name=kd_mlp_small_from_mlp_large_long_sweep",
    "student.name=mlp_small_student_with_a_long_name",
    "student.model.hidden=[32,32,32]",
    "teacher.model.hidden=[256,256]",
    "teacher.optim.optimizer.lr=0.002",
    "teacher.optim.optimizer.weight_decay=0.0001",
    "teacher.optim.scheduler.warmup_epochs=0",
    "optim.optimizer.weight_decay=0.0001,0.001",  # the sweep: 2 jobs
    "optim.scheduler.warmup_epochs=0",
    "trainer.enable_model_summary=false",
    "perf.teacher_inference_mode=false",
]


def test_short_name_bounds_and_separates_long_names():
    assert short_name("algorithm=kd,seed=1") == "algorithm=kd,seed=1"  # short lists stay readable
    assert short_name("ckpt_path=/a/b.ckpt") == "ckpt_path=_a_b.ckpt"  # one directory level, never nested
    a, b = short_name("x" * 300 + "a"), short_name("x" * 300 + "b")
    assert len(a) == len(b) == 64 and a != b and a.startswith("x" * 55 + "-")


@pytest.mark.slow
def test_a_grid_of_long_overrides_gets_bounded_job_dirs_and_compares_by_config(tmp_path):
    """Hydra's ``<num>_<override_dirname>`` made a 400+ character name here (Errno 36: File name too long);
    kd-lab's job dirs are the number and at most 64 characters, the full overrides stay in .hydra/ and
    kd-lab-compare groups the jobs by their results.json config, not by their directory names."""
    run_kd_lab(tmp_path, "-m", "debug=fdr", *TINY, *LONG_OVERRIDES)
    sweep = the_sweep(tmp_path)
    assert len(sweep.name) <= len("2000-01-01_00-00-00_") + 64
    jobs = sorted(job for job in sweep.iterdir() if job.is_dir())
    assert [job.name.split("_")[0] for job in jobs] == ["0", "1"]
    for job in jobs:
        assert len(job.name) <= 2 + 64, job.name
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert len(",".join(overrides)) > 255  # what the job dir used to be named after
        assert all(len(o) >= 30 for o in overrides if o.split("=")[0] in {x.split("=")[0] for x in LONG_OVERRIDES})
        assert len(overrides) == len(TINY) + len(LONG_OVERRIDES) + 1  # + debug=fdr
    runs = job_results(sweep)
    assert [r["status"] for r in runs] == ["finished", "finished"]
    assert sorted(r["config"]["optim"]["optimizer"]["weight_decay"] for r in runs) == [0.0001, 0.001]

    rows, problems = summarize(find_results([str(sweep)]))
    assert problems == []
    assert sorted((r["student"], r["algorithm"], r["setting"], r["seeds"]) for r in rows) == [
        ("mlp_small_student_with_a_long_name", "kd", "optim.optimizer.weight_decay=0.0001", 1),
        ("mlp_small_student_with_a_long_name", "kd", "optim.optimizer.weight_decay=0.001", 1),
    ]


def optuna_trials(db: Path) -> list[tuple[str, float | None, dict[str, float]]]:
    """(state, value, params) of every trial in the study's SQLite file, read without optuna's API."""
    with sqlite3.connect(db) as con:
        trials = con.execute("SELECT trial_id, state FROM trials ORDER BY trial_id").fetchall()
        out = []
        for trial_id, state in trials:
            value = con.execute("SELECT value FROM trial_values WHERE trial_id=?", (trial_id,)).fetchone()
            params = dict(con.execute("SELECT param_name, param_value FROM trial_params WHERE trial_id=?", (trial_id,)))
            out.append((state, value[0] if value else None, params))
    return out


@pytest.mark.slow
def test_optuna_search_maximizes_val_acc_and_resumes_from_its_storage(tmp_path):
    run_kd_lab(tmp_path, "-m", "hparams_search=kd_optuna", "hydra.sweeper.n_trials=2", *TINY, "logger=none")
    sweep = the_sweep(tmp_path)
    db = sweep / "optuna.db"
    trials = optuna_trials(db)
    assert [t[0] for t in trials] == ["COMPLETE", "COMPLETE"]
    for i, (_, value, params) in enumerate(trials):
        results = json.loads((sweep / f"trial_{i}" / "results.json").read_text())
        algorithm = results["config"]["algorithm"]
        assert {k.split(".")[1]: algorithm[k.split(".")[1]] for k in params} == {
            k.split(".")[1]: pytest.approx(v) for k, v in params.items()
        }
        assert value == pytest.approx(results["best"]["val/acc"])  # validation, never test
        assert set(params) == {"algorithm.temperature", "algorithm.ce_weight", "algorithm.kd_weight"}

    # a second search on the same storage adds to the study (sampler seed changed, or its random start repeats)
    args = ["hydra.sweeper.n_trials=1", f"hydra.sweeper.storage.path={db}", "hydra.sweeper.sampler.seed=1"]
    run_kd_lab(tmp_path, "-m", "hparams_search=kd_optuna", *args, *TINY, "logger=none")
    resumed = optuna_trials(db)
    assert len(resumed) == 3 and resumed[:2] == trials and resumed[2][0] == "COMPLETE"
    assert len(list((tmp_path / "logs" / "multiruns").iterdir())) == 2  # the new trial ran in its own sweep dir


@pytest.mark.slow
def test_submitit_local_executor_runs_each_job_in_its_own_process(tmp_path):
    run_kd_lab(tmp_path, "-m", "hydra/launcher=slurm_local", "debug=fdr", *TINY, "seed=1")
    sweep = the_sweep(tmp_path)
    assert [(r["seed"], r["status"]) for r in job_results(sweep)] == [(1, "finished")]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 1  # it went through submitit


def test_launcher_configs_compose():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        launchers = {"parallel": "JoblibLauncher", "slurm": "SlurmLauncher", "slurm_local": "LocalLauncher"}
        for launcher, target in launchers.items():
            cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith(target)
        overrides = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"]
        slurm = compose("train", overrides=overrides, return_hydra_config=True)
        assert slurm.hydra.launcher.tasks_per_node == 4  # one DDP rank per GPU


def test_wandb_sweep_parameters_are_valid_overrides():
    """Every value the W&B sweep can send is a Hydra override kd-lab composes (W&B passes key=value)."""
    sweep = yaml.safe_load((REPO / "experiments" / "wandb_sweep" / "sweep.yaml").read_text())
    assert sweep["program"] == "kd-lab" and "${args_no_hyphens}" in sweep["command"]
    assert sweep["metric"] == {"name": "val/acc_best", "goal": "maximize"}
    choices = {}
    for key, spec in sweep["parameters"].items():
        if "values" in spec:
            choices[key] = spec["values"]
        elif "value" in spec:
            choices[key] = [spec["value"]]
        else:
            choices[key] = [spec["min"], spec["max"]]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for key, values in choices.items():
            for value in values:
                overrides = [f"{k}={v[0]}" for k, v in choices.items() if k != key] + [f"{key}={value}"]
                cfg = compose("train", overrides=overrides, return_hydra_config=True)
                groups = cfg.hydra.runtime.choices
                assert (groups[key] if key in groups else OmegaConf.select(cfg, key)) == value, key
