"""The `kd-lab` command: help, config printing, DDP and multirun. Subprocesses (slow: ~5 s each to start)."""

import json

import pytest
from helpers import TINY, run_kd_lab


def test_help_lists_the_config_groups(tmp_path):
    out = run_kd_lab(tmp_path, "--help").stdout
    for group in ("data", "teacher", "student", "algorithm", "scheme", "optim", "trainer", "logger", "callbacks",
                  "paths", "experiment", "debug"):  # fmt: skip
        assert f"\n{group}: " in out, group
    assert "hydra: default" in out and "kd-lab -m algorithm=none,kd seed=0,1,2" in out


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
    results = [json.loads((job / "results.json").read_text()) for job in sweep.iterdir() if job.is_dir()]
    statuses = {r["config"]["student"]["model"]["num_classes"]: r["status"] for r in results}
    assert statuses == {7: "failed", 10: "finished"}


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
