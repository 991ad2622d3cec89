"""Golden values, gradients and build-time errors of dkd, fitnet and attention (logit and feature methods)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import step_outputs
from torch import nn

from kd_lab.algorithms import DKD, AttentionTransfer, BuildContext, FitNet, StepOutputs, kd_loss
from kd_lab.algorithms.attention import at_loss, attention_map, attention_vector, pair_by_depth, resize_map
from kd_lab.algorithms.dkd import dkd_terms
from kd_lab.algorithms.fitnet import Regressor, hint_loss
from kd_lab.core.recorder import probe_shapes, record
from kd_lab.core.recorder import resolve_tap as resolve_stage_tap
from kd_lab.core.tasks import Classification
from kd_lab.errors import KDLabError
from kd_lab.models import MLP, CNN1d, CNN2d

CTX = BuildContext(Classification(10), num_train=100)


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _setup(algorithm, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """bind + probe + build, then one recorded step with gradients enabled on both networks."""
    algorithm.bind(student, teacher)
    algorithm.build(
        probe_shapes(student, algorithm.student_taps, x), probe_shapes(teacher, algorithm.teacher_taps, x), CTX
    )
    t_logits, t_feats = record(teacher, algorithm.teacher_taps, x)
    s_logits, s_feats = record(student, algorithm.student_taps, x)
    return step_outputs(
        logits=s_logits, batch={"target": y}, teacher_logits=t_logits, features=s_feats, teacher_features=t_feats
    )


def _check_gradient_flow(algorithm, student: nn.Module, teacher: nn.Module, out: StepOutputs, term: str):
    algorithm(out)[term].backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    for p in algorithm.parameters():  # connectors
        assert p.grad is not None and p.grad.abs().sum() > 0


# -- DKD ---------------------------------------------------------------------------------------------------
def test_dkd_hand_computed():
    # student [0, 0, 0]: p_s = 1/3 each. teacher [ln 2, ln 3, 0]: p_t = [2, 3, 1] / 6. T = 1.
    s = torch.zeros(2, 3)
    t = torch.tensor([[math.log(2), math.log(3), 0.0]] * 2)
    y = torch.tensor([0, 1])
    # y = 0: b_t = [1/3, 2/3] = b_s -> TCKD 0; non-targets [3, 1] / 4 vs [1/2, 1/2].
    # y = 1: b_t = [1/2, 1/2] vs [1/3, 2/3]; non-targets [2, 1] / 3 vs [1/2, 1/2].
    tckd_expected = (0.0 + 0.5 * math.log(1.5) + 0.5 * math.log(0.75)) / 2
    nckd_expected = (
        0.75 * math.log(1.5) + 0.25 * math.log(0.5) + 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    ) / 2
    tckd, nckd = dkd_terms(s, t, y, 1.0)
    assert tckd.item() == pytest.approx(tckd_expected, rel=1e-6)
    assert nckd.item() == pytest.approx(nckd_expected, rel=1e-6)
    assert tckd_expected == pytest.approx(0.0294457589, rel=1e-8)
    assert nckd_expected == pytest.approx(0.0937225241, rel=1e-8)


def _dkd_mdistiller(s, t, y, alpha, beta, temperature):
    """mdistiller's dkd_loss (masks and the -1000 trick), re-typed as a reference."""
    gt = torch.zeros_like(s).scatter_(1, y[:, None], 1).bool()
    other = ~gt
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)

    def cat_mask(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)

    b_s, b_t = cat_mask(p_s), cat_mask(p_t)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature**2 / len(y)
    p_t2 = F.softmax(t / temperature - 1000.0 * gt, 1)
    log_p_s2 = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / len(y)
    return alpha * tckd, beta * nckd


def test_dkd_matches_mdistiller_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g, dtype=torch.double), 3 * torch.randn(8, 10, generator=g, dtype=torch.double)
    y = torch.randint(0, 10, (8,), generator=g)
    algo = DKD(ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=0)
    terms = algo(step_outputs(logits=s, batch={"target": y}, teacher_logits=t))
    tckd, nckd = _dkd_mdistiller(s, t, y, 1.0, 8.0, 4.0)
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(tckd.item(), rel=1e-9)
    assert terms["nckd"].item() == pytest.approx(nckd.item(), rel=1e-9)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-9)


def test_dkd_decomposes_kd():
    # The paper's eq. (1): KD = TCKD + (1 - p^t_target) * NCKD, per sample (p^t at temperature T).
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.double), torch.randn(5, 7, generator=g, dtype=torch.double)
    y = torch.randint(0, 7, (5,), generator=g)
    temperature = 2.0
    for i in range(5):
        tckd, nckd = dkd_terms(s[i : i + 1], t[i : i + 1], y[i : i + 1], temperature)
        p_target = F.softmax(t[i] / temperature, 0)[y[i]]
        kd = kd_loss(s[i : i + 1], t[i : i + 1], temperature)
        assert (tckd + (1 - p_target) * nckd).item() == pytest.approx(kd.item(), rel=1e-9)


def test_dkd_mixup_mixes_the_two_labels_per_sample():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 5, generator=g, dtype=torch.double), torch.randn(4, 5, generator=g, dtype=torch.double)
    y, y2 = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 1, 0, 2])
    lam = torch.tensor([0.9, 0.5, 0.2, 1.0], dtype=torch.double)
    tckd, nckd = dkd_terms(s, t, y, 3.0, lam, y2)
    exp_t, exp_n = 0.0, 0.0
    for i in range(4):
        a = dkd_terms(s[i : i + 1], t[i : i + 1], y[i : i + 1], 3.0)
        b = dkd_terms(s[i : i + 1], t[i : i + 1], y2[i : i + 1], 3.0)
        exp_t += (lam[i] * a[0] + (1 - lam[i]) * b[0]).item() / 4
        exp_n += (lam[i] * a[1] + (1 - lam[i]) * b[1]).item() / 4
    assert tckd.item() == pytest.approx(exp_t, rel=1e-9)
    assert nckd.item() == pytest.approx(exp_n, rel=1e-9)


def test_dkd_warmup_factor():
    algo = DKD(warmup_epochs=4)
    assert algo.warmup_factor == pytest.approx(0.25)  # before any on_epoch_start call: epoch 0, never 0
    factors = []
    for epoch in range(6):
        algo.on_epoch_start(epoch, 6)
        factors.append(algo.warmup_factor)
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert DKD(warmup_epochs=0).warmup_factor == 1.0
    # the factor scales both KD terms, not CE
    g = torch.Generator().manual_seed(3)
    out = step_outputs(
        logits=torch.randn(4, 6, generator=g),
        batch={"target": torch.tensor([0, 1, 2, 3])},
        teacher_logits=torch.randn(4, 6, generator=g),
    )
    algo.on_epoch_start(0, 6)
    early = algo(out)
    algo.on_epoch_start(5, 6)
    late = algo(out)
    assert early["ce"].item() == pytest.approx(late["ce"].item())
    for name in ("tckd", "nckd"):
        assert early[name].item() == pytest.approx(0.25 * late[name].item(), rel=1e-6)


def test_dkd_rejects_bad_hyperparameters():
    with pytest.raises(KDLabError, match=r"algorithm.temperature=.* is out of range: it must be > 0"):
        DKD(temperature=0.0)
    with pytest.raises(KDLabError, match=r"algorithm.warmup_epochs=-1 is out of range: it must be >= 0"):
        DKD(warmup_epochs=-1)


def test_dkd_gradcheck():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 4, generator=g, dtype=torch.double, requires_grad=True)
    t = torch.randn(3, 4, generator=g, dtype=torch.double)
    y = torch.tensor([0, 3, 1])
    lam = torch.tensor([0.3, 0.8, 0.5], dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: sum(dkd_terms(x, t, y, 2.0)), (s,))
    assert torch.autograd.gradcheck(lambda x: sum(dkd_terms(x, t, y, 2.0, lam, y.flip(0))), (s,))


def test_dkd_gradients_reach_the_student_only():
    torch.manual_seed(0)
    student, teacher = MLP([1, 12], 5, hidden=[8]), CNN1d([1, 12], 5, channels=[4, 4])
    x, y = torch.randn(6, 1, 12), torch.randint(0, 5, (6,))
    algo = DKD(warmup_epochs=0)
    out = _setup(algo, student, teacher, x, y)
    _check_gradient_flow(algo, student, teacher, out, "nckd")


# -- FitNet ------------------------------------------------------------------------------------------------
def test_fitnet_default_taps_are_the_middle_stage():
    cnn3, mlp1, mlp2 = (
        CNN1d([1, 16], 3, channels=[4, 4, 4]),
        MLP([1, 16], 3, hidden=[8]),
        MLP([1, 16], 3, hidden=[8, 8]),
    )
    assert resolve_stage_tap(cnn3, "middle", "teacher") == "blocks.1"
    assert resolve_stage_tap(mlp1, "middle", "student") == "layers.0"
    assert resolve_stage_tap(mlp2, "middle", "student") == "layers.1"
    assert resolve_stage_tap(cnn3, -1, "teacher") == "blocks.2"
    with pytest.raises(KDLabError, match="declares no stage_taps"):
        resolve_stage_tap(nn.Sequential(nn.Linear(2, 2)), "middle", "student")


def test_fitnet_hand_computed_vectors():
    reg = Regressor(torch.Size([2, 2]), torch.Size([2, 1]))
    with torch.no_grad():
        reg.proj.weight.copy_(torch.tensor([[1.0, -1.0]]))
        reg.proj.bias.fill_(0.5)
    f_s = torch.tensor([[3.0, 1.0], [0.0, 2.0]])  # -> [2.5], [-1.5]
    f_t = torch.tensor([[2.0], [0.5]])
    assert hint_loss(reg(f_s), reg.target(f_t)).item() == pytest.approx((0.25 + 4.0) / 2)


def test_fitnet_hand_computed_maps_with_pooling():
    # 1x1 conv C_s=1 -> C_t=1 (weight 2, bias 0), student length 4 pooled to the teacher's 2.
    reg = Regressor(torch.Size([1, 1, 4]), torch.Size([1, 1, 2]))
    with torch.no_grad():
        reg.proj.weight.fill_(2.0)
        reg.proj.bias.zero_()
    f_s = torch.tensor([[[1.0, 3.0, 0.0, 4.0]]])  # conv -> [2, 6, 0, 8] -> pooled [4, 4]
    f_t = torch.tensor([[[1.0, 5.0]]])
    assert reg(f_s).tolist() == [[[4.0, 4.0]]]
    assert hint_loss(reg(f_s), reg.target(f_t)).item() == pytest.approx((9.0 + 1.0) / 2)


def test_fitnet_map_facing_vector_is_pooled():
    # MLP student (vector) vs CNN teacher (map): the teacher's map is averaged over length.
    reg = Regressor(torch.Size([1, 2]), torch.Size([1, 2, 3]))
    with torch.no_grad():
        reg.proj.weight.copy_(torch.eye(2))
        reg.proj.bias.zero_()
    f_t = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]])  # -> [2, 2]
    f_s = torch.tensor([[1.0, 4.0]])
    assert reg.target(f_t).tolist() == [[2.0, 2.0]]
    assert hint_loss(reg(f_s), reg.target(f_t)).item() == pytest.approx((1.0 + 4.0) / 2)
    # CNN student (map) vs MLP teacher (vector): the student's map is pooled, then the linear layer.
    reg = Regressor(torch.Size([1, 2, 3]), torch.Size([1, 2]))
    with torch.no_grad():
        reg.proj.weight.copy_(torch.eye(2))
        reg.proj.bias.zero_()
    assert reg(f_t).tolist() == [[2.0, 2.0]]


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "out_shape"),
    [
        ((2, 8, 40), (2, 16, 20), (2, 16, 20)),  # conv + pool down
        ((2, 8, 10), (2, 16, 20), (2, 16, 20)),  # conv + pool "up" (repetition)
        ((2, 8, 40), (2, 16, 40), (2, 16, 40)),  # conv only
        ((2, 8, 6, 6), (2, 4, 3, 3), (2, 4, 3, 3)),  # 2-D maps
        ((2, 32), (2, 16, 20), (2, 16)),  # MLP student, CNN teacher
        ((2, 8, 40), (2, 64), (2, 64)),  # CNN student, MLP teacher
        ((2, 8, 40), (2, 4, 3, 3), (2, 4)),  # 1-D vs 2-D maps: both pooled
    ],
)
def test_fitnet_regressor_shapes(s_shape, t_shape, out_shape):
    reg = Regressor(torch.Size(s_shape), torch.Size(t_shape))
    y = reg(torch.randn(s_shape))
    assert y.shape == out_shape == reg.target(torch.randn(t_shape)).shape


def test_fitnet_fixed_seed_reference():
    # A CNN pair with different lengths, against an independent loop re-implementation of conv1x1 + pooling.
    g = torch.Generator().manual_seed(5)
    f_s, f_t = (
        torch.randn(2, 3, 6, generator=g, dtype=torch.double),
        torch.randn(2, 2, 3, generator=g, dtype=torch.double),
    )
    reg = Regressor(f_s.shape, f_t.shape).double()
    w, b = reg.proj.weight[:, :, 0].tolist(), reg.proj.bias.tolist()
    total = 0.0
    for n in range(2):
        for o in range(2):
            conv = [sum(w[o][c] * f_s[n, c, i].item() for c in range(3)) + b[o] for i in range(6)]
            pooled = [(conv[2 * j] + conv[2 * j + 1]) / 2 for j in range(3)]
            total += sum((pooled[j] - f_t[n, o, j].item()) ** 2 for j in range(3))
    algo = FitNet(ce_weight=0.0, hint_weight=100.0)
    algo.paths, algo.regressor = ("s", "t"), reg
    out = step_outputs(logits=torch.zeros(2, 3), batch={}, features={"s": f_s}, teacher_features={"t": f_t})
    terms = algo(out)
    assert set(terms) == {"hint"}
    assert terms["hint"].item() == pytest.approx(100.0 * total / 12, rel=1e-9)


def test_fitnet_gradcheck():
    g = torch.Generator().manual_seed(6)
    f_t = torch.randn(2, 3, 4, generator=g, dtype=torch.double)
    for s_shape in ((2, 2, 8), (2, 5)):  # conv + pooling; linear on a vector against a pooled map
        reg = Regressor(torch.Size(s_shape), f_t.shape).double()
        f_s = torch.randn(s_shape, generator=g, dtype=torch.double, requires_grad=True)
        w, b = (p.detach().clone().requires_grad_(True) for p in (reg.proj.weight, reg.proj.bias))

        def fn(x, w, b, reg=reg):
            y = torch.func.functional_call(reg, {"proj.weight": w, "proj.bias": b}, (x,))
            return hint_loss(y, reg.target(f_t))

        assert torch.autograd.gradcheck(fn, (f_s, w, b))


@pytest.mark.parametrize("student_family", ["mlp", "cnn"])
def test_fitnet_gradients_reach_student_and_regressor_only(student_family):
    torch.manual_seed(0)
    student = MLP([1, 12], 5, hidden=[8]) if student_family == "mlp" else CNN1d([1, 12], 5, channels=[3, 3, 3])
    teacher = CNN1d([1, 12], 5, channels=[4, 6, 6])
    x, y = torch.randn(6, 1, 12), torch.randint(0, 5, (6,))
    algo = FitNet()
    out = _setup(algo, student, teacher, x, y)
    assert algo.paths[1] == "blocks.1"
    _check_gradient_flow(algo, student, teacher, out, "hint")


# -- Attention transfer ------------------------------------------------------------------------------------
def test_attention_hand_computed():
    # student (1, 2 channels, 2): |f|^2 averaged over channels = [(1 + 9) / 2, (4 + 0) / 2] = [5, 2]
    f_s = torch.tensor([[[1.0, 2.0], [-3.0, 0.0]]])
    f_t = torch.tensor([[[1.0, -1.0]]])  # -> [1, 1]
    expected = ((5 / math.sqrt(29) - 1 / math.sqrt(2)) ** 2 + (2 / math.sqrt(29) - 1 / math.sqrt(2)) ** 2) / 2
    assert at_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.0808549700, rel=1e-8)
    assert attention_map(f_s).tolist() == [[5.0, 2.0]]


def test_attention_resizes_the_student_map_linearly():
    # align_corners=False: length 2 -> 4 samples at -0.25, 0.25, 0.75, 1.25 (clamped at the ends)
    a = torch.tensor([[4.0, 8.0]])
    assert resize_map(a, (4,)).tolist() == [[4.0, 5.0, 7.0, 8.0]]


def _linear_resize_1d(v: list[float], n_out: int) -> list[float]:
    """Independent 1-D linear interpolation with align_corners=False (half-pixel centres, clamped)."""
    n_in, out = len(v), []
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(math.floor(x), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        out.append(v[lo] + (x - lo) * (v[hi] - v[lo]))
    return out


def _at_loop(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """Loop re-implementation for 2-D maps: attention, separable bilinear resize, L2-normalize, mean sq. diff."""
    total, count = 0.0, 0
    for n in range(f_s.shape[0]):
        a_s = (f_s[n] ** 2).mean(0).tolist()
        a_t = (f_t[n] ** 2).mean(0).tolist()
        h, w = len(a_t), len(a_t[0])
        rows = [_linear_resize_1d(r, w) for r in a_s]
        cols = [_linear_resize_1d([rows[i][j] for i in range(len(rows))], h) for j in range(w)]
        a_s = [[cols[j][i] for j in range(w)] for i in range(h)]
        v_s, v_t = [x for r in a_s for x in r], [x for r in a_t for x in r]
        n_s, n_t = math.sqrt(sum(x * x for x in v_s)), math.sqrt(sum(x * x for x in v_t))
        total += sum((x / n_s - z / n_t) ** 2 for x, z in zip(v_s, v_t, strict=True))
        count += len(v_t)
    return total / count


def test_attention_fixed_seed_2d_with_resize():
    g = torch.Generator().manual_seed(7)
    f_s = torch.randn(2, 3, 3, 5, generator=g, dtype=torch.double)
    f_t = torch.randn(2, 4, 6, 4, generator=g, dtype=torch.double)
    assert at_loss(f_s, f_t).item() == pytest.approx(_at_loop(f_s, f_t), rel=1e-9)


def test_attention_vector_is_unit_norm():
    v = attention_vector(attention_map(torch.randn(3, 4, 5, 6)))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize(
    ("n_s", "n_t", "pairs"),
    [
        (3, 3, [(0, 0), (1, 1), (2, 2)]),
        (2, 3, [(0, 0), (1, 2)]),
        (3, 2, [(0, 0), (2, 1)]),
        (1, 3, [(0, 2)]),
        (4, 3, [(0, 0), (2, 1), (3, 2)]),
        (3, 5, [(0, 0), (1, 2), (2, 4)]),
    ],
)
def test_attention_pairs_by_relative_depth(n_s, n_t, pairs):
    assert pair_by_depth(n_s, n_t) == pairs


def test_attention_algorithm_sums_pairs_with_half_weight():
    torch.manual_seed(0)
    student, teacher = CNN1d([1, 16], 4, channels=[3, 3]), CNN1d([1, 16], 4, channels=[5, 5, 5])
    x, y = torch.randn(4, 1, 16), torch.randint(0, 4, (4,))
    algo = AttentionTransfer(ce_weight=0.0, at_weight=1000.0)
    out = _setup(algo, student, teacher, x, y)
    assert algo.pairs == [("blocks.0", "blocks.0"), ("blocks.1", "blocks.2")]
    # blocks.1 of the student has length 8, blocks.2 of the teacher 4: resized
    expected = sum(
        _at_loop(out.features[s].detach().double()[..., None], out.teacher_features[t].double()[..., None])
        for s, t in algo.pairs
    )
    terms = algo(out)
    assert set(terms) == {"at"}
    assert terms["at"].item() == pytest.approx(500.0 * expected, rel=1e-5)


def test_attention_gradcheck():
    g = torch.Generator().manual_seed(8)
    f_t1, f_t2 = (
        torch.randn(2, 3, 6, generator=g, dtype=torch.double),
        torch.randn(2, 2, 3, 3, generator=g, dtype=torch.double),
    )
    x1 = torch.randn(2, 2, 4, generator=g, dtype=torch.double, requires_grad=True)  # 1-D, resized 4 -> 6
    x2 = torch.randn(2, 4, 2, 2, generator=g, dtype=torch.double, requires_grad=True)  # 2-D, resized 2x2 -> 3x3
    assert torch.autograd.gradcheck(lambda a, b: at_loss(a, f_t1) + at_loss(b, f_t2), (x1, x2))


def test_attention_gradients_reach_the_student_only():
    torch.manual_seed(0)
    student, teacher = CNN1d([1, 12], 5, channels=[3, 3, 3]), CNN1d([1, 12], 5, channels=[4, 4, 4])
    x, y = torch.randn(6, 1, 12), torch.randint(0, 5, (6,))
    algo = AttentionTransfer()
    out = _setup(algo, student, teacher, x, y)
    _check_gradient_flow(algo, student, teacher, out, "at")


@pytest.mark.parametrize(("student", "role"), [("mlp", "student"), ("cnn", "teacher")])
def test_attention_needs_maps_on_both_sides(student, role):
    x = torch.randn(2, 1, 12)
    if student == "mlp":
        s, t = MLP([1, 12], 5, hidden=[8]), CNN1d([1, 12], 5, channels=[4, 4])
    else:
        s, t = CNN1d([1, 12], 5, channels=[4, 4]), MLP([1, 12], 5, hidden=[8])
    algo = AttentionTransfer()
    algo.bind(s, t)
    with pytest.raises(
        KDLabError, match=rf"attention transfer needs spatial feature maps.*{role} tap.*algorithm=fitnet or kd"
    ):
        algo.build(probe_shapes(s, algo.student_taps, x), probe_shapes(t, algo.teacher_taps, x), CTX)


def test_attention_rejects_1d_against_2d_maps():
    s, t = CNN1d([1, 8], 5, channels=[4]), CNN2d([1, 8, 8], 5, channels=[4])
    algo = AttentionTransfer()
    algo.bind(s, t)
    with pytest.raises(KDLabError, match="cannot compare a 1-D student map"):
        algo.build(
            probe_shapes(s, algo.student_taps, torch.randn(2, 1, 8)),
            probe_shapes(t, algo.teacher_taps, torch.randn(2, 1, 8, 8)),
            CTX,
        )


def test_attention_rejects_bad_p():
    with pytest.raises(KDLabError, match=r"algorithm.p=.* is out of range: it must be > 0"):
        AttentionTransfer(p=0.0)
