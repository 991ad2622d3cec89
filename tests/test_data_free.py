"""Data-free distillation (DAFL, Zero-shot KT, DeepInversion): golden values of their synthesis losses, gradient
checks, what the student sees, the refusals at build time, and what results.json reports. The fast_dev_run of
each method under every student is in tests/test_matrix.py."""

import math

import pytest
import torch
from torch import nn

from kd_lab.algorithms.data_free import DAFL, ZSKT, DeepInversion, Generator
from kd_lab.algorithms.data_free.dafl import activation_loss, info_entropy_loss, onehot_loss
from kd_lab.algorithms.data_free.deep_inversion import bn_statistics_loss, total_variation
from kd_lab.algorithms.data_free.zskt import disagreement
from kd_lab.errors import KDLabError
from kd_lab.run.train import train

CNN = ["teacher=cnn1d_large", "teacher.model.channels=[8,16,16]", "teacher.max_epochs=1", "student=cnn1d_tiny"]
SMALL_INVERSION = ["algorithm.num_samples=64", "algorithm.iterations=2", "algorithm.batch_size=32"]


def fdr(make_cfg, algorithm: str, *overrides: str):
    extra = SMALL_INVERSION if algorithm == "deep_inversion" else []
    return train(make_cfg(*CNN, f"algorithm={algorithm}", "debug=fdr", *extra, *overrides))


# -- golden values, by hand -------------------------------------------------------------------------------
def test_dafl_generator_terms_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    e = math.e
    # CE to the argmax: -log softmax of the largest logit, row by row
    assert onehot_loss(logits).item() == pytest.approx((math.log(1 + 2 / e**2) + math.log(1 + 2 / e)) / 2)
    rows = [[e**2 / (e**2 + 2), 1 / (e**2 + 2), 1 / (e**2 + 2)], [1 / (e + 2), e / (e + 2), 1 / (e + 2)]]
    pbar = [(a + b) / 2 for a, b in zip(*rows, strict=True)]
    assert info_entropy_loss(logits).item() == pytest.approx(sum(p * math.log10(p) for p in pbar))  # -0.43699
    assert activation_loss(torch.tensor([[1.0, -2.0], [3.0, -4.0]])).item() == pytest.approx(-2.5)


def test_balanced_teacher_outputs_minimize_the_information_entropy_term():
    balanced = torch.eye(3) * 5  # one confident sample per class: pbar uniform
    collapsed = torch.tensor([[5.0, 0.0, 0.0]] * 3)
    assert info_entropy_loss(balanced).item() < info_entropy_loss(collapsed).item()
    assert info_entropy_loss(torch.zeros(4, 3)).item() == pytest.approx(-math.log10(3))  # pbar = 1/3 each


def test_zskt_disagreement_by_hand():
    student = torch.tensor([[0.0, 0.0]])  # p_s = (1/2, 1/2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.13081
    assert disagreement(student, teacher).item() == pytest.approx(expected)
    assert disagreement(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_deep_inversion_terms_by_hand():
    # one channel, batch 2, length 2: values 1, 3, 5, 7 -> mean 4, biased variance (9 + 1 + 1 + 9) / 4 = 5
    feature = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    assert bn_statistics_loss(feature, torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(1 + 4)
    two = torch.cat([feature, feature + 1], dim=1)  # channel 2: mean 5, variance 5
    got = bn_statistics_loss(two, torch.tensor([4.0, 4.0]), torch.tensor([5.0, 1.0])).item()
    assert got == pytest.approx(math.hypot(0, 1) + math.hypot(0, 4))
    assert total_variation(torch.tensor([[[0.0, 3.0, 7.0]]])).item() == pytest.approx(5.0)  # ||(3, 4)||
    image = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # along W: (-1, -2); along H: (-2, -3); the diagonals: (2 - 1) and (0 - 4)
    expected = math.hypot(1, 2) + math.hypot(2, 3) + 1 + 4
    assert total_variation(image).item() == pytest.approx(expected)


def test_deep_inversion_loss_is_its_terms():
    """The inversion loss of a one-BatchNorm teacher, against its terms computed by hand."""
    teacher = nn.Sequential(nn.BatchNorm1d(1), nn.Flatten(), nn.Linear(2, 2, bias=False)).eval()
    teacher[0].running_mean.fill_(3.0)
    teacher[0].running_var.fill_(1.0)
    with torch.no_grad():
        teacher[2].weight.copy_(torch.eye(2))
    algo = DeepInversion(bn_weight=2.0, target_weight=1.0, tv_weight=0.5, l2_weight=0.25)
    algo.bind(nn.Linear(1, 1), teacher)
    x = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    labels = torch.tensor([0, 1])
    logits = (x.flatten(1) - 3.0) / math.sqrt(1.0 + 1e-5)  # BN in eval mode, then the identity
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    tv = math.hypot(2, 2)  # (3 - 1), (7 - 5)
    l2 = math.sqrt(1 + 9 + 25 + 49)
    expected = 2.0 * (1 + 4) + ce + 0.5 * tv + 0.25 * l2
    assert algo.inversion_loss(x, labels).item() == pytest.approx(expected, rel=1e-5)


# -- gradient checks (float64) ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "loss", "shape"),
    [
        ("onehot", onehot_loss, (4, 3)),
        ("info_entropy", info_entropy_loss, (4, 3)),
        ("activation", activation_loss, (4, 5)),
        ("total_variation_1d", total_variation, (2, 2, 6)),
        ("total_variation_2d", total_variation, (2, 1, 3, 3)),
    ],
)
def test_gradcheck_one_input(name, loss, shape):
    x = (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-5), name


def test_gradcheck_disagreement_and_bn_statistics():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: disagreement(a, b, 2.0), (s, t), eps=1e-6, atol=1e-5)
    feature = torch.randn(4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    mean, var = torch.randn(3, dtype=torch.float64, generator=g), torch.rand(3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda f: bn_statistics_loss(f, mean, var), (feature,), eps=1e-6, atol=1e-5)


# -- the generator -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 40), (2, 7), (3, 8, 6), (1, 5, 5)])
def test_generator_makes_the_data_shape(shape):
    g = Generator(shape, latent_dim=8, hidden=8)
    assert g(torch.randn(4, 8)).shape == (4, *shape)


def test_generator_refuses_other_inputs():
    with pytest.raises(KDLabError, match=r"makes 1-D signals \(C, L\) or images \(C, H, W\).*shape \(16,\)"):
        Generator((16,))


# -- what the student sees ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["dafl", "zskt", "deep_inversion"])
def test_the_student_sees_no_real_input_and_no_label(make_cfg, algorithm):
    results, objs = fdr(make_cfg, algorithm)
    step, datamodule = objs["run"].step, objs["datamodule"]
    batch = next(iter(datamodule.train_dataloader()))
    seen = []
    handle = step.student.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        out = step.outputs(batch)
    finally:
        handle.remove()
    assert "target" not in out.batch
    assert seen[0].shape == batch["input"].shape
    assert not torch.equal(seen[0], batch["input"])
    report = results["algorithm"]
    assert report["synthetic_samples"] > 0 and report["synthesis_seconds"] >= 0


def test_dafl_steps_the_generator_against_the_frozen_teacher(make_cfg):
    _, objs = fdr(make_cfg, "dafl")
    algo, step = objs["run"].algorithm, objs["run"].step
    adversary = algo.adversary()
    assert (adversary.steps, adversary.every, adversary.module) == (1, 1, algo.generator)
    out = step.outputs(next(iter(objs["datamodule"].train_dataloader())))
    terms = adversary.loss(out)
    assert set(terms) == {"onehot", "info_entropy", "activation"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in algo.generator.parameters() if p.requires_grad)
    assert all(p.grad is None for p in step.teacher.parameters())
    assert set(algo(out)) == {"kd"}  # the student's term: KL on the detached inputs, no label term


def test_zskt_cycle_one_noise_batch_per_student_steps(make_cfg):
    _, objs = fdr(make_cfg, "zskt", "algorithm.student_steps=3")
    algo = objs["run"].algorithm
    assert (algo.adversary().steps, algo.adversary().every) == (1, 3)
    batch = next(iter(objs["datamodule"].train_dataloader()))
    algo.on_epoch_start(0, 1)
    served = [algo.training_batch(batch)["input"] for _ in range(4)]
    algo.on_epoch_start(0, 1)
    first = algo.training_batch(batch)["input"]
    with torch.no_grad():  # stands for the generator's update after the cycle's first step
        for p in algo.generator.parameters():
            p.add_(0.1 * torch.randn_like(p))
    remade = algo.training_batch(batch)["input"]
    assert torch.equal(served[1], served[2])  # the rest of a cycle trains on one batch
    assert not torch.equal(served[2], served[3])  # a new cycle draws new noise
    assert not torch.equal(first, remade)  # the second step remakes G(z) after the generator's update


def test_zskt_runs_an_mlp_student_without_attention(make_cfg):
    results, _ = train(make_cfg(*CNN, "student=mlp_small", "algorithm=zskt", "algorithm.at_weight=0", "debug=fdr"))
    assert results["status"] == "finished"


def test_deep_inversion_serves_its_set_by_index_and_caches_it(make_cfg):
    results, objs = fdr(make_cfg, "deep_inversion")
    algo = objs["run"].algorithm
    assert results["algorithm"]["synthetic_samples"] == 64
    assert algo.synthetic_labels.bincount(minlength=10).tolist() == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]  # balanced
    batch = {"input": torch.zeros(2, 1, 40), "index": torch.tensor([3, 64 + 3])}
    served = algo.training_batch(batch)["input"]
    assert torch.equal(served[0], served[1]) and torch.equal(served[0], algo._inputs[3])
    again, _ = fdr(make_cfg, "deep_inversion")
    assert again["algorithm"]["synthesis_cached"] is True  # same teacher and settings: not optimized again
    other, _ = fdr(make_cfg, "deep_inversion", "algorithm.synthesis_seed=1")
    assert other["algorithm"]["synthesis_cached"] is False


def test_deep_inversion_lowers_its_loss():
    """A few iterations on a teacher with BatchNorm move the inputs toward its statistics and labels."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    teacher[1].running_mean.uniform_(-1, 1)
    teacher.eval().requires_grad_(False)
    algo = DeepInversion(num_samples=16, iterations=30, batch_size=16, jitter=0)
    algo.bind(nn.Linear(1, 1), teacher)
    algo.input_shape, algo.num_classes = (1, 8), 3
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(16) % 3)[torch.randperm(16, generator=g)]
    start = algo.inversion_loss(torch.randn(16, 1, 8, generator=g), labels).item()
    inputs, got_labels = algo._optimize(torch.device("cpu"))
    assert torch.equal(got_labels, labels)
    assert algo.inversion_loss(inputs, labels).item() < start


# -- refusals at build time -------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["dafl", "zskt", "deep_inversion"])
def test_a_label_weight_is_refused(make_cfg, algorithm, tmp_path):
    message = rf"algorithm.ce_weight=0.5, but algorithm={algorithm} is data-free.*ce_weight=0"
    with pytest.raises(KDLabError, match=message):
        train(make_cfg(*CNN, f"algorithm={algorithm}", "algorithm.ce_weight=0.5", "debug=fdr"))
    assert not (tmp_path / "teachers").exists()  # nothing was trained


def test_deep_inversion_needs_a_teacher_with_batchnorm(make_cfg, tmp_path):
    with pytest.raises(KDLabError, match=r"the teacher \(MLP\) has none. Use a teacher with BatchNorm"):
        train(make_cfg("teacher=mlp_large", "student=cnn1d_tiny", "algorithm=deep_inversion", "debug=fdr"))
    assert not (tmp_path / "teachers").exists()


def test_cross_modal_data_is_refused(make_cfg, tmp_path):
    with pytest.raises(KDLabError, match=r"algorithm=dafl makes one synthetic input for both models.*cross-modal"):
        train(make_cfg("data=fake_xmodal", "teacher=mlp_large", "algorithm=dafl", "debug=fdr"))
    assert not (tmp_path / "teachers").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("perf.view_store=true", r"perf.view_store=true, but algorithm=dafl trains on synthetic inputs"),
        ("perf.cache_teacher=true", r"perf.cache_teacher=true caches the teacher.*algorithm=dafl.*cache_teacher=false"),
    ],
)
def test_stores_of_real_teacher_outputs_are_refused(make_cfg, override, message, tmp_path):
    with pytest.raises(KDLabError, match=message):
        train(make_cfg(*CNN, "algorithm=dafl", override, "debug=fdr"))
    assert not (tmp_path / "teachers").exists()


def test_a_direct_construction_checks_bounds():
    with pytest.raises(KDLabError):
        ZSKT(student_steps=0)
    with pytest.raises(KDLabError):
        DAFL(lr=-1.0)
