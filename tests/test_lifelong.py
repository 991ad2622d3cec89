"""Lifelong learning (kd_lab/lifelong): the LwF loss, the metrics, the task split, the loop of each method and
the config mistakes that must fail before compute."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from kd_lab.errors import KDLabError
from kd_lab.lifelong import run as lifelong_run
from kd_lab.lifelong.config import Settings, check_config
from kd_lab.lifelong.loop import TaskSequence
from kd_lab.lifelong.loss import lwf_terms
from kd_lab.lifelong.metrics import average_accuracy, forgetting, forgetting_per_task
from kd_lab.lifelong.model import MultiHeadNet, multihead_from
from kd_lab.lifelong.tasks import check_split, task_subsets
from kd_lab.models import CNN1d
from kd_lab.run.train import CONFIG_DIR

TINY = ["data=fake", "student@trunk=mlp_small", "epochs_per_task=1", "warmup_epochs=1", "limit_batches=1"]


@pytest.fixture
def lifelong_cfg(tmp_path, data_dir):
    """``lifelong_cfg(*overrides)``: conf/lifelong.yaml composed on fake data, writing only under tmp_path."""

    def make(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("lifelong", overrides=[*TINY, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(data_dir)
            cfg.paths.log_dir = str(tmp_path / "logs")
        return cfg

    return make


# -- the loss ----------------------------------------------------------------------------------------------


def test_lwf_loss_golden_value():
    # new head: logits (2, 0), label 0: CE = log(1 + e^-2) = 0.126928
    # old head: current (1, 0), recorded (0, 1); at T = 2 the two softmaxes are (s, 1-s) and (1-s, s) with
    # s = 1/(1 + e^-0.5) = 0.6224593; KL(recorded || current) = (2s - 1) * 0.5 = 0.1224593; times T^2: 0.4898373
    new = torch.tensor([[2.0, 0.0]])
    terms = lwf_terms(new, torch.tensor([0]), [torch.tensor([[1.0, 0.0]])], [torch.tensor([[0.0, 1.0]])], 1.0, 2.0)
    assert terms["ce"].item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.126928, abs=1e-6)
    assert terms["old"].item() == pytest.approx(0.4898373, abs=1e-6)
    # lambda_o weighs the old term; two old heads add their terms
    double = lwf_terms(new, torch.tensor([0]), [torch.tensor([[1.0, 0.0]])] * 2, [torch.tensor([[0.0, 1.0]])] * 2,
                       0.5, 2.0)  # fmt: skip
    assert double["old"].item() == pytest.approx(0.4898373, abs=1e-6)


def test_lwf_loss_without_old_heads_is_the_cross_entropy():
    new, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    terms = lwf_terms(new, y, [], [], 1.0, 2.0)
    assert terms["old"].item() == 0.0
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(new, y).item())


def test_lwf_loss_gradient_check():
    g = torch.Generator().manual_seed(0)
    new = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    old_a = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    old_b = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    recorded = [torch.randn(5, n, generator=g, dtype=torch.float64) for n in (2, 3)]
    y = torch.tensor([0, 1, 1, 0, 1])

    def loss(new, old_a, old_b):
        terms = lwf_terms(new, y, [old_a, old_b], recorded, 0.7, 2.0)
        return terms["ce"] + terms["old"]

    assert torch.autograd.gradcheck(loss, (new, old_a, old_b))


# -- the metrics -------------------------------------------------------------------------------------------


def test_average_accuracy_and_forgetting_on_a_hand_made_matrix():
    acc = [
        [0.5, None, None],
        [0.8, 0.9, None],  # task 0 got better after task 1: its best is here, not right after it was learned
        [0.6, 0.75, 0.9],
    ]
    assert average_accuracy(acc) == pytest.approx([0.5, 0.85, 0.75])
    # task 0: max(0.5, 0.8) - 0.6 = 0.2; task 1: 0.9 - 0.75 = 0.15; the last task is not counted
    assert forgetting_per_task(acc) == pytest.approx([0.2, 0.15])
    assert forgetting(acc) == pytest.approx(0.175)


def test_one_row_has_no_forgetting():
    assert forgetting([[0.9, 0.8]]) is None
    assert average_accuracy([[0.9, 0.8]]) == pytest.approx([0.85])


# -- the task split and the model --------------------------------------------------------------------------


def test_task_subsets_have_local_labels():
    x = torch.arange(6.0).view(6, 1)
    y = torch.tensor([3, 0, 2, 1, 2, 3])
    (x0, y0), (x1, y1) = task_subsets(x, y, [[3, 1], [0, 2]], "train")
    assert x0.flatten().tolist() == [0.0, 3.0, 5.0] and y0.tolist() == [0, 1, 0]
    assert x1.flatten().tolist() == [1.0, 2.0, 4.0] and y1.tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ([[0, 1], [2, 3]], "classes [4] are in no task"),
        ([[0, 1], [1, 2, 3, 4]], "classes [1] are in more than one task"),
        ([[0, 1], [2, 3, 4, 7]], "classes [7] are not classes of the data (0..4)"),
        ([[0, 1, 2, 3], [4]], "tasks[1]=[4] has 1 class(es), but a task needs at least 2"),
        ([], "is not a list of tasks"),
        ([[0, "a"]], "is not a list of class ids"),
    ],
)
def test_a_split_that_does_not_cover_the_classes_is_refused(split, message):
    with pytest.raises(KDLabError) as e:
        check_split(split, 5)
    assert message in str(e.value)
    assert "e.g. tasks=[[0,1],[2,3]" in str(e.value)


def test_a_task_without_samples_is_refused():
    with pytest.raises(KDLabError, match=r"task 1 \(classes \[2, 3\]\) has no samples in the test split"):
        task_subsets(torch.zeros(3, 1), torch.tensor([0, 1, 0]), [[0, 1], [2, 3]], "test")


def test_a_trunk_without_a_linear_head_is_refused():
    with pytest.raises(KDLabError, match=r"has no Linear `head`.*student@trunk=mlp_medium"):
        multihead_from(torch.nn.Sequential(torch.nn.Flatten()), [2, 2])


def test_the_warm_up_trains_the_new_head_only_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = multihead_from(CNN1d((1, 40), 10, channels=(4, 4)), [2, 2])
    data = [(torch.randn(16, 1, 40), torch.randint(0, 2, (16,))) for _ in range(2)]
    settings = Settings("lwf", 0, [[0, 1], [2, 3]], epochs=0, warmup_epochs=2, lambda_o=1.0, temperature=2.0,
                        limit_batches=None)  # fmt: skip
    sequence = TaskSequence(model, data, data, settings, lambda p: torch.optim.SGD(p, lr=0.5), 8, 8)
    trunk = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    heads = [{k: v.clone() for k, v in h.state_dict().items()} for h in model.heads]
    sequence.learn_task(1)
    assert sequence.steps == 4  # 2 warm-up epochs of 2 batches
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in trunk.items())  # BN running stats too
    assert all(torch.equal(v, model.heads[0].state_dict()[k]) for k, v in heads[0].items())
    assert not torch.equal(heads[1]["weight"], model.heads[1].weight)


def test_lwf_distills_the_model_as_it_was_before_the_task(monkeypatch):
    # without warm-up, the first step of each later task sees old heads equal to the recorded ones: KD = 0
    firsts: dict[int, float] = {}

    def spy(new, target, old, recorded, lambda_o, temperature):
        terms = lwf_terms(new, target, old, recorded, lambda_o, temperature)
        firsts.setdefault(len(old), terms["old"].item())
        return terms

    monkeypatch.setattr("kd_lab.lifelong.loop.lwf_terms", spy)
    torch.manual_seed(0)
    model = MultiHeadNet(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 8), torch.nn.ReLU()), 8, [2, 2, 2])
    data = [(torch.randn(16, 1, 40), torch.randint(0, 2, (16,))) for _ in range(3)]
    settings = Settings("lwf", 0, [[0, 1], [2, 3], [4, 5]], epochs=3, warmup_epochs=0, lambda_o=1.0,
                        temperature=2.0, limit_batches=None)  # fmt: skip
    TaskSequence(model, data, data, settings, lambda p: torch.optim.SGD(p, lr=0.5), 8, 8).run()
    assert set(firsts) == {1, 2}
    assert firsts[1] == pytest.approx(0.0, abs=1e-7) and firsts[2] == pytest.approx(0.0, abs=1e-7)


# -- the config mistakes, before compute -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=lwf2", "method='lwf2' is not a lifelong method: pick one of ['lwf', 'finetune', 'joint']"),
        ("lambda_o=-0.5", "lambda_o=-0.5 is out of range: it must be a finite number >= 0; set e.g. lambda_o=1.0"),
        ("lambda_o=nan", "lambda_o=nan is out of range"),
        ("temperature=0", "temperature=0 is out of range: it must be a finite number > 0"),
        ("epochs_per_task=0", "epochs_per_task=0 is out of range: it must be an int >= 1"),
        ("warmup_epochs=-1", "warmup_epochs=-1 is out of range: it must be an int >= 0"),
        ("limit_batches=0", "limit_batches=0 is out of range: it must be an int >= 1 or null"),
        ("threads=0", "threads=0 is out of range: it must be an int >= 1 or null"),
        ("tasks=[[0,1],[2,3]]", "classes [4, 5, 6, 7, 8, 9] are in no task"),
        ("+data.augment.max_shift=3", "data.augment is set, but the lifelong loop trains without augmentation"),
        ("+lamda_o=1", "unknown key(s) ['lamda_o'] in the lifelong config"),
    ],
)
def test_bad_config_fails_before_any_compute(lifelong_cfg, monkeypatch, override, message):
    def no_compute(*args, **kwargs):
        raise AssertionError("the data module was built before the config was checked")

    monkeypatch.setattr(lifelong_run, "build", no_compute)
    with pytest.raises(KDLabError) as e:
        lifelong_run.run_lifelong(lifelong_cfg(override))
    assert message in str(e.value)


def test_the_shipped_config_checks():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        settings = check_config(compose("lifelong"))
    assert (settings.method, settings.lambda_o, settings.temperature) == ("lwf", 0.25, 2.0)
    assert settings.tasks == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_the_command_line_reports_a_bad_method_in_one_line_and_keeps_no_run(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kd_lab.lifelong.app", "method=sgd", f"paths.root_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "kd-lab-lifelong: method='sgd' is not a lifelong method" in done.stderr
    assert "Traceback" not in done.stderr
    assert "no run directory was kept" in done.stderr
    assert not list((tmp_path / "logs" / "lifelong").glob("*"))  # a typo leaves no run behind


# -- end to end: one batch per phase, each method ----------------------------------------------------------


@pytest.mark.parametrize(("method", "rows", "steps"), [("lwf", 5, 9), ("finetune", 5, 9), ("joint", 1, 2)])
def test_each_method_runs_end_to_end(lifelong_cfg, tmp_path, method, rows, steps):
    results = lifelong_run.run_lifelong(lifelong_cfg(f"method={method}"))
    saved = (tmp_path / "run" / "results.json").read_text()
    assert json.loads(saved)["accuracy_matrix"] == results["accuracy_matrix"]
    assert str(tmp_path) not in saved  # no path of the machine in a file meant for the repo
    matrix = results["accuracy_matrix"]
    assert len(matrix) == rows and all(len(row) == 5 for row in matrix)
    # lwf, finetune: task 0 one batch; tasks 1-4 one warm-up batch and one joint batch. joint: 2 epochs of 1
    assert results["optimizer_steps"] == steps
    if rows == 5:  # row i has the tasks seen so far, and None for the tasks to come
        assert [sum(a is not None for a in row) for row in matrix] == [1, 2, 3, 4, 5]
        assert isinstance(results["forgetting"], float) and len(results["forgetting_per_task"]) == 4
    else:
        assert results["forgetting"] is None
    assert results["final_average_accuracy"] == pytest.approx(average_accuracy(matrix)[-1])
    assert 0.0 <= results["final_average_accuracy"] <= 1.0


def test_lwf_without_its_kd_term_is_fine_tuning():
    # the KD term is the only difference between the two: with lambda_o = 0 the weights end the same.
    # No weight decay here: lwf's old heads get zero gradients and AdamW decays them, fine-tuning's get none.
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 40, generator=g), torch.arange(16) % 2) for _ in range(3)]

    def final_weights(method: str, lambda_o: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = multihead_from(CNN1d((1, 40), 10, channels=(4, 4)), [2, 2, 2])
        settings = Settings(method, 0, [[0, 1], [2, 3], [4, 5]], epochs=2, warmup_epochs=1, lambda_o=lambda_o,
                            temperature=2.0, limit_batches=None)  # fmt: skip
        TaskSequence(model, data, data, settings, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0), 8, 8).run()
        return [p.detach().clone() for p in model.parameters()]

    finetune, lwf_zero, lwf = final_weights("finetune", 1.0), final_weights("lwf", 0.0), final_weights("lwf", 1.0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(finetune, lwf_zero, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(finetune, lwf, strict=True))


def test_the_config_checks_need_no_torch():
    # a config mistake is reported without paying for torch's import (seconds)
    code = "import sys; from kd_lab.lifelong import app; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_experiment_table_gives_mean_and_std_per_method(tmp_path):
    for k, (method, acc, forget) in enumerate([("lwf", 0.8, 0.02), ("lwf", 0.9, 0.04), ("joint", 0.95, None)]):
        run = tmp_path / "sweep" / str(k)
        run.mkdir(parents=True)
        result = {"status": "finished", "method": method, "seed": k, "final_average_accuracy": acc,
                  "forgetting": forget}  # fmt: skip
        (run / "results.json").write_text(json.dumps(result))
    table = Path(__file__).parents[1] / "experiments" / "lifelong" / "table.py"
    md, csv_file = tmp_path / "results.md", tmp_path / "results.csv"
    args = [sys.executable, str(table), str(tmp_path / "sweep"), "--markdown", str(md), "--csv", str(csv_file)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = md.read_text().splitlines()
    # lwf: mean 85.0, sample std 7.1 (sqrt(0.005) = 0.0707); forgetting 3.0 ± 1.4; joint: one seed, no forgetting
    assert "| lwf | 0,1 | 85.0 ± 7.1 | 3.0 ± 1.4 |" in lines
    assert "| joint | 2 | 95.0 | - |" in lines
    assert str(tmp_path) not in md.read_text() + csv_file.read_text()
