"""Golden values, gradients and invariants of sp, rkd, pkt and crd (relational and contrastive methods)."""

import copy
import itertools
import logging
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import step_outputs

import kd_lab.algorithms.crd as crd_mod
from kd_lab.algorithms import CRD, PKT, RKD, SP, BuildContext, StepOutputs
from kd_lab.algorithms.crd import (
    class_tables,
    contrast_scores,
    gather_from_all_ranks,
    momentum_update,
    nce_loss,
    sample_negatives,
)
from kd_lab.algorithms.pkt import cosine_conditional_probabilities, pkt_loss
from kd_lab.algorithms.rkd import (
    _AngleLoss,
    rkd_angle_loss,
    rkd_angle_potentials,
    rkd_distance_loss,
    rkd_distance_potentials,
)
from kd_lab.algorithms.sp import similarity_matrix, sp_loss
from kd_lab.core.recorder import probe_shapes, record
from kd_lab.core.tasks import Classification
from kd_lab.errors import KDLabError
from kd_lab.models import MLP, CNN1d


def _smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _rotation(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.double))
    return q


# -- SP ----------------------------------------------------------------------------------------------------
def test_sp_hand_computed():
    # G_s = [[1, 1], [1, 2]] -> rows [1, 1]/sqrt2, [1, 2]/sqrt5; G_t = I. ||diff||^2 = 4 - sqrt2 - 4/sqrt5; / b^2
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = (4 - math.sqrt(2) - 4 / math.sqrt(5)) / 4
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.199233013907, rel=1e-9)


def _sp_loop(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = len(fs)
    fs, ft = fs.reshape(b, -1).tolist(), ft.reshape(b, -1).tolist()

    def gram_rows(f):
        g = [[sum(x * y for x, y in zip(f[i], f[j], strict=True)) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram_rows(fs), gram_rows(ft)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_matches_loop_reference_on_any_shapes():
    torch.manual_seed(0)
    fs, ft = torch.randn(6, 3, 5), torch.randn(6, 7)  # a feature map and a vector, of different sizes
    assert sp_loss(fs, ft).item() == pytest.approx(_sp_loop(fs, ft), rel=1e-5)
    assert similarity_matrix(fs).shape == (6, 6)


def test_sp_invariants():
    torch.manual_seed(0)
    f, g = torch.randn(5, 4, 3), torch.randn(5, 8)
    assert sp_loss(f, f).item() == 0.0
    assert sp_loss(3.0 * f, f).item() == pytest.approx(0.0, abs=1e-10)  # scale-invariant (rows normalized)
    assert sp_loss(f, g).item() > 1e-3


def test_sp_gradcheck():
    s = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: sp_loss(x, t), (s,))


# -- RKD ---------------------------------------------------------------------------------------------------
S3 = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # a 3-4-5 right triangle
T3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # an isosceles right triangle


def test_rkd_distance_hand_computed():
    # student distances 3, 4, 5 (mean 4) -> 0.75, 1, 1.25; teacher 1, 1, sqrt2 (mean (2 + sqrt2) / 3)
    mu_t = (2 + math.sqrt(2)) / 3
    diffs = [0.75 - 1 / mu_t, 1.0 - 1 / mu_t, 1.25 - math.sqrt(2) / mu_t]
    expected = 2 * sum(_smooth_l1(d) for d in diffs) / 9  # each pair twice; 9 entries (diagonal 0 - 0)
    assert rkd_distance_loss(S3, T3).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(rkd_distance_potentials(S3)[0], torch.tensor([0.0, 0.75, 1.0]))


def test_rkd_angle_hand_computed():
    # cosines at the vertices: student 0, 3/5, 4/5; teacher 0, 1/sqrt2, 1/sqrt2. Entries [i, j, k] with j != k,
    # both != i, hold the cosine at i (twice per vertex); [i, j, j] = 1 and entries touching i are 0 in both.
    diffs = [0.6 - 1 / math.sqrt(2), 0.8 - 1 / math.sqrt(2)]
    expected = 2 * sum(_smooth_l1(d) for d in diffs) / 27
    assert rkd_angle_loss(S3, T3).item() == pytest.approx(expected, rel=1e-5)
    a = rkd_angle_potentials(S3)
    assert a[1, 0, 2].item() == pytest.approx(0.6, rel=1e-6) and a[0, 1, 2].item() == pytest.approx(0.0, abs=1e-7)


def _rkd_loop(fs: torch.Tensor, ft: torch.Tensor) -> tuple[float, float]:
    """RepDistiller's definitions, one entry at a time (d[d > 0].mean() normalization, all b^3 angle entries)."""
    b = len(fs)

    def dist(f):
        return [[math.dist(f[i], f[j]) for j in range(b)] for i in range(b)]

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v] if n > 0 else [0.0] * len(v)

    def angle(f, i, j, k):
        u = unit([a - c for a, c in zip(f[j], f[i], strict=True)])
        w = unit([a - c for a, c in zip(f[k], f[i], strict=True)])
        return sum(x * y for x, y in zip(u, w, strict=True))

    s, t = fs.tolist(), ft.tolist()
    ds, dt = dist(s), dist(t)
    mean_s = sum(v for row in ds for v in row if v > 0) / sum(1 for row in ds for v in row if v > 0)
    mean_t = sum(v for row in dt for v in row if v > 0) / sum(1 for row in dt for v in row if v > 0)
    loss_d = sum(_smooth_l1(ds[i][j] / mean_s - dt[i][j] / mean_t) for i in range(b) for j in range(b)) / b**2
    triples = list(itertools.product(range(b), repeat=3))
    loss_a = sum(_smooth_l1(angle(s, *ijk) - angle(t, *ijk)) for ijk in triples) / b**3
    return loss_d, loss_a


def test_rkd_matches_loop_reference():
    torch.manual_seed(0)
    fs, ft = torch.randn(5, 3), torch.randn(5, 6)
    loss_d, loss_a = _rkd_loop(fs, ft)
    assert rkd_distance_loss(fs, ft).item() == pytest.approx(loss_d, rel=1e-5)
    assert rkd_angle_loss(fs, ft).item() == pytest.approx(loss_a, rel=1e-5)
    # the algorithm weights the two terms
    algo = RKD(ce_weight=0.0, rkd_weight=2.0, distance_weight=25.0, angle_weight=50.0)
    algo.paths = ("s", "t")
    out = step_outputs(logits=torch.zeros(5, 2), batch={}, features={"s": fs}, teacher_features={"t": ft})
    terms = algo(out)
    assert terms["rkd_distance"].item() == pytest.approx(50 * loss_d, rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(100 * loss_a, rel=1e-5)


def test_rkd_invariants():
    torch.manual_seed(0)
    f = torch.randn(6, 4, dtype=torch.double)
    similar = 2.5 * f @ _rotation(4) + 1.0  # scaled, rotated, translated: same relations
    for loss in (rkd_distance_loss, rkd_angle_loss):
        assert loss(f, f).item() == 0.0
        assert loss(similar, f).item() == pytest.approx(0.0, abs=1e-12)
        assert loss(torch.randn(6, 4, dtype=torch.double), f).item() > 1e-3


def test_rkd_gradcheck():
    s = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: rkd_distance_loss(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: rkd_angle_loss(x, t), (s,))


def test_rkd_angle_loss_blocked_backward_past_one_block():
    # b = 19: two full blocks of _AngleLoss.ROWS = 8 rows and a partial one. Gradients on both sides
    # (online schemes train the teacher too), against finite differences and against autograd on the whole tensor.
    assert 2 * _AngleLoss.ROWS < 19
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(19, 5, dtype=torch.double, generator=gen).requires_grad_()
    t = torch.randn(19, 3, dtype=torch.double, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(rkd_angle_loss, (s, t))
    whole = F.smooth_l1_loss(rkd_angle_potentials(s), rkd_angle_potentials(t))
    blocked = rkd_angle_loss(s, t)
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=0)
    for got, want in zip(torch.autograd.grad(blocked, (s, t)), torch.autograd.grad(whole, (s, t)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_rkd_gradient_finite_with_duplicate_samples():
    s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    (rkd_distance_loss(s, torch.randn(3, 4)) + rkd_angle_loss(s, torch.randn(3, 4))).backward()
    assert torch.isfinite(s.grad).all()


# The direct forms, as rkd.py computed them before the Gram form: the reference the Gram form must match.
def _direct_distance_potentials(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    d = d * (1 - torch.eye(len(e), dtype=e.dtype))
    b = len(e)
    return d / (d.sum() / (b * (b - 1)))


def _direct_angle_potentials(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (b, b, D) unit vectors from e_i to e_j
    return diff @ diff.transpose(1, 2)


def _defined(potentials: torch.Tensor) -> torch.Tensor:
    """1 where an angle potential [i, j, k] is a cosine (j != i and k != i), 0 where it is 0 by definition."""
    if potentials.dim() == 2:  # distances: the diagonal is 0 by definition
        return 1 - torch.eye(len(potentials))
    i = torch.arange(len(potentials))
    return ((i[:, None, None] != i[None, :, None]) & (i[:, None, None] != i[None, None, :])).float()


def _features(b: int, d: int, seed: int) -> torch.Tensor:
    """Positive features with a common offset, as a network's penultimate features are (softplus, not ReLU:
    at small d, ReLU rows are often all zero, and equal rows are tested on their own)."""
    return F.softplus(torch.randn(b, d, generator=torch.Generator().manual_seed(seed)) + 0.3)


@pytest.mark.parametrize(("b", "d", "d_t"), [(2, 3, 3), (5, 3, 6), (16, 40, 8), (33, 7, 64), (64, 256, 32)])
def test_rkd_gram_form_matches_direct_form(b, d, d_t):
    # float32 against the direct form: values within 1e-5 (~100 ulps of a cosine: both forms round); losses
    # within 1e-5 relative; gradients within 1e-4 relative or 1e-5 of the largest one, where a potential's
    # gradient counts as at least 0.01 large (at b=2 every cosine is 1 and its gradient rounding alone)
    s = _features(b, d, seed=b).requires_grad_()
    t = _features(b, d_t, seed=b + 1)
    for new, old in (
        (rkd_angle_potentials, _direct_angle_potentials),
        (rkd_distance_potentials, _direct_distance_potentials),
    ):
        torch.testing.assert_close(new(s), old(s), rtol=0, atol=1e-5)
        # a random weight per entry checks every entry's gradient, except the entries that are 0 by definition
        # (j == i or k == i): the direct form's gradient there is its 1 / eps clamp (1e12), not a derivative
        weights = torch.randn(new(s).shape, generator=torch.Generator().manual_seed(3)) * _defined(new(s))
        (g_new,) = torch.autograd.grad((new(s) * weights).sum(), s)
        (g_old,) = torch.autograd.grad((old(s) * weights).sum(), s)
        torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-5 * max(g_old.abs().max().item(), 0.01))
    for loss, old in ((rkd_angle_loss, _direct_angle_potentials), (rkd_distance_loss, _direct_distance_potentials)):
        expected = F.smooth_l1_loss(old(s), old(t))
        torch.testing.assert_close(loss(s, t), expected, rtol=1e-5, atol=1e-9)
        (g_new,) = torch.autograd.grad(loss(s, t), s)
        (g_old,) = torch.autograd.grad(expected, s)
        torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-5 * g_old.abs().max().item() + 1e-10)


def test_rkd_angle_potentials_gradcheck():
    # every entry of the (b, b, b) tensor, float64, with one pair closer than the rest
    e = torch.randn(5, 3, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    e[4] = e[0] + 0.05
    assert torch.autograd.gradcheck(rkd_angle_potentials, (e.requires_grad_(),))
    assert torch.autograd.gradcheck(rkd_distance_potentials, (e,))


def test_rkd_gram_form_is_accurate_for_offset_and_close_embeddings():
    # float32 against the direct form in float64, with a pair 1e-4 apart. The float64 Gram keeps the pair's
    # distance exact: a float32 Gram gave cosines of 3e8. Centering keeps a common offset out of the Gram: without
    # it, at offset 1000 the rounding floor grew past the pair's distance, and its cosines became 0 (1.0 off).
    e = _features(64, 32, seed=0)
    e[1] = e[0] + 1e-4 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    for x in (e, e + 1000.0):
        torch.testing.assert_close(
            rkd_angle_potentials(x), _direct_angle_potentials(x.double()).float(), rtol=0, atol=5e-3
        )
        torch.testing.assert_close(
            rkd_distance_potentials(x), _direct_distance_potentials(x.double()).float(), rtol=1e-4, atol=0
        )


@pytest.mark.parametrize(("b", "d"), [(16, 256), (64, 5), (7, 64)])
def test_rkd_duplicate_samples_give_the_direct_forms_zeros(b, d):
    # Identical rows make a zero difference vector: the direct form gives 0 for every entry that holds it,
    # [i, j, j] included. The Gram's rounding may leave ~1e-14 for such a pair (it does at these shapes with
    # this CPU's BLAS); without the rounding floor that became a cosine of any size.
    e = _features(b, d, seed=b * 1000 + d)
    e[b - 1] = e[0]
    a = rkd_angle_potentials(e)
    torch.testing.assert_close(a, _direct_angle_potentials(e), rtol=0, atol=1e-5)
    assert a[0, b - 1].abs().max().item() == 0.0 and a[b - 1, 0].abs().max().item() == 0.0
    assert a[0, 1, 1].item() == pytest.approx(1.0, abs=1e-6)  # a distinct pair: the unit vector's square
    # a coincident pair contributes no gradient (the direct form's is its 1 / eps = 1e12 clamp, a side effect)
    s = e.clone().requires_grad_()
    (g,) = torch.autograd.grad(rkd_angle_loss(s, _features(b, 4, seed=7)), s)
    assert torch.isfinite(g).all() and g.abs().max().item() < 1.0


def test_rkd_gram_form_in_half_precision_and_under_autocast():
    # the cosines are computed in float32 at least: a bf16 embedding gives float32 potentials, and autocast
    # (which runs float32 products in bf16, ~3 digits) does not reach them
    e = _features(32, 16, seed=0)
    half = e.bfloat16()
    assert rkd_angle_potentials(half).dtype == torch.float32
    torch.testing.assert_close(rkd_angle_potentials(half), _direct_angle_potentials(half.float()), rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, d = rkd_angle_potentials(e), rkd_distance_potentials(e)
    torch.testing.assert_close(a, _direct_angle_potentials(e), rtol=0, atol=1e-5)
    torch.testing.assert_close(d, _direct_distance_potentials(e), rtol=1e-5, atol=0)


def test_bench_relation_losses_script_runs_both_forms(capsys):
    # scripts/bench_relation_losses.py at a tiny size: both forms run, agree, and the ratio is printed
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_relation_losses.py"
    spec = importlib.util.spec_from_file_location("bench_relation_losses", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    rows = module.main(["--batch", "8", "--dims", "16", "4", "--reps", "1", "--threads", "1"])
    assert torch.get_num_threads() == threads
    assert [r["dim"] for r in rows] == [16, 4]
    for r in rows:
        assert r["direct_s"] > 0 and r["gram_autograd_s"] > 0 and r["gram_s"] > 0
        assert r["gram_grad_diff"] <= 1e-5 * r["grad_max"] and r["gram_autograd_grad_diff"] <= 1e-5 * r["grad_max"]
    out = capsys.readouterr().out
    assert "direct/gram" in out and "gram_autograd/gram" in out and len(out.strip().splitlines()) == 4


# -- PKT ---------------------------------------------------------------------------------------------------
def test_pkt_hand_computed():
    # student cos = 0 -> kernel [[1, 1/2], [1/2, 1]] -> rows [2/3, 1/3]; teacher cos = 1 -> rows [1/2, 1/2].
    # mean over 4 entries = (1/2) * (1/2 ln(3/4) + 1/2 ln(3/2)) = ln(9/8) / 4
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert pkt_loss(s, t).item() == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)
    torch.testing.assert_close(cosine_conditional_probabilities(s), torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))


def _pkt_loop(fs: torch.Tensor, ft: torch.Tensor, eps: float = 1e-7) -> float:
    b = len(fs)

    def probs(f):
        f = [[x / (math.sqrt(sum(y * y for y in row)) + eps) for x in row] for row in f]
        k = [[(sum(x * y for x, y in zip(f[i], f[j], strict=True)) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(fs.tolist()), probs(ft.tolist())
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_pkt_matches_loop_reference_and_weight():
    torch.manual_seed(0)
    fs, ft = torch.randn(6, 3), torch.randn(6, 9)
    expected = _pkt_loop(fs, ft)
    assert pkt_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)
    algo = PKT(ce_weight=0.0, pkt_weight=30000.0)
    algo.paths = ("s", "t")
    out = step_outputs(logits=torch.zeros(6, 2), batch={}, features={"s": fs}, teacher_features={"t": ft})
    assert algo(out)["pkt"].item() == pytest.approx(30000 * expected, rel=1e-5)


def test_pkt_invariants():
    torch.manual_seed(0)
    f = torch.randn(5, 4)
    assert pkt_loss(f, f).abs().item() < 1e-7
    assert pkt_loss(4.0 * f, f).abs().item() < 1e-7  # the cosine kernel ignores the scale
    assert pkt_loss(torch.randn(5, 4), f).item() > 1e-4


def test_pkt_gradcheck():
    s = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: pkt_loss(x, t), (s,))


# -- CRD: pure parts -----------------------------------------------------------------------------------------
def test_nce_loss_hand_computed():
    # k = 2 negatives, N = 4: noise k / N = 1/2
    p = torch.tensor([[0.5, 0.1, 0.2]])
    expected = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.6) + math.log(0.5 / 0.7))
    assert nce_loss(p, n_data=4, eps=0.0).item() == pytest.approx(expected, rel=1e-6)
    assert nce_loss(p, n_data=4).item() == pytest.approx(expected, rel=1e-5)


def test_nce_loss_gradcheck():
    p = (torch.rand(3, 5, dtype=torch.double) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: nce_loss(x, n_data=20), (p,))


def test_contrast_scores_both_paths_match_loop():
    torch.manual_seed(0)
    memory, v = F.normalize(torch.randn(30, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    expected = torch.tensor([[math.exp(memory[j] @ v[i] / 0.07) for j in range(30)] for i in range(3)])
    for k in (2, 29):  # a gather of k + 1 rows (30 > 4 * 3), and the product with the whole bank
        idx = torch.randint(0, 30, (3, k + 1))
        torch.testing.assert_close(contrast_scores(memory, idx, v, 0.07), expected.gather(1, idx), rtol=1e-5, atol=0)


def test_sample_negatives_come_from_other_classes():
    torch.manual_seed(0)
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1, 0, 2])
    order, start, count = class_tables(targets)
    torch.testing.assert_close(targets[order], targets.sort().values)
    y = torch.tensor([0, 1, 2, 2])
    for k in (4, 8, 50):  # 8 <= each pool (9, 9, 8): without replacement; 50: with
        neg = sample_negatives(y, k, order, start, count)
        assert neg.shape == (4, k)
        assert (targets[neg] != y[:, None]).all()
        if k <= 8:
            assert all(len(set(row.tolist())) == k for row in neg)  # no repeats
        else:  # every sample of another class turns up: the draw covers the whole pool
            for row, c in zip(neg, y.tolist(), strict=True):
                assert set(row.tolist()) == set((targets != c).nonzero().flatten().tolist())
    # the draw is uniform over the pool: 200 x 4 samples of 9 candidates, each ~ 1/9
    neg = sample_negatives(torch.zeros(200, dtype=torch.long), 4, order, start, count)
    freq = torch.bincount(neg.flatten(), minlength=13)[targets != 0].double() / neg.numel()
    assert (freq - 1 / 9).abs().max() < 0.03


def test_momentum_update_touches_only_the_batch_rows():
    torch.manual_seed(0)
    memory = F.normalize(torch.randn(10, 4), dim=1)
    before = memory.clone()
    index, v = torch.tensor([7, 2]), F.normalize(torch.randn(2, 4), dim=1)
    momentum_update(memory, index, v, 0.5)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(memory[untouched], before[untouched])
    torch.testing.assert_close(memory[index], F.normalize(0.5 * before[index] + 0.5 * v, dim=1))


# -- CRD: the algorithm ------------------------------------------------------------------------------------
def _crd(num_train=40, num_classes=4, d_s=6, d_t=10, seed=0, **kwargs) -> CRD:
    torch.manual_seed(seed)
    algo = CRD(**{"ce_weight": 0.0, "feat_dim": 8, "nce_k": 12, **kwargs})
    algo.paths = ("s", "t")
    targets = torch.arange(num_train) % num_classes
    algo.build(
        {"s": torch.Size([2, d_s])},
        {"t": torch.Size([2, d_t, 1])},
        BuildContext(Classification(num_classes), num_train, targets),
    )
    return algo


def _crd_batch(index, d_s=6, d_t=10, seed=1) -> StepOutputs:
    g = torch.Generator().manual_seed(seed)
    n = len(index)
    return step_outputs(
        logits=torch.zeros(n, 4),
        batch={"target": index % 4, "index": index},
        features={"s": torch.randn(n, d_s, generator=g, requires_grad=True)},
        teacher_features={"t": torch.randn(n, d_t, 1, generator=g, requires_grad=True)},
    )


def test_crd_build_banks_and_buffers():
    algo = _crd(num_train=40, feat_dim=8)
    stdv = 1 / math.sqrt(8 / 3)
    for bank in (algo.memory_s, algo.memory_t):
        assert bank.shape == (40, 8) and bank.abs().max() <= stdv and bank.min() < -stdv / 2 < stdv / 2 < bank.max()
    assert not torch.equal(algo.memory_s, algo.memory_t)
    state = algo.state_dict()
    assert {"memory_s", "memory_t", "z"} <= set(state) and "targets" not in state  # banks and Z are checkpointed
    assert (algo.z < 0).all()
    assert algo.embed_s.linear.in_features == 6 and algo.embed_t.linear.in_features == 10


def test_crd_caps_nce_k_and_rejects_missing_targets(caplog):
    with caplog.at_level(logging.INFO, logger="kd_lab.algorithms.crd"):
        algo = _crd(num_train=40, nce_k=16384)
    assert algo.k == 39 and "nce_k=16384 capped at num_train - 1 = 39" in caplog.text
    algo = CRD()
    algo.paths = ("s", "t")
    with pytest.raises(KDLabError, match="train_targets"):
        algo.build({"s": torch.Size([2, 3])}, {"t": torch.Size([2, 3])}, BuildContext(Classification(4), 40))
    with pytest.raises(KDLabError, match=r"algorithm.nce_t=.* is out of range: it must be > 0"):
        CRD(nce_t=0.0)


def _crd_loop_loss(mem_s, mem_t, v_s, v_t, idx, z_s, z_t, n_data, t=0.07, eps=1e-7) -> float:
    """The NCE loss of both sides, one score at a time."""
    total = 0.0
    k = idx.shape[1] - 1
    noise = k / n_data
    for v, memory, z in ((v_s, mem_t, z_s), (v_t, mem_s, z_t)):
        side = 0.0
        for i in range(len(v)):
            for j, row in enumerate(idx[i].tolist()):
                p = math.exp(float(memory[row] @ v[i]) / t) / z
                side += math.log(p / (p + noise + eps)) if j == 0 else math.log(noise / (p + noise + eps))
        total += -side / len(v)
    return total


def test_crd_forward_matches_loop_reference(monkeypatch):
    algo = _crd(num_train=40, nce_k=12, crd_weight=0.8)
    drawn = []

    def fixed_negatives(target, k, *tables):
        j = torch.arange(k)
        neg = torch.stack([(int(c) + 1 + j % 3 + 4 * j) % 40 for c in target])  # class c + 1 + j % 3 (mod 4)
        drawn.append(neg)
        return neg

    monkeypatch.setattr(crd_mod, "sample_negatives", fixed_negatives)
    index = torch.tensor([3, 17, 22, 8, 31])
    mem_s, mem_t = algo.memory_s.clone(), algo.memory_t.clone()
    out = _crd_batch(index)
    v_s = F.normalize(algo.embed_s.linear(out.features["s"]), dim=1).detach()
    v_t = F.normalize(algo.embed_t.linear(out.teacher_features["t"].flatten(1)), dim=1).detach()
    loss = algo(out)["crd"]
    idx = torch.cat([index[:, None], drawn[0]], 1)
    assert (idx[:, 1:] % 4 != idx[:, :1] % 4).all()
    # Z: num_train * mean of the first batch's scores, per side
    z_s = 40 * torch.exp(torch.einsum("bkf,bf->bk", mem_t[idx], v_s) / 0.07).mean().item()
    z_t = 40 * torch.exp(torch.einsum("bkf,bf->bk", mem_s[idx], v_t) / 0.07).mean().item()
    torch.testing.assert_close(algo.z, torch.tensor([z_s, z_t]), rtol=1e-5, atol=0)
    expected = 0.8 * _crd_loop_loss(mem_s, mem_t, v_s, v_t, idx, z_s, z_t, 40)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # the banks moved at the batch rows only, after the scores were taken
    torch.testing.assert_close(algo.memory_s[index], F.normalize(0.5 * mem_s[index] + 0.5 * v_s, dim=1))
    torch.testing.assert_close(algo.memory_t[index], F.normalize(0.5 * mem_t[index] + 0.5 * v_t, dim=1))
    rest = torch.ones(40, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(algo.memory_s[rest], mem_s[rest]) and torch.equal(algo.memory_t[rest], mem_t[rest])
    # Z is fixed after the first step; eval mode leaves the banks alone
    z = algo.z.clone()
    algo.eval()
    banks = algo.memory_s.clone(), algo.memory_t.clone()
    algo(_crd_batch(torch.tensor([0, 1]), seed=5))
    assert torch.equal(algo.z, z) and torch.equal(algo.memory_s, banks[0]) and torch.equal(algo.memory_t, banks[1])


def test_crd_gradients_reach_features_and_heads_not_teacher_or_banks():
    algo = _crd()
    out = _crd_batch(torch.tensor([0, 5, 10, 15, 20, 25]))
    algo(out)["crd"].backward()
    assert out.features["s"].grad.abs().sum() > 0
    assert out.teacher_features["t"].grad is None
    for head in (algo.embed_s, algo.embed_t):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert not algo.memory_s.requires_grad and not algo.memory_t.requires_grad


# -- every algorithm with real models: gradients reach the student (and heads), never the teacher ------------
@pytest.mark.parametrize("algo_cls", [SP, RKD, PKT, CRD])
@pytest.mark.parametrize("student_cls", [MLP, CNN1d])
def test_gradients_reach_student_not_teacher(algo_cls, student_cls):
    torch.manual_seed(0)
    student = student_cls([1, 12], 4, (8,) if student_cls is MLP else (4, 6))
    teacher = CNN1d([1, 12], 4, (6, 8))
    algo = algo_cls(nce_k=20) if algo_cls is CRD else algo_cls()
    algo.bind(student, teacher)
    x, targets = torch.randn(32, 1, 12), torch.arange(32) % 4
    algo.build(
        probe_shapes(student, algo.student_taps, x[:2]),
        probe_shapes(teacher, algo.teacher_taps, x[:2]),
        BuildContext(Classification(4), 32, targets),
    )
    index = torch.arange(0, 32, 4)
    logits_t, feats_t = record(teacher, algo.teacher_taps, x[index])  # with grad: the algorithm must detach
    logits, feats = record(student, algo.student_taps, x[index])
    out = step_outputs(logits, {"input": x[index], "target": targets[index], "index": index}, logits_t, feats, feats_t)
    terms = algo(out)
    distill = {k: v for k, v in terms.items() if k != "ce"}
    assert distill and all(torch.isfinite(v) and v > 0 for v in distill.values())
    sum(distill.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    if algo_cls is CRD:
        assert all(p.grad is not None for p in algo.parameters())


# -- CRD under DDP: every rank's banks end identical ---------------------------------------------------------
def _two_rank_gather(monkeypatch):
    """Replace the all_gather by a two-thread rendezvous with the same semantics (rank 0's tensors first)."""
    barrier, slots, ranks = threading.Barrier(2), {}, threading.local()

    def gather(*tensors):
        slots[ranks.rank] = [t.detach() for t in tensors]
        barrier.wait()
        out = tuple(torch.cat([slots[0][i], slots[1][i]]) for i in range(len(tensors)))
        barrier.wait()
        return out

    monkeypatch.setattr(crd_mod, "gather_from_all_ranks", gather)
    return ranks


def test_crd_ddp_banks_identical_and_equal_to_union_update(monkeypatch):
    base = _crd(num_train=40)
    base.z.fill_(100.0)  # Z set (as after the first step), so no rank needs a collective for it
    ranks = [copy.deepcopy(base), copy.deepcopy(base)]  # DDP starts every rank from rank 0's state
    batches = [_crd_batch(torch.tensor([3, 9, 14, 20]), seed=1), _crd_batch(torch.tensor([1, 27, 33]), seed=2)]
    local = _two_rank_gather(monkeypatch)
    errors = []

    def run(rank):
        local.rank = rank
        try:
            ranks[rank](batches[rank])["crd"].backward()
        except Exception as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert torch.equal(ranks[0].memory_s, ranks[1].memory_s) and torch.equal(ranks[0].memory_t, ranks[1].memory_t)
    # a single process updating with the union batch ends with the same banks
    monkeypatch.undo()
    single = copy.deepcopy(base)
    union = torch.cat([b.batch["index"] for b in batches])
    v_s = torch.cat([single.embed_s(b.features["s"]) for b in batches])
    v_t = torch.cat([single.embed_t(b.teacher_features["t"]) for b in batches])
    single.update_memory(union, v_s, v_t)  # outside DDP: no gather
    torch.testing.assert_close(ranks[0].memory_s, single.memory_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(ranks[0].memory_t, single.memory_t, rtol=0, atol=1e-6)
    changed = (ranks[0].memory_s != base.memory_s).any(1).nonzero().flatten()
    assert set(changed.tolist()) == set(union.tolist())


def test_gather_is_identity_outside_ddp():
    a, b = torch.randn(3, 2, requires_grad=True), torch.arange(3)
    ga, gb = gather_from_all_ranks(a, b)
    assert torch.equal(ga, a) and not ga.requires_grad and torch.equal(gb, b)


def _gloo_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        algo = _crd(num_train=40)  # same seed on both ranks: the same initial banks and heads
        index = [torch.tensor([3, 9, 14, 20]), torch.tensor([1, 27, 33])][rank]  # unequal local batches
        algo(_crd_batch(index, seed=rank + 1))["crd"].backward()
        torch.save({"memory_s": algo.memory_s, "memory_t": algo.memory_t, "z": algo.z}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_crd_banks_identical_across_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("memory_s", "memory_t", "z"):
        assert torch.equal(r0[key], r1[key]), key
    single = _crd(num_train=40)
    batches = [_crd_batch(torch.tensor([3, 9, 14, 20]), seed=1), _crd_batch(torch.tensor([1, 27, 33]), seed=2)]
    union = torch.cat([b.batch["index"] for b in batches])
    v_s = torch.cat([single.embed_s(b.features["s"]) for b in batches])
    v_t = torch.cat([single.embed_t(b.teacher_features["t"]) for b in batches])
    single.update_memory(union, v_s.detach(), v_t.detach())
    torch.testing.assert_close(r0["memory_s"], single.memory_s, rtol=0, atol=1e-6)
    torch.testing.assert_close(r0["memory_t"], single.memory_t, rtol=0, atol=1e-6)


def test_configs_name_their_algorithms():
    from pathlib import Path

    from kd_lab.run.train import CONFIG_DIR

    for name, cls in (("sp", SP), ("rkd", RKD), ("pkt", PKT), ("crd", CRD)):
        text = Path(CONFIG_DIR, "algorithm", f"{name}.yaml").read_text()
        assert f"name: {name}\n" in text and f"kd_lab.algorithms.{cls.__name__}\n" in text and cls.name == name


def test_default_taps():
    student, teacher = CNN1d([1, 12], 4, (4, 6)), CNN1d([1, 12], 4, (6, 8))
    for algo, path in ((SP(), "blocks.1"), (RKD(), "pool"), (PKT(), "pool"), (CRD(), "pool")):
        algo.bind(student, teacher)  # SP: the deepest stage (last feature map); the others: the embedding
        assert algo.student_taps == [path] and algo.teacher_taps == [path]


@pytest.mark.slow
def test_crd_under_lightning_ddp_updates_the_rows_of_every_rank(tmp_path):
    """trainer=ddp_cpu, one epoch on fake data (192 samples, 2 ranks x 3 batches of 32): rank 0's checkpointed
    banks hold all 192 rows updated (unit norm; initial rows are not), so rank 1's rows reached rank 0."""
    from helpers import TINY, run_kd_lab

    one_epoch = [a for a in TINY if not a.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1"]
    run_kd_lab(tmp_path, *one_epoch, "trainer=ddp_cpu", "logger=none", "algorithm=crd")
    (ckpt,) = (tmp_path / "logs" / "runs").glob("*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    for key in ("algorithm.memory_s", "algorithm.memory_t"):
        norms = state[key].norm(dim=1)
        assert state[key].shape == (192, 128) and ((norms - 1).abs() < 1e-5).all(), key
    assert (state["algorithm.z"] > 0).all()


def test_crd_kd_adds_hintons_term_and_leaves_crd_unchanged():
    """CRD+KD = the same CRD term plus kd_weight * T^2 KL(p_t^T || p_s^T) (hand-computed at T = 1 below)."""
    index = torch.tensor([0, 5, 10, 15])
    plain, with_kd = _crd(), _crd(kd_weight=0.5, temperature=1.0)
    out = _crd_batch(index)
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0]] * 4, requires_grad=True)
    t = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]] * 4)
    out.logits, out.teacher_logits = s, t
    torch.manual_seed(3)  # the same negatives for both
    a = plain(out)
    torch.manual_seed(3)
    b = with_kd(out)
    assert "kd" not in a and a["crd"].item() == pytest.approx(b["crd"].item(), rel=1e-6)
    # p_t = [1/2, 1/6, 1/6, 1/6], p_s uniform: KL = 1/2 ln 2 + 3 * 1/6 ln(2/3)
    expected = 0.5 * (0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0))
    assert b["kd"].item() == pytest.approx(expected, rel=1e-6)
    b["kd"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
