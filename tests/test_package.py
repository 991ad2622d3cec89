"""kd-lab as a package: the wheel alone carries the code and the Hydra configs (``kd_lab/conf``), and its
``kd-lab`` command runs from an empty directory, away from this checkout.

The wheel is installed with ``--no-deps`` into a fresh venv whose dependencies (torch, Lightning, Hydra, ...)
are borrowed from this venv by a ``.pth`` file: a second full install would download gigabytes, and there is
no network here but PyPI. What is tested is the wheel, so the borrowing must not let this checkout in: a
``.pth`` line only adds a directory to ``sys.path`` (the ``.pth`` files in it, such as the editable install's
finder of this checkout, do not run), it comes after the new venv's own site-packages, and the test asserts
that ``kd_lab`` and its configs are imported from the new venv."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import TINY

REPO = Path(__file__).resolve().parents[1]


def run(*cmd: str | Path, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the sources (the build writes build/ and an .egg-info next to them, and this
    checkout may be edited meanwhile), built offline with this venv's setuptools."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "kd_lab", src / "kd_lab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src)
    (wheel,) = wheels.glob("kd_lab-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv holding only the wheel, with this venv's site-packages appended to its path for dependencies."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--no-compile", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "_borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return venv


@pytest.mark.slow
def test_the_wheel_carries_code_and_configs_and_runs_from_an_empty_directory(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "kd_lab" / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)[:10]
    assert "kd_lab/conf/hydra/help/kd_lab.yaml" in names and "kd_lab/run/train.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "kd-lab = kd_lab.run.train:cli" in zipfile.ZipFile(wheel).read(entry_points).decode()

    venv = fresh_venv(tmp_path, wheel)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KD_LAB_ROOT", "WANDB_SERVICE")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    where = run(venv / "bin" / "python", "-c", "import kd_lab; print(kd_lab.__file__)", cwd=empty, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel's kd_lab, not this checkout

    run(venv / "bin" / "kd-lab", "debug=fdr", "logger=none", *TINY, cwd=empty, env=env)
    (results,) = (empty / "logs" / "runs").glob("*/results.json")  # paths.root_dir defaults to the cwd
    assert json.loads(results.read_text())["status"] == "finished"
    hydra = yaml.safe_load((results.parent / ".hydra" / "hydra.yaml").read_text())["hydra"]
    (main,) = [s["path"] for s in hydra["runtime"]["config_sources"] if s["provider"] == "main"]
    assert Path(main).is_relative_to(venv) and Path(main).name == "conf", main  # the wheel's configs
