"""A user's project next to kd-lab (docs/extending.md): its own modules through ``_target_`` (on PYTHONPATH),
its own config options through Hydra's search path, with kd-lab's configs untouched."""

import json
import os
from pathlib import Path

import pytest
from helpers import TINY, run_kd_lab

MY_MODELS = '''
from math import prod

from torch import nn


class TinyNet(nn.Module):
    """A user's classifier: kd-lab hands it the data's input shape and class count."""

    def __init__(self, input_shape, num_classes, width=16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.net(x))
'''

MY_MLP = """# conf/student/my_mlp.yaml of the user's project: the shape of kd-lab's conf/student/mlp_small.yaml
name: my_mlp
model:
  _target_: my_models.TinyNet
  input_shape: ${data.input_shape}
  num_classes: ${data.num_classes}
  width: 16
"""


def user_project(root: Path) -> Path:
    """``root/my_models.py`` and ``root/my_conf/student/my_mlp.yaml``; returns ``my_conf``."""
    (root / "my_models.py").write_text(MY_MODELS)
    (root / "my_conf" / "student").mkdir(parents=True)
    (root / "my_conf" / "student" / "my_mlp.yaml").write_text(MY_MLP)
    return root / "my_conf"


def with_pythonpath(root: Path, monkeypatch) -> None:
    """``my_models`` importable in the kd-lab subprocess (helpers.subprocess_env copies os.environ)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))


@pytest.mark.slow
def test_a_student_of_the_users_project_through_the_search_path(tmp_path, monkeypatch):
    my_conf = user_project(tmp_path)
    with_pythonpath(tmp_path, monkeypatch)
    args = [f"hydra.searchpath=[file://{my_conf}]", *TINY, "student=my_mlp", "debug=fdr", "logger=none"]
    run_kd_lab(tmp_path, *args)
    (results,) = (tmp_path / "logs" / "runs").glob("*/results.json")
    results = json.loads(results.read_text())
    assert results["status"] == "finished"
    assert results["names"]["student"] == "my_mlp"
    assert results["config"]["student"]["model"] == {"_target_": "my_models.TinyNet", "input_shape": [1, 40],
                                                     "num_classes": 10, "width": 16}  # fmt: skip
    assert results["params"]["student"] == 40 * 16 + 16 + 16 * 10 + 10


def test_config_dir_flag_adds_the_users_options_too(tmp_path, monkeypatch):
    """``--config-dir`` (``-cd``) is the short form of the same search path entry."""
    my_conf = user_project(tmp_path)
    with_pythonpath(tmp_path, monkeypatch)
    out = run_kd_lab(tmp_path, "--config-dir", str(my_conf), "student=my_mlp", "--cfg", "job").stdout
    assert "_target_: my_models.TinyNet" in out and "name: my_mlp" in out
    assert "_target_: kd_lab.algorithms.KD" in out  # kd-lab's own options are still there
