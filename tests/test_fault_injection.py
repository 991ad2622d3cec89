"""Fault injection: a small sweep of runs started at once as separate processes from one root, sharing one teacher
store, is killed at random moments (seeded: SIGKILL and SIGTERM, during a teacher's training and the students'),
resumed (a run killed before it could be resumed is started again), and ends as if nothing happened: every run
has exactly one finished results.json, equal to its uninterrupted reference; the store holds one complete entry
per key and nothing staged."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_same_results, subprocess_env

SEED = 0  # the driver's draws: which runs are killed, when, with which signal
BASE = [
    "data=fake",
    "teacher=mlp_large",
    "student=mlp_small",
    "teacher.max_epochs=60",  # long enough on a fast CPU that a kill lands inside a teacher's training
    "trainer.max_epochs=30",  # long enough that a kill planned at epoch 1-7 of a resume finds it still running
    "trainer.accelerator=cpu",
    "logger=none",
]
RUNS = [  # two teachers (two store keys), each needed by two runs
    ["seed=0"],
    ["seed=1"],
    ["teacher.seed=1", "seed=0"],
    ["teacher.seed=1", "seed=1", "algorithm.temperature=2"],
]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}


LAUNCHED: list[subprocess.Popen] = []  # killed at the end of the test, should one still run


def launch(root: Path, args: list[str], log: Path) -> subprocess.Popen:
    """``kd-lab <args>`` in its own process under ``root``, its output in ``log`` (no pipe to fill up)."""
    with log.open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kd_lab.run.train", *args],
            cwd=root,
            env=subprocess_env(root),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    LAUNCHED.append(proc)
    return proc


@pytest.fixture
def no_stray_processes():
    yield
    for proc in LAUNCHED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    LAUNCHED.clear()


def fresh_args(root: Path, i: int) -> list[str]:
    return [*BASE, *RUNS[i], f"hydra.run.dir={root / 'runs' / f'r{i}'}"]


def run_dirs(root: Path, i: int) -> list[Path]:
    """Run i's directories: the one it was given, and any a run-dir scheme derived from it."""
    return sorted(p for p in (root / "runs").glob(f"r{i}*") if p.is_dir())


def finished(root: Path, i: int) -> list[dict]:
    out = []
    for d in run_dirs(root, i):
        with_results = d / "results.json"
        if with_results.is_file():
            results = json.loads(with_results.read_text())
            if results["status"] == "finished":
                out.append(results)
    return out


def last_epoch(run: Path) -> int:
    try:
        return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    except Exception:  # not there yet, or being renamed into place
        return -1


def lock_holder(lock: Path) -> int | None:
    """The pid that holds the flock on ``lock`` (from /proc/locks), None when nobody does."""
    try:
        inode = lock.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if "->" not in parts and parts[1] == "FLOCK" and int(parts[5].rsplit(":", 1)[1]) == inode:
            return int(parts[4])
    return None


def wait_all(procs: dict[int, subprocess.Popen], timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        proc.wait(timeout=max(1, deadline - time.monotonic()))


@pytest.mark.slow
def test_a_sweep_killed_at_random_and_resumed_ends_as_if_left_alone(tmp_path, no_stray_processes):
    started = time.monotonic()
    rng = random.Random(SEED)
    reference, faulty = tmp_path / "reference", tmp_path / "faulty"
    for root in (reference, faulty):
        (root / "runs").mkdir(parents=True)

    # the references: the same sweep, left alone (its own store: trained concurrently, under the lock)
    procs = {i: launch(reference, fresh_args(reference, i), reference / f"r{i}.log") for i in range(len(RUNS))}
    wait_all(procs)
    reference_seconds = time.monotonic() - started
    expected = {}
    for i in range(len(RUNS)):
        (expected[i],) = finished(reference, i)

    kills: list[tuple[int, str, str]] = []  # (run, signal, moment)
    resumes = restarts = 0
    store, teacher_signals, seen_locks = faulty / "teachers", ["SIGKILL", "SIGTERM"], []
    # each run's own kills, in order, carried over to its restart or resume until done: one run is killed
    # twice (the second time during its resume), two once at an epoch or a moment, one only by the teachers'
    epoch = lambda: ("epoch", rng.randint(1, 7), rng.choice(list(SIGNALS)))  # noqa: E731
    queues = [
        [epoch(), ("epoch", rng.randint(1, 4), "SIGKILL")],
        [epoch()],
        [("time", rng.uniform(2, 10), "SIGTERM")],
        [],
    ]
    rng.shuffle(queues)
    plans = {i: list(q) for i, q in enumerate(queues)}

    signalled: set[int] = set()  # pids: one kill per process (a SIGTERMed one takes a moment to end)

    def kill(i: int, proc: subprocess.Popen, name: str, moment: str) -> None:
        if proc.poll() is None and proc.pid not in signalled:
            proc.send_signal(SIGNALS[name])
            signalled.add(proc.pid)
            kills.append((i, name, moment))

    def watch(procs: dict[int, subprocess.Popen], resumed_at: dict[int, int], teachers: bool) -> None:
        """Kill as planned until every process has ended: in round 1 (``teachers``) the first store entry
        trained is SIGKILLed, the second SIGTERMed, during its training; each run by its own plan."""
        launched = time.monotonic()
        while any(p.poll() is None for p in procs.values()) and time.monotonic() - launched < 150:
            for lock in sorted(store.glob("*.lock")) if teachers and store.is_dir() else []:
                staging = lock.with_name(f".{lock.name.removesuffix('.lock')}.tmp")
                holder = lock_holder(lock)
                trainer = next((i for i, p in procs.items() if p.pid == holder and p.pid not in signalled), None)
                if lock not in seen_locks and teacher_signals and trainer is not None and staging.is_dir():
                    seen_locks.append(lock)
                    time.sleep(rng.uniform(0, 0.2))  # somewhere in the teacher's epochs
                    moment = "teacher training" if staging.is_dir() else "the end of a teacher's training"
                    kill(trainer, procs[trainer], teacher_signals.pop(0), moment)
            for i, proc in procs.items():
                if proc.poll() is not None or proc.pid in signalled or not plans[i]:
                    continue
                kind, when, name = plans[i][0]
                if kind == "epoch":
                    when = max(when, resumed_at.get(i, -1) + 1)  # an epoch this process trains
                    due, moment = last_epoch(faulty / "runs" / f"r{i}") >= when, f"epoch {when}"
                else:
                    due, moment = time.monotonic() - launched >= when, f"{when:.1f} s after its start"
                if due:
                    kill(i, proc, name, moment + (" of its resume" if i in resumed_at else ""))
                    plans[i].pop(0)
            time.sleep(0.05)
        wait_all(procs)

    # round 1: all at once; then resume what can be resumed and start again what cannot, until all finished
    watch({i: launch(faulty, fresh_args(faulty, i), faulty / f"r{i}.log") for i in range(len(RUNS))}, {}, True)
    for _ in range(5):
        todo = [i for i in range(len(RUNS)) if not finished(faulty, i)]
        if not todo:
            break
        procs, resumed_at = {}, {}
        for i in todo:
            run = faulty / "runs" / f"r{i}"
            if (run / "resume.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file():
                resumed_at[i] = last_epoch(run)
                procs[i] = launch(faulty, [f"resume={run}"], faulty / f"r{i}.log")
                resumes += 1
            else:  # killed before resume.yaml or before its first checkpoint: nothing to continue
                procs[i] = launch(faulty, fresh_args(faulty, i), faulty / f"r{i}.log")
                restarts += 1
        watch(procs, resumed_at, False)

    mismatches = []
    for i in range(len(RUNS)):
        done = finished(faulty, i)
        try:
            assert len(done) == 1, f"run {i}: {len(done)} finished results.json"
            assert_same_results(expected[i], done[0])
        except AssertionError as e:
            mismatches.append((i, str(e)))
    print(
        f"\nfault injection (seed {SEED}): runs {len(RUNS)}, kills {len(kills)} "
        f"({sum(k[1] == 'SIGKILL' for k in kills)} SIGKILL, {sum(k[1] == 'SIGTERM' for k in kills)} SIGTERM, "
        f"{sum(k[2] == 'teacher training' for k in kills)} during a teacher's training), resumes {resumes}, "
        f"restarts {restarts}, mismatches {len(mismatches)}, {time.monotonic() - started:.0f} s "
        f"({reference_seconds:.0f} s of them for the references)"
    )
    for i, name, moment in kills:
        print(f"  killed run {i} with {name} at {moment}")
    logs = {i: (faulty / f"r{i}.log").read_text()[-3000:] for i, _ in mismatches}
    assert not mismatches, (mismatches, logs)
    assert any(moment == "teacher training" for _, _, moment in kills), "no kill hit a teacher's training"
    assert resumes >= 2 and any("of its resume" in moment for _, _, moment in kills), "too few resumes"

    names = sorted(p.name for p in store.iterdir() if not p.name.endswith(".lock") and p.name != "views")
    keys = {r["teacher"]["path"] for r in expected.values()}
    assert len(keys) == 2 and names == sorted(Path(k).name for k in keys)  # one entry per key, nothing staged
    for name in names:
        assert (store / name / "meta.json").is_file() and (store / name / "teacher.pt").is_file()
