"""Golden values and gradient checks for every loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import step_outputs

from kd_lab.algorithms import KD, NoDistillation, kd_loss
from kd_lab.core.tasks import cross_entropy
from kd_lab.errors import KDLabError


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computed_value():
    s, t = [1.0, 2.0, 0.5], [0.2, 3.0, -1.0]
    for temperature in (1.0, 2.0, 4.0):
        expected = temperature**2 * _kl(_softmax(t, temperature), _softmax(s, temperature))
        got = kd_loss(torch.tensor([s]), torch.tensor([t]), temperature)
        assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_fixed_values():
    # hand-computed: s = [0, 0], t = [ln 3, 0] -> p_t = [3/4, 1/4], p_s = [1/2, 1/2] at T = 1
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]]), 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.130812035941137, rel=1e-9)


def test_kd_loss_is_a_batch_mean():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    per_sample = [kd_loss(s[i : i + 1], t[i : i + 1], 3.0) for i in range(4)]
    assert kd_loss(s, t, 3.0).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-6)


def test_t_squared_keeps_soft_gradients_on_the_hard_label_scale():
    # At high T the gradient of KL(p_t^T || p_s^T) w.r.t. the logits is ~ (s - t) / (K T^2) (Hinton et al.,
    # zero-mean logits); the T^2 factor makes the gradient of kd_loss approach (s - t) / K, independent of T.
    torch.manual_seed(0)
    s, t = torch.randn(1, 5), torch.randn(1, 5)
    s, t = s - s.mean(), t - t.mean()
    grads = []
    for temperature in (50.0, 200.0):
        x = s.clone().requires_grad_(True)
        kd_loss(x, t, temperature).backward()
        grads.append(x.grad)
    expected = (s - t) / 5
    for g in grads:
        torch.testing.assert_close(g, expected, rtol=0.05, atol=1e-3)


def test_kd_loss_zero_when_student_equals_teacher():
    z = torch.randn(3, 7)
    assert kd_loss(z, z, 4.0).abs().item() < 1e-6


def test_kd_loss_gradcheck():
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 2.5), (s,))


def test_kd_algorithm_weights_terms():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    out = step_outputs(logits=s, batch={"target": y}, teacher_logits=t)
    terms = KD(ce_weight=0.1, kd_weight=0.9, temperature=4.0)(out)
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.9 * kd_loss(s, t, 4.0).item(), rel=1e-6)


def test_kd_gradients_reach_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    out = step_outputs(logits=s, batch={"target": torch.tensor([0, 1, 2, 0])}, teacher_logits=t.detach())
    sum(KD()(out).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_vanilla_is_cross_entropy():
    s, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    terms = NoDistillation()(step_outputs(logits=s, batch={"target": y}))
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_mixup_cross_entropy_golden():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    batch = {"target": torch.tensor([0, 1]), "target_mix": torch.tensor([1, 1]), "mix_lam": torch.tensor([0.25, 1.0])}
    ce = lambda z, c: -math.log(math.exp(z[c]) / sum(math.exp(v) for v in z))  # noqa: E731
    expected = (0.25 * ce([2, 0], 0) + 0.75 * ce([2, 0], 1) + ce([0, 1], 1)) / 2
    assert cross_entropy(s, batch).item() == pytest.approx(expected, rel=1e-6)


def test_kd_rejects_non_positive_temperature():
    with pytest.raises(KDLabError, match=r"algorithm.temperature=.* is out of range: it must be > 0"):
        KD(temperature=0.0)
