"""Dataset distillation (kd_lab/dataset_distillation): the matching distances against hand-computed values,
their gradients (gradcheck, float64), the loops, a fast end-to-end run and the bad inputs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch import nn

from kd_lab.dataset_distillation import app
from kd_lab.dataset_distillation.app import CONFIG_DIR, SET_FILE, load_set, run
from kd_lab.dataset_distillation.matching import gradient_distance, layer_gradient_distance, mean_embedding_distance
from kd_lab.dataset_distillation.synthesis import (
    embed,
    freeze_norm_statistics,
    gm_loops,
    initial_set,
    synthesize,
)
from kd_lab.errors import KDLabError
from kd_lab.models import MLP, CNN1d

FAST = ["data=fake", "student=mlp_small", "iterations=2", "ipc=2", "batch_real=8", "log_every=0"]
FAST += ["eval.steps=5", "eval.full_steps=7"]


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("dataset_distillation", overrides=[*FAST, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(tmp_path / "data")
            cfg.paths.log_dir = str(tmp_path / "logs")
        return cfg

    return make


# -- the distances: golden values ---------------------------------------------------------------------------


def test_layer_gradient_distance_is_the_sum_of_row_cosine_distances():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    syn = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # row 0: same direction, distance 0; row 1: 45 degrees, distance 1 - 1/sqrt(2)
    assert layer_gradient_distance(real, syn, eps=0.0).item() == pytest.approx(1 - 1 / math.sqrt(2))


def test_a_conv_gradient_is_compared_per_output_channel():
    real = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # (out 2, in 1, kernel 2)
    syn = torch.tensor([[[2.0, 4.0]], [[-3.0, -4.0]]])  # channel 0 parallel (0), channel 1 opposite (2)
    assert layer_gradient_distance(real, syn, eps=0.0).item() == pytest.approx(2.0)


def test_one_dimensional_parameters_add_nothing_and_zero_rows_give_one():
    assert layer_gradient_distance(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 5.0])).item() == 0.0
    zero = layer_gradient_distance(torch.zeros(1, 3), torch.ones(1, 3))
    assert torch.isfinite(zero) and zero.item() == pytest.approx(1.0)  # eps keeps it finite


def test_gradient_distance_sums_the_layers():
    real = [torch.tensor([[1.0, 0.0]]), torch.tensor([3.0]), torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])]
    syn = [torch.tensor([[0.0, 1.0]]), torch.tensor([7.0]), torch.tensor([[[2.0, 4.0]], [[-3.0, -4.0]]])]
    assert gradient_distance(real, syn, eps=0.0).item() == pytest.approx(1.0 + 0.0 + 2.0)
    with pytest.raises(ValueError, match="one synthetic gradient per real one"):
        gradient_distance(real, syn[:2])


def test_mean_embedding_distance_is_the_squared_distance_of_the_means():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3)
    syn = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # mean (0, 0)
    assert mean_embedding_distance(real, syn).item() == pytest.approx(2.0**2 + 3.0**2)
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        mean_embedding_distance(real, syn[:, :1])


def test_gm_loops_follow_the_papers_table():
    assert gm_loops(1) == (1, 1) and gm_loops(10) == (10, 50) and gm_loops(15) == (10, 50) and gm_loops(50) == (50, 10)


# -- gradients wrt the synthetic data (float64) -------------------------------------------------------------


class Smooth(nn.Module):
    """A tiny smooth network (tanh: no kinks for gradcheck's finite differences), with an embedding tap."""

    embedding_tap = "body"

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_gradcheck_of_the_distances_on_tensors():
    g = torch.Generator().manual_seed(0)
    real = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, 1, 3, generator=g, dtype=torch.float64)]
    syn = [t.clone().normal_(generator=g).requires_grad_(True) for t in real]
    assert torch.autograd.gradcheck(lambda a, b: gradient_distance(real, [a, b]), tuple(syn))
    e_real = torch.randn(5, 4, generator=g, dtype=torch.float64)
    e_syn = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: mean_embedding_distance(e_real, s), (e_syn,))


def test_gradcheck_of_the_matching_losses_wrt_the_synthetic_inputs():
    """Through the network: gm differentiates a gradient (double backward), dm an embedding."""
    torch.manual_seed(0)
    model = Smooth().double()
    params = list(model.parameters())
    real_x = torch.randn(5, 1, 6, dtype=torch.float64)
    label = torch.zeros(5, dtype=torch.long)
    g_real = [t.detach() for t in torch.autograd.grad(nn.functional.cross_entropy(model(real_x), label), params)]
    syn = torch.randn(2, 1, 6, dtype=torch.float64, requires_grad=True)

    def gm(s):
        g_syn = torch.autograd.grad(nn.functional.cross_entropy(model(s), label[:2]), params, create_graph=True)
        return gradient_distance(g_real, g_syn)

    def dm(s):
        return mean_embedding_distance(embed(model, real_x).detach(), embed(model, s))

    assert torch.autograd.gradcheck(gm, (syn,))
    assert torch.autograd.gradcheck(dm, (syn,))


# -- the loops -----------------------------------------------------------------------------------------------


def toy_data(n_per_class=12, classes=3):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 1, 6, generator=g) + y[:, None, None].float()  # classes apart by their mean
    return x, y


def test_the_initial_set_holds_ipc_real_examples_of_each_class():
    x, y = toy_data()
    xs, ys = initial_set(x, y, 3, 4, torch.Generator().manual_seed(0))
    assert ys.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    rows = {tuple(r.flatten().tolist()) for r in x}
    assert all(tuple(r.flatten().tolist()) in rows for r in xs)  # real examples, not noise
    assert len({tuple(r.flatten().tolist()) for r in xs}) == 12  # drawn without replacement


@pytest.mark.parametrize("method, lr", [("gm", 0.1), ("dm", 1.0)])
def test_synthesis_lowers_the_matching_loss_of_a_fixed_network(method, lr):
    """With one network every iteration, the loss is one function of the set: descent must lower it."""
    x, y = toy_data()

    def same_model(seed):
        torch.manual_seed(0)
        return Smooth()

    out = synthesize(method, x, y, 3, 2, same_model, 15, lr, seed=0, batch_real=12, loops=(1, 1))
    assert out.x.shape == (6, 1, 6) and out.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.losses[-1] < out.losses[0]
    start, _ = initial_set(x, y, 3, 2, torch.Generator().manual_seed(0))
    assert not torch.equal(out.x, start)


def test_batch_norms_are_frozen_at_mixed_real_statistics():
    x, y = toy_data()
    model = CNN1d(input_shape=(1, 6), num_classes=3, channels=[4])
    by_class = [(y == c).nonzero().flatten() for c in range(3)]
    freeze_norm_statistics(model, x, by_class, torch.Generator().manual_seed(0))
    bn = model.blocks[0][1]
    assert not bn.training and model.training  # the rest of the network still trains
    with torch.no_grad():
        conv = model.blocks[0][0](x)  # 12 per class <= 16: every example enters the statistics
    assert torch.allclose(bn.running_mean, conv.mean((0, 2)), atol=1e-5)


def test_embed_reads_the_models_embedding_tap():
    model = MLP(input_shape=(1, 6), num_classes=3, hidden=[5])
    x = torch.randn(4, 1, 6)
    assert torch.allclose(embed(model, x), model.layers(model.flatten(x)))


# -- the app -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gm", "dm"])
def test_a_fast_run_saves_the_set_and_writes_results(make_cfg, tmp_path, method):
    cfg = make_cfg(f"method={method}", "eval.full=true")
    results = run(cfg)
    out = tmp_path / "run"
    x, y = load_set(out / SET_FILE)
    assert x.shape == (20, 1, 40) and torch.bincount(y).tolist() == [2] * 10 and torch.isfinite(x).all()
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "finished" and saved["method"] == method and saved["ipc"] == 2
    for key, size in (("synthetic", 20), ("random_real", 20), ("full", 192)):
        assert 0.0 <= saved[key]["acc"] <= 1.0 and saved[key]["train_size"] == size
    assert saved["synthetic"]["steps"] == saved["random_real"]["steps"] == 5 and saved["full"]["steps"] == 7
    assert saved["synthesis"]["seconds"] > 0 and saved["synthesis"]["iterations"] == 2
    assert saved["synthetic"] == results["synthetic"]
    text = (out / "results.json").read_text()
    assert str(tmp_path) not in text and "paths" not in saved["config"]  # no machine path in results


@pytest.mark.parametrize(
    "override, message",
    [
        ("ipc=0", "ipc=0 is out of range: it must be an integer >= 1; set e.g. ipc=10."),
        ("ipc=100", "ipc=100 asks for 100 real examples per class"),
        ("method=kip", "method='kip' is not a dataset distillation method; set method=gm"),
        ("iterations=0", "iterations=0 is out of range"),
        ("lr=-1", "lr=-1 is out of range: it must be > 0 and finite"),
        ("momentum=1.0", "momentum=1.0 is out of range: it must be in [0, 1)"),
        ("ipc=1.5", "ipc=1.5 is out of range: it must be an integer >= 1"),
        ("eval.lr=inf", "eval.lr=inf is out of range: it must be > 0 and finite; set e.g. eval.lr=0.01."),
    ],
)
def test_bad_inputs_fail_before_any_compute(make_cfg, tmp_path, monkeypatch, override, message):
    def no_compute(*args, **kwargs):
        raise AssertionError("synthesis started")

    monkeypatch.setattr(app, "synthesize", no_compute)
    with pytest.raises(KDLabError) as e:
        run(make_cfg(override))
    assert message in str(e.value)
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / SET_FILE).exists()


def test_ipc_beyond_the_smallest_class_names_the_limit(make_cfg):
    limit = r"class \d+ has only \d+ in the training split of data=fake; set ipc to at most \d+"
    with pytest.raises(KDLabError, match=limit):
        run(make_cfg("ipc=100"))


def test_dm_needs_a_model_with_an_embedding_tap(make_cfg, monkeypatch):
    monkeypatch.setattr(app, "synthesize", lambda *a, **k: pytest.fail("synthesis started"))
    cfg = make_cfg(
        "method=dm",
        "student.model._target_=torch.nn.Sequential",
        "~student.model.input_shape",
        "~student.model.num_classes",
        "~student.model.hidden",
    )
    with pytest.raises(KDLabError, match="declares no embedding_tap"):
        run(cfg)


@pytest.mark.slow  # a subprocess: torch, Lightning and Hydra start in it
def test_the_command_prints_one_line_and_exits_1(tmp_path):
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'kd-lab-distill-data = "kd_lab.dataset_distillation.app:main"' in pyproject
    cmd = [sys.executable, "-m", "kd_lab.dataset_distillation.app", "method=kip", f"paths.root_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "kd-lab-distill-data: method='kip' is not a dataset distillation method" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "logs" / "dataset_distillation").iterdir())  # no run directory is left


def test_the_experiment_table_averages_over_seeds(tmp_path):
    """experiments/dataset_distillation/table.py: one row per (method, ipc), mean and std over the seeds."""
    import importlib.util

    path = Path(__file__).parents[1] / "experiments/dataset_distillation/table.py"
    spec = importlib.util.spec_from_file_location("dd_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for seed, (syn, real) in enumerate([(0.6, 0.5), (0.8, 0.7)]):
        record = {"status": "finished", "method": "dm", "ipc": 10, "model": "cnn1d_small", "seed": seed}
        record |= {"synthetic": {"acc": syn}, "random_real": {"acc": real}}
        record["synthesis"] = {"iterations": 3, "seconds": 2.0}
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "results.json").write_text(json.dumps(record))
    (row,) = table.rows(table.load([str(tmp_path)]))
    assert row["synthetic acc %"] == "70.0 ± 14.1" and row["random real acc %"] == "60.0 ± 14.1"
    assert row["seeds"] == "0,1" and row["full split acc %"] == "-"
