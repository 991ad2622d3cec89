"""Distillation-aware student search: the scalar search space, its budgets, the Pareto tool, a tiny search."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_kd_lab
from torch import nn

from kd_lab.errors import KDLabError
from kd_lab.models.search_space import SearchCNN1d, cnn1d_param_count, forward_latency, search_channels
from kd_lab.run.checks.schema import validate_config
from kd_lab.run.module import count_parameters
from kd_lab.run.train import train
from kd_lab.tools import pareto

# ---------------------------------------------------------------- the model builder


def test_search_channels_widen_per_block():
    assert search_channels(3, 8) == [8, 8, 8]
    assert search_channels(3, 8, 2.0) == [8, 16, 32]
    assert search_channels(4, 4, 1.5) == [4, 6, 9, 14]  # round(4 * 1.5**i): 4, 6, 9, 13.5 -> 14


def test_depth_width_kernel_give_the_right_layers_and_param_count():
    model = SearchCNN1d([1, 40], 10, depth=2, width=4, kernel_size=3, widen=2.0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(1, 4, 3), (4, 8, 3)]
    assert [c.stride[0] for c in convs] == [1, 2]
    assert model.head.in_features == 8 and model.stage_taps == ["blocks.0", "blocks.1"]
    # by hand: conv 1*4*3 + bn 2*4, conv 4*8*3 + bn 2*8, head 8*10 + 10
    hand = 12 + 8 + 96 + 16 + 90
    assert count_parameters(model) == cnn1d_param_count(1, 10, [4, 8], 3) == hand == 222
    assert model(torch.zeros(5, 1, 40)).shape == (5, 10)


def test_the_shipped_default_is_cnn1d_tiny(make_cfg):
    cfg = make_cfg("student=cnn1d_search")
    assert cfg.student.name == "cnn1d_search_d3_w8_k5_x1.0"
    assert count_parameters(SearchCNN1d([1, 40], 10)) == 818  # cnn1d_tiny's count (experiments/mnist1d_survey)


# ---------------------------------------------------------------- budgets and invalid uses


def test_over_the_param_budget_is_refused_before_a_layer_is_built():
    with pytest.raises(KDLabError, match=r"26,154 parameters, over the budget max_params=2,000; pick a smaller"):
        SearchCNN1d([1, 40], 10, depth=3, width=32, kernel_size=5, widen=1.5, max_params=2000)
    assert count_parameters(SearchCNN1d([1, 40], 10, depth=3, width=4, max_params=500)) <= 500


def test_an_even_kernel_is_refused():
    with pytest.raises(KDLabError, match=r"kernel_size=4 is even.*use an odd kernel_size"):
        SearchCNN1d([1, 40], 10, kernel_size=4)


def test_latency_is_measured_at_both_batch_sizes_and_its_budget_refuses():
    model = SearchCNN1d([1, 40], 10, measure_latency=True, latency_repeats=3)
    assert set(model.latency) == {"batch_1_ms", "batch_256_ms", "repeats", "threads"}
    assert model.latency["batch_1_ms"] > 0 and model.latency["batch_256_ms"] > 0 and model.latency["repeats"] == 3
    assert model.training  # measured in eval mode, then put back
    assert SearchCNN1d([1, 40], 10).latency is None  # not asked: not measured
    with pytest.raises(KDLabError, match=r"ms per batch-1 forward .* over max_latency_ms=1e-09; pick a smaller"):
        SearchCNN1d([1, 40], 10, max_latency_ms=1e-9, latency_repeats=2)


def test_forward_latency_draws_no_random_numbers():
    model = SearchCNN1d([1, 40], 10)
    state = torch.random.get_rng_state()
    forward_latency(model, [1, 40], batch_sizes=(2,), repeats=2)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student.model.depth=0", r"student.model.depth=0 is out of range: it must be >= 1"),
        ("student.model.widen=-1", r"student.model.widen=-1 is out of range: it must be > 0"),
        ("student.model.max_params=0", r"student.model.max_params=0 is out of range: it must be >= 1"),
    ],
)
def test_bad_scalars_fail_the_checks_before_compute(make_cfg, override, message):
    with pytest.raises(KDLabError, match=message):
        validate_config(make_cfg("student=cnn1d_search", override))


def test_a_run_over_budget_fails_at_the_checks_stage(make_cfg, tmp_path):
    cfg = make_cfg("student=cnn1d_search", "student.model.max_params=100")
    with pytest.raises(Exception) as info:
        train(cfg)
    assert "over the budget max_params=100" in str(info.value.__cause__ or info.value)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["stage"] == "checks"  # before the teacher, before the fit
    # the record names the model's own refusal, not Hydra's InstantiationException around it (a sweep's
    # one-line report shows this line)
    assert results["error"].startswith("KDLabError: ") and "over the budget max_params=100" in results["error"]
    assert not (tmp_path / "teachers").exists() or not any((tmp_path / "teachers").iterdir())


def test_a_run_records_its_latency_in_results_json(make_cfg, tmp_path):
    cfg = make_cfg("student=cnn1d_search", "student.model.measure_latency=true", "student.model.latency_repeats=2")
    cfg.trainer.max_epochs = 1
    results, _ = train(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["latency"] == results["latency"] and saved["latency"]["batch_256_ms"] > 0
    assert saved["params"]["student"] == 818


def test_fast_dev_run(make_cfg):
    results, _ = train(make_cfg("student=cnn1d_search", "debug=fdr", "student.model.depth=2"))
    assert results["status"] == "finished" and "latency" not in results


# ---------------------------------------------------------------- the Pareto front


def test_pareto_mask_golden():
    points = [(0.9, 100), (0.8, 50), (0.85, 200), (0.9, 100), (0.7, 50), (0.95, 400)]
    # (0.85, 200) is beaten by (0.9, 100); (0.7, 50) by (0.8, 50); the two equal points both stay
    assert pareto.pareto_mask(points, ("max", "min")) == [True, True, False, True, False, True]
    three = [(0.9, 100, 2.0), (0.9, 100, 1.0), (0.8, 50, 3.0)]
    assert pareto.pareto_mask(three, ("max", "min", "min")) == [False, True, True]
    assert pareto.pareto_mask([], ("max", "min")) == []
    with pytest.raises(ValueError, match="senses must be"):
        pareto.pareto_mask([(1, 2)], ("up", "min"))


def _trial(root: Path, name: str, val: float, params: int, latency: float | None, status: str = "finished"):
    model = {"depth": 2, "width": params // 100, "kernel_size": 5, "widen": 1.0}
    results = {
        "status": status,
        "config": {"student": {"model": model}},
        "task": {"monitor": "val/acc", "headline": "test/acc"},
        "best": {"val/acc": val, "test/acc": val - 0.01},
        "params": {"student": params},
    }
    if latency is not None:
        results["latency"] = {"batch_1_ms": latency, "batch_256_ms": 10 * latency}
    if status == "failed":
        results["error"] = "RuntimeError: boom\nmore"
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(results))


def test_pareto_tool_reads_a_sweep_marks_both_fronts_and_lists_failures(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _trial(sweep, "trial_0", 0.80, 500, 0.30)
    _trial(sweep, "trial_1", 0.90, 2000, 0.20)  # on both fronts
    _trial(sweep, "trial_2", 0.85, 3000, 0.50)  # beaten by trial_1 on both
    _trial(sweep, "trial_3", 0.70, 400, None)  # smallest: on the params front; not timed
    _trial(sweep, "trial_4", 0.99, 100, 0.1, status="failed")
    refused = {
        "status": "failed",
        "stage": "checks",
        "config": {"student": {"model": {"depth": 6, "width": 32}}},
        "error": "InstantiationException: Error in call to target 'x':\nKDLabError('over the budget max_params=10')",
    }
    (sweep / ".failed_before_compute").mkdir()
    (sweep / ".failed_before_compute" / "trial_5.json").write_text(json.dumps(refused))
    md, png = tmp_path / "p.md", tmp_path / "p.png"
    assert pareto.main([str(sweep), "--markdown", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert text == capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| trial_")}
    assert list(rows) == ["trial_3", "trial_0", "trial_1", "trial_2"]  # by parameter count
    fronts = {name: (cells[-2], cells[-1].rstrip(" |")) for name, cells in rows.items()}
    assert fronts == {"trial_3": ("yes", "-"), "trial_0": ("yes", ""), "trial_1": ("yes", "yes"), "trial_2": ("", "")}
    assert "- trial_4 (depth=2, width=1, kernel_size=5, widen=1.0): RuntimeError: boom\n" in text
    assert "- trial_5 (depth=6, width=32): KDLabError: over the budget max_params=10 (refused before compute)" in text
    assert str(tmp_path) not in text  # no machine path in a results file
    assert png.stat().st_size > 10_000


def test_pareto_tool_says_when_there_is_nothing_to_read(tmp_path, capsys):
    assert pareto.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    _trial(tmp_path / "sweep", "trial_0", 0.5, 100, None, status="failed")
    assert pareto.main([str(tmp_path / "sweep")]) == 1
    assert "no finished trial" in capsys.readouterr().err


# ---------------------------------------------------------------- a tiny search


@pytest.mark.slow
def test_a_trial_over_budget_fails_before_compute_and_the_search_goes_on(tmp_path):
    """3 trials; seed 0 samples width 32 (over 2,000 parameters) in one of them, width 4 in the others."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hparams_search=student_nas",
        "data=fake",
        "teacher=mlp_large",
        "teacher.max_epochs=1",
        "trainer.max_epochs=1",
        "logger=none",
        "hydra.sweeper.n_trials=3",
        "student.model.max_params=2000",
        "student.model.latency_repeats=2",
        "student.model.depth=choice(2,3)",
        "student.model.width=choice(4,32)",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_kd_lab(tmp_path, *args, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep says a job failed
    assert "2 of 3 jobs finished" in proc.stderr + proc.stdout
    (record,) = (sweep / ".failed_before_compute").glob("*.json")
    assert "over the budget max_params=2,000" in json.loads(record.read_text())["error"]
    trials, failed = pareto.load_trials(sweep)
    assert len(trials) == 2 and len(failed) == 1
    assert all(t["params"] <= 2000 and t["latency_b1_ms"] > 0 and t["val"] is not None for t in trials)
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()
    cmd = [sys.executable, "-m", "kd_lab.tools.pareto", str(sweep)]  # the module runs as a program too
    assert "front: params" in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
