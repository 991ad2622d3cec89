"""No two runs share a directory: run and sweep dirs are created by the process that names them
(``kd_lab.unique_dir``), a second one of the same name and second gets ``-2``; a resume keeps its directory."""

import json
import multiprocessing
import pickle
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from helpers import TINY, finish, start
from hydra import compose, initialize_config_dir
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf

from kd_lab import unique_dir
from kd_lab.run.train import CONFIG_DIR

FROZEN = "2026-01-02_03-04-05"


def _claim(args: tuple[str, "multiprocessing.synchronize.Barrier"]) -> str:
    path, barrier = args
    barrier.wait()
    return unique_dir(path)


def test_unique_dir_never_hands_one_directory_to_two_processes(tmp_path):
    base = str(tmp_path / "runs" / f"{FROZEN}_kd")
    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(6, timeout=60)
    with context.Pool(6) as pool:
        dirs = pool.map(_claim, [(base, barrier)] * 6)
    assert sorted(dirs) == sorted([base] + [f"{base}-{n}" for n in range(2, 7)])
    assert all(Path(d).is_dir() for d in dirs)


@pytest.fixture
def frozen_clock():
    """Hydra's resolvers as they were, after ``composed`` froze its clock."""
    yield
    setup_globals()


def composed(tmp_path: Path, *overrides: str):
    """The config of one run, composed with Hydra's ``now`` at one fixed second (as for runs started in the
    same second); Hydra registers its ``now`` when it initializes, so it is replaced after that."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        OmegaConf.register_new_resolver("now", lambda pattern: FROZEN, replace=True, use_cache=True)
        return compose(
            "train", overrides=[f"paths.log_dir={tmp_path / 'logs'}", "run_name=twin", *overrides],
            return_hydra_config=True,
        )  # fmt: skip


def test_two_runs_of_one_name_in_one_second_get_two_directories(tmp_path, frozen_clock):
    first, second = composed(tmp_path), composed(tmp_path)  # two processes: each composes its own config
    runs = tmp_path / "logs" / "runs"
    assert first.hydra.run.dir == str(runs / f"{FROZEN}_twin")
    assert second.hydra.run.dir == str(runs / f"{FROZEN}_twin-2")
    assert first.hydra.run.dir == str(runs / f"{FROZEN}_twin")  # resolved once per config: the same dir again
    # a job sent to a joblib or submitit worker is pickled with the resolved value
    assert pickle.loads(pickle.dumps(first)).hydra.run.dir == first.hydra.run.dir
    assert sorted(p.name for p in runs.iterdir()) == [f"{FROZEN}_twin", f"{FROZEN}_twin-2"]


def test_two_sweeps_in_one_second_get_two_directories(tmp_path, frozen_clock):
    first, second = composed(tmp_path, "experiment_name=grid"), composed(tmp_path, "experiment_name=grid")
    sweeps = tmp_path / "logs" / "multiruns"
    assert (first.hydra.sweep.dir, second.hydra.sweep.dir) == (
        str(sweeps / f"{FROZEN}_grid"),
        str(sweeps / f"{FROZEN}_grid-2"),
    )
    assert pickle.loads(pickle.dumps(first)).hydra.sweep.dir == first.hydra.sweep.dir
    assert not (tmp_path / "logs" / "runs").exists()  # a sweep creates no run dir


def test_a_resume_keeps_its_directory_and_creates_none(tmp_path, frozen_clock):
    run = tmp_path / "elsewhere" / "1_algorithm=kd,seed=1"
    cfg = composed(tmp_path, f"resume='{run}'")
    assert cfg.hydra.run.dir == str(run)
    assert not (tmp_path / "logs").exists() and not run.exists()


@pytest.mark.slow
def test_two_runs_started_together_with_one_name_keep_their_own_results(tmp_path):
    """Two ``kd-lab`` processes at once, the same name, temperatures 2 and 8, CSV logs. The directory each would
    have had is already taken for the next minutes (as by a run started a moment earlier), so both must pick
    another one, and the two race for it when they start in the same second. Before kd_lab.unique_dir both
    wrote into the existing directory (with CSV logs both crashed: "dict contains fields not in fieldnames")."""
    runs = tmp_path / "logs" / "runs"
    now = datetime.now()
    taken = [runs / f"{(now + timedelta(seconds=s)):%Y-%m-%d_%H-%M-%S}_twin" for s in range(-2, 240)]
    for path in taken:
        path.mkdir(parents=True)
    args = [*TINY, "logger=csv", "run_name=twin"]
    started = time.monotonic()
    procs = [start(tmp_path, *args, f"algorithm.temperature={t}") for t in (2, 8)]
    outs = [finish(p) for p in procs]
    assert time.monotonic() - started < 240, "the taken directories must cover the runs' start"

    assert all(not any(path.iterdir()) for path in taken)  # nobody wrote into another run's directory
    dirs = sorted(p for p in runs.iterdir() if any(p.iterdir()))
    assert len(dirs) == 2 and all(d.name.rsplit("-", 1)[1].isdigit() for d in dirs), dirs
    temperatures = {}
    for run in dirs:
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "finished", results.get("error")
        assert results["config"]["paths"]["output_dir"] == str(run)
        assert (run / "csv" / "metrics.csv").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
        temperatures[results["config"]["algorithm"]["temperature"]] = run
    assert sorted(temperatures) == [2, 8]
    for out, t in zip(outs, (2, 8), strict=True):
        assert str(temperatures[t] / "results.json") in out  # each run printed its own results.json
