"""Tf-KD (reg and self), activation boundaries and IRG: golden values, gradients, schedules and refusals.

The golden values are computed by hand below, with ``math`` on a few numbers, not with the code under test."""

import math

import pytest
import torch
from torch import nn

from kd_lab.algorithms.activation_boundary import ActivationBoundary, Connector, ab_loss, pre_activation_path
from kd_lab.algorithms.base import StepOutputs
from kd_lab.algorithms.irg import IRG, edge_matrix, irg_losses, match_layers, transformation_vector
from kd_lab.algorithms.tf_kd import TfKDReg, TfKDSelf, architecture_difference, tf_kd_reg_loss
from kd_lab.errors import KDLabError
from kd_lab.models import MLP, CNN1d
from kd_lab.run.train import train


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


# -- Tf-KD_reg ---------------------------------------------------------------------------------------------
def test_tf_kd_reg_paper_form_golden():
    """One sample, K = 3, label 0, a = 0.8, T = 2: p^d = (0.8, 0.1, 0.1) softened to p^d^(1/2) normalized."""
    s, a, t = [1.0, -0.5, 0.25], 0.8, 2.0
    root = [math.sqrt(p) for p in (a, 0.1, 0.1)]
    q_t = [r / sum(root) for r in root]
    q_s = _softmax([v / t for v in s])
    expected = t**2 * sum(p * math.log(p / q) for p, q in zip(q_t, q_s, strict=True))
    got = tf_kd_reg_loss(torch.tensor([s], dtype=torch.float64), torch.tensor([0]), a, t, "paper")
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tf_kd_reg_code_form_golden():
    """The reference code's target: softmax(p^d / T), against the student at T = 1, no T^2."""
    s, a, t = [1.0, -0.5, 0.25], 0.8, 2.0
    q_t = _softmax([p / t for p in (a, 0.1, 0.1)])
    q_s = _softmax(s)
    expected = sum(p * math.log(p / q) for p, q in zip(q_t, q_s, strict=True))
    got = tf_kd_reg_loss(torch.tensor([s], dtype=torch.float64), torch.tensor([0]), a, t, "code")
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("form", ["paper", "code"])
def test_tf_kd_reg_gradcheck(form):
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 4])
    assert torch.autograd.gradcheck(lambda x: tf_kd_reg_loss(x, y, 0.9, 3.0, form), (s,))


def test_tf_kd_reg_refuses_bad_values():
    with pytest.raises(KDLabError, match=r"algorithm.form='papr' is not a Tf-KD_reg form.*algorithm.form=paper"):
        TfKDReg(form="papr")
    with pytest.raises(KDLabError, match=r"algorithm.correct_prob=1.0 must be in \(0, 1\).*correct_prob=0.99"):
        TfKDReg(correct_prob=1.0)


def test_tf_kd_reg_refuses_a_teacher_that_prefers_no_class(make_cfg, tmp_path):
    """a <= 1/K is refused when the build knows K (10 classes here), before any compute."""
    cfg = make_cfg("scheme=self", "algorithm=tf_kd_reg", "algorithm.correct_prob=0.05", "debug=fdr")
    with pytest.raises(KDLabError, match=r"correct_prob=0.05 is not above 1/K = 0.1 for the data's 10 classes"):
        train(cfg)
    assert not (tmp_path / "teachers").exists()


# -- Tf-KD_self --------------------------------------------------------------------------------------------
def test_tf_kd_self_compares_architectures():
    a, b = MLP([1, 40], 10, [32]), MLP([1, 40], 10, [32])
    assert architecture_difference(a, b) is None
    why = architecture_difference(a, MLP([1, 40], 10, [16]))
    assert "'head.weight' has shape (10, 32) in the student and (10, 16)" in why
    why = architecture_difference(a, CNN1d([1, 40], 10, [8]))
    assert "the student's class is MLP and the teacher's is CNN1d" in why


def test_tf_kd_self_refuses_another_architecture_before_compute(make_cfg, tmp_path):
    cfg = make_cfg("algorithm=tf_kd_self", "debug=fdr")  # FAST: teacher mlp_large, student mlp_small
    with pytest.raises(KDLabError, match=r"tf_kd_self needs a teacher of the student's own architecture.*born_again"):
        train(cfg)
    assert not (tmp_path / "teachers").exists()  # nothing was trained


def test_tf_kd_self_runs_as_a_born_again_chain(make_cfg):
    """Generation 0 (the student, algorithm=none) teaches the run: the documented command."""
    results, objs = train(make_cfg("chain=born_again", "algorithm=tf_kd_self", "trainer.max_epochs=1"))
    assert results["status"] == "finished"
    assert [s["stage"] for s in results["chain"]] == ["gen0-mlp_small"]
    assert architecture_difference(objs["module"].student, objs["module"].teacher) is None


def test_tf_kd_self_term_is_kd():
    algo = TfKDSelf(ce_weight=0.0, kd_weight=2.0, temperature=1.0)
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    p = _softmax([1.0, 0.0])
    q = _softmax([0.0, 1.0])
    expected = 2.0 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    out = StepOutputs(logits=s, batch={"target": torch.tensor([0])}, teacher_logits=t)
    assert algo(out)["kd"].item() == pytest.approx(expected, rel=1e-6)


# -- activation boundaries ---------------------------------------------------------------------------------
def test_ab_loss_golden():
    """m = 1; sample 1: r = (-2, -0.5, 0.5, 2) against t = (-, -, +, +): 0 + 0.5^2 + 0.5^2 + 0 = 0.5;
    sample 2: r = (0, 0, 0, 0): 1 + 1 + 1 + 1 = 4. The batch mean is 2.25."""
    r = torch.tensor([[-2.0, -0.5, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [-1.0, 0.0, 1.0, 1.0]])
    assert ab_loss(r, t, 1.0).item() == pytest.approx(2.25)


def test_ab_gradcheck():
    r = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ab_loss(x, t, 0.5), (r,))


def test_ab_taps_pre_relu_responses():
    cnn, mlp = CNN1d([1, 40], 10, [8, 8]), MLP([1, 40], 10, [16, 16])
    assert pre_activation_path(cnn, "blocks.1", "teacher") == "blocks.1.1"  # the BatchNorm
    assert pre_activation_path(mlp, "layers.0", "student") == "layers.0.0"  # the Linear
    algo = ActivationBoundary()
    algo.bind(MLP([1, 40], 10, [16]), cnn)  # one MLP layer meets the deepest block
    assert algo.paths == (["layers.0.0"], ["blocks.1.1"])


class _TanhNet(nn.Module):
    """A stage that ends in Tanh: no ReLU, so no pre-activation tap."""

    def __init__(self):
        super().__init__()
        self.stage_taps = ["body.0"]
        self.body = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))

    def forward(self, x):
        return self.body(x)


def test_ab_refuses_a_model_without_a_pre_activation_tap():
    with pytest.raises(KDLabError, match=r"stage 'body.0' \(Sequential\) does not end with an nn.ReLU.*student_taps"):
        ActivationBoundary().bind(_TanhNet(), CNN1d([1, 40], 10, [8]))


def test_ab_connector_reaches_every_teacher_neuron():
    """A vector student under a map teacher: a linear map to all C x L neurons; maps: a 1x1 conv, pooled."""
    vec = Connector(torch.Size([2, 16]), torch.Size([2, 8, 5]))
    assert vec(torch.randn(4, 16)).shape == vec.target(torch.randn(4, 8, 5)).shape == (4, 40)
    maps = Connector(torch.Size([2, 4, 10]), torch.Size([2, 8, 5]))
    assert maps(torch.randn(4, 4, 10)).shape == (4, 8, 5)


def _ab_outputs(algo):
    s, t = MLP([1, 6], 3, [4]), MLP([1, 6], 3, [5])
    algo.bind(s, t)
    algo.build({"layers.0.0": torch.Size([2, 4])}, {"layers.0.0": torch.Size([2, 5])}, None)
    feats = {"layers.0.0": torch.randn(3, 4)}
    return StepOutputs(
        logits=torch.randn(3, 3),
        batch={"target": torch.tensor([0, 1, 2])},
        teacher_logits=torch.randn(3, 3),
        features=feats,
        teacher_features={"layers.0.0": torch.randn(3, 5)},
        task=_task(),
    )


def _task():
    from kd_lab.core.tasks.classification import Classification

    return Classification(num_classes=3)


def test_ab_initialization_then_task_loss():
    algo = ActivationBoundary(init_epochs=2)
    out = _ab_outputs(algo)
    algo.on_epoch_start(1, 10)
    assert set(algo(out)) == {"ab"}  # the initialization: the AB term alone
    algo.on_epoch_start(2, 10)
    assert set(algo(out)) == {"ce"}  # then the task loss, without AB
    joint = ActivationBoundary(init_epochs=0, joint=True, kd_weight=1.0)
    out = _ab_outputs(joint)
    joint.on_epoch_start(0, 10)
    assert set(joint(out)) == {"ce", "kd", "ab"}


# -- IRG ---------------------------------------------------------------------------------------------------
def test_irg_edge_golden():
    """Points 0, 1, 3 (student) and 0, 2, 3 (teacher): squared distances (1, 9, 4) and (4, 9, 1), over 9;
    the 9-entry MSE is 4 (3/9)^2 / 9 = 4/81."""
    s, t = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.0], [2.0], [3.0]])
    assert edge_matrix(s)[0].tolist() == pytest.approx([0, 1 / 9, 1])
    got = torch.nn.functional.mse_loss(edge_matrix(s), edge_matrix(t))
    assert got.item() == pytest.approx(4 / 81)


def test_irg_transformation_golden():
    """Early (B, 2, 2) is pooled to length 1, then its 2 channels are averaged to the late map's 1.
    Instance 1: mean(1, 2, 3, 4) = 2.5 vs 0.5 -> 4; instance 2: 0 vs 1 -> 1. Over the max: (1, 0.25)."""
    early = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    late = torch.tensor([[[0.5]], [[1.0]]])
    a, b = match_layers(early, late)
    assert a.shape == b.shape == (2, 1, 1)
    assert transformation_vector(early, late).tolist() == pytest.approx([1.0, 0.25])


def test_irg_gradcheck():
    torch.manual_seed(0)
    s = [torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True), torch.randn(5, 4, 3, dtype=torch.float64)]
    s[1].requires_grad_(True)
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = [torch.randn(5, 8, 6, dtype=torch.float64), torch.randn(5, 8, 3, dtype=torch.float64)]
    zt = torch.randn(5, 3, dtype=torch.float64)

    def loss(z, a, b):
        terms = irg_losses(z, zt, [a, b], t, (a, b), tuple(t))
        return terms["vertex"] + terms["edge"] + terms["transformation"]

    assert torch.autograd.gradcheck(loss, (z, *s))


def test_irg_refusals():
    with pytest.raises(KDLabError, match=r"layers of 6 and 4 channels; 6 is not a multiple of 4.*weight=0"):
        match_layers(torch.zeros(2, 6, 4), torch.zeros(2, 4, 4))
    with pytest.raises(KDLabError, match=r"got 2 student layers .* and 1 teacher layers.*teacher_layers"):
        IRG(teacher_layers=[-1]).bind(CNN1d([1, 40], 10, [8, 8]), CNN1d([1, 40], 10, [8, 8]))
    with pytest.raises(KDLabError, match=r"the student \(MLP\) has one stage \['layers.0'\].*transformation_weight=0"):
        IRG().bind(MLP([1, 40], 10, [8]), CNN1d([1, 40], 10, [8, 8]))


def test_irg_without_transformation_on_a_one_layer_mlp(make_cfg):
    cfg = make_cfg("algorithm=irg", "algorithm.transformation_weight=0", "algorithm.layers=[-1]", "debug=fdr")
    results, _ = train(cfg)
    assert results["status"] == "finished"
