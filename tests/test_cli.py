"""The `kd-lab` command: help, config printing, DDP and multirun. Subprocesses (slow: ~5 s each to start)."""

import json
import subprocess
import sys

import pytest
from helpers import TINY, run_kd_lab

from kd_lab.run.outcome import RECORDS_DIR


def test_help_lists_the_config_groups(tmp_path):
    out = run_kd_lab(tmp_path, "--help").stdout
    for group in ("data", "teacher", "student", "algorithm", "scheme", "optim", "trainer", "logger", "callbacks",
                  "paths", "experiment", "debug"):  # fmt: skip
        assert f"\n{group}: " in out, group
    assert "hydra: default" in out and "kd-lab -m algorithm=none,kd seed=0,1,2" in out
    data = next(line for line in out.splitlines() if line.startswith("data: "))
    assert "mnist1d" in data and "_serving" not in data  # a shared defaults file is no data set
    assert "kd-lab --cfg job" in out  # how to print the config, instead of printing all of it
    assert "_target_" not in out and len(out.splitlines()) < 60
    assert not (tmp_path / "logs").exists()  # --help creates no run directory


def test_the_cli_module_imports_no_torch_before_hydra_runs():
    """``kd-lab --help`` and ``--cfg job`` took 11-15 s, nearly all of it importing torch, Lightning and
    transformers; the module behind the command imports them only when a run starts."""
    heavy = "('torch', 'lightning', 'transformers')"
    code = f"import sys, kd_lab.run.train; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_deferred_names_are_module_attributes():
    """Tests patch ``kd_lab.run.train.build_callbacks`` and the like: they are attributes, imported on first use."""
    from kd_lab.run import train as train_module
    from kd_lab.run.builders import build_callbacks

    assert train_module.build_callbacks is build_callbacks
    with pytest.raises(AttributeError, match="no_such_name"):
        train_module.no_such_name  # noqa: B018


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = run_kd_lab(tmp_path, "--cfg", "job", "algorithm.temperature=2").stdout
    assert "temperature: 2" in out and "_target_: kd_lab.algorithms.KD" in out and "name: mnist1d" in out


@pytest.mark.slow
def test_each_run_gets_its_own_directory(tmp_path):
    run_kd_lab(tmp_path, *TINY, "logger=none", "seed=0")
    run_kd_lab(tmp_path, *TINY, "logger=none", "seed=1")
    runs = sorted((tmp_path / "logs" / "runs").iterdir())
    assert len(runs) == 2
    assert [json.loads((r / "results.json").read_text())["seed"] for r in runs] == [0, 1]
    assert all((r / ".hydra" / "config.yaml").is_file() for r in runs)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    run_kd_lab(tmp_path, *TINY, "trainer=ddp_cpu", "logger=csv")
    (run,) = (tmp_path / "logs" / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 2
    assert (run / "ddp_rank_1.log").is_file()  # rank 1 ran inside this run's directory


@pytest.mark.slow
def test_multirun_with_ddp_every_rank_trains_the_jobs_config(tmp_path):
    """Lightning's ddp re-runs argv for rank 1; under -m that would be a sweep of its own. kd-lab re-composes
    the job's own config instead, and the module checks that every rank hashed the same config."""
    run_kd_lab(tmp_path, "-m", *TINY, "trainer=ddp_cpu", "logger=none", "seed=0,1", "optim.optimizer.lr=0.01,0.003")
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "finished" and results["world_size"] == 2
        cfg = results["config"]
        overrides = (job / ".hydra" / "overrides.yaml").read_text()  # job dir names may be cut (kd_short_name)
        assert f"seed={cfg['seed']}" in overrides and f"lr={cfg['optim']['optimizer']['lr']}" in overrides
        assert (job / "ddp_rank_1.log").is_file()
        seen.add((cfg["seed"], cfg["optim"]["optimizer"]["lr"]))
    assert seen == {(0, 0.01), (0, 0.003), (1, 0.01), (1, 0.003)}
    assert len(list((tmp_path / "teachers").glob("mlp_large-*/meta.json"))) == 1  # one teacher for the sweep


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    proc = run_kd_lab(tmp_path, "-m", *TINY, "logger=none", "student.model.num_classes=7,10", check=False)
    # the first job cannot build: the sweep goes on, then says so and exits non-zero
    assert proc.returncode == 1 and "1 of 2 jobs finished; failed:" in proc.stderr
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    # it failed before any compute: no job directory, its record kept for the sweep report
    jobs = [job for job in sweep.iterdir() if job.is_dir() and not job.name.startswith(".")]
    results = [json.loads((job / "results.json").read_text()) for job in jobs]
    records = [json.loads(p.read_text()) for p in (sweep / RECORDS_DIR).glob("*.json")]
    statuses = {r["config"]["student"]["model"]["num_classes"]: r["status"] for r in results + records}
    assert statuses == {7: "failed", 10: "finished"} and len(jobs) == 1 and records[0]["stage"] == "checks"


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme",
    [
        ["scheme=online", "algorithm=kd"],
        ["scheme=online", "algorithm=codistillation", "algorithm.peers=3"],
        ["scheme=self", "algorithm=byot", "student=cnn1d_tiny"],
        ["chain=born_again"],
        ["chain=teacher_assistant", "chain.assistants=[mlp_medium]"],
        ["algorithm=adversarial"],  # two optimizers, manual optimization, each backward touching one player
    ],
    ids=["online_kd", "codistillation", "byot", "born_again", "teacher_assistant", "adversarial"],
)
def test_every_scheme_under_ddp(tmp_path, scheme):
    run_kd_lab(tmp_path, *TINY, "trainer=ddp_cpu", "logger=none", *scheme)
    (run,) = (tmp_path / "logs" / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 2
    assert 0.0 <= results["best"]["test/acc"] <= 1.0
