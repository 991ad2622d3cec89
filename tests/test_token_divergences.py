"""Token-level divergences: hand-computed values, masking, conventions, gradients, chunked == naive."""

import math

import pytest
import torch

from kd_lab.errors import KDLabError
from kd_lab.losses import KINDS, chunked_token_divergence, mean, per_token_divergence, shared_vocab, token_divergence

# two tokens, V = 3; logits are log-probabilities, so softmax gives these back exactly
P_T = [[0.5, 0.25, 0.25], [0.6, 0.3, 0.1]]
P_S = [[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]


def _logits(p: list[list[float]]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _mix(w: float, p: list[float], q: list[float]) -> list[float]:
    return [w * pi + (1 - w) * qi for pi, qi in zip(p, q, strict=True)]


# token 0 written out; token 1 through the plain-Python KL above
GOLDEN = {
    "forward_kl": (0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5), _kl(P_T[1], P_S[1])),
    "reverse_kl": (0.25 * math.log(0.25 / 0.5) + 0.5 * math.log(0.5 / 0.25), -math.log(1.8 * 0.9 * 0.3) / 3),
    # m = [0.375, 0.375, 0.25]; both KL terms are equal on token 0
    "jsd": (
        0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375),
        0.5 * _kl(P_T[1], _mix(0.5, P_T[1], P_S[1])) + 0.5 * _kl(P_S[1], _mix(0.5, P_T[1], P_S[1])),
    ),
    "tvd": (0.5 * (0.25 + 0.25 + 0.0), 0.5 * (4 / 15 + 1 / 30 + 7 / 30)),
    # 0.1 p_T + 0.9 p_S = [0.275, 0.475, 0.25]
    "skew_kl": (0.5 * math.log(0.5 / 0.275) + 0.25 * math.log(0.25 / 0.475), _kl(P_T[1], _mix(0.1, P_T[1], P_S[1]))),
    # 0.1 p_S + 0.9 p_T = [0.475, 0.275, 0.25]
    "skew_rkl": (0.25 * math.log(0.25 / 0.475) + 0.5 * math.log(0.5 / 0.275), _kl(P_S[1], _mix(0.1, P_S[1], P_T[1]))),
}


def _pair(n=12, v=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(n, v, generator=g, dtype=dtype)).requires_grad_()
    t = 2 * torch.randn(n, v, generator=g, dtype=dtype)
    return s, t


def _value_and_grad(s, t, kind, **kw):
    loss = token_divergence(s, t, kind, **kw)
    (g,) = torch.autograd.grad(loss, s)
    return loss, g


def test_golden_values_cover_every_kind():
    assert set(GOLDEN) == set(KINDS)
    assert GOLDEN["forward_kl"][0] == pytest.approx(0.25 * math.log(2))
    assert GOLDEN["tvd"][1] == pytest.approx(4 / 15)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_hand_computed_values(kind, chunk_size):
    s, t = _logits(P_S), _logits(P_T)
    per_token = per_token_divergence(s, t, kind)
    assert per_token.tolist() == pytest.approx(GOLDEN[kind], rel=1e-12)
    total = token_divergence(s, t, kind, chunk_size=chunk_size)
    assert total.item() == pytest.approx(sum(GOLDEN[kind]), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_masked_tokens_contribute_exactly_zero(kind, chunk_size):
    s = torch.cat([_logits(P_S), torch.tensor([[math.nan, math.inf, 0.0]], dtype=torch.float64)])
    t = torch.cat([_logits(P_T), torch.tensor([[-math.inf, 1e30, math.nan]], dtype=torch.float64)])
    s.requires_grad_()
    mask = torch.tensor([True, False, False])  # token 1 and the garbage row are padding
    loss, g = _value_and_grad(s, t, kind, mask=mask, chunk_size=chunk_size)
    assert loss.item() == pytest.approx(GOLDEN[kind][0], rel=1e-12)
    assert torch.isfinite(g).all() and g[1:].eq(0).all() and g[0].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_no_valid_token_gives_zero_and_zero_grad(chunk_size):
    s, t = _pair(n=4)
    loss, g = _value_and_grad(s, t, "jsd", mask=torch.zeros(4, dtype=torch.bool), chunk_size=chunk_size)
    assert loss.item() == 0.0 and g.eq(0).all()
    assert mean(s, t, "jsd", mask=torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    s, t = _pair()
    assert torch.equal(per_token_divergence(s, t, "jsd", beta=0.0), per_token_divergence(s, t, "forward_kl"))
    assert torch.equal(per_token_divergence(s, t, "jsd", beta=1.0), per_token_divergence(s, t, "reverse_kl"))
    # the formula itself goes to 0 at the ends; divided by beta (1 - beta) it tends to the forward (reverse) KL
    b = 1e-4
    fkl, rkl = token_divergence(s, t, "forward_kl").item(), token_divergence(s, t, "reverse_kl").item()
    assert token_divergence(s, t, "jsd", beta=b).item() / b == pytest.approx(fkl, rel=1e-2)
    assert token_divergence(s, t, "jsd", beta=1 - b).item() / b == pytest.approx(rkl, rel=1e-2)


def test_skew_with_alpha_zero_is_plain_kl():
    s, t = _pair()
    assert torch.equal(per_token_divergence(s, t, "skew_kl", alpha=0.0), per_token_divergence(s, t, "forward_kl"))
    assert torch.equal(per_token_divergence(s, t, "skew_rkl", alpha=0.0), per_token_divergence(s, t, "reverse_kl"))


@pytest.mark.parametrize("kind", KINDS)
def test_non_negative_and_zero_when_distributions_match(kind):
    s, t = _pair(n=64, v=11)
    assert per_token_divergence(s, t, kind).min() > 0
    # a constant shift of the logits leaves the softmax unchanged
    same = per_token_divergence(t + 3.0, t, kind, temperature=2.0)
    assert same.abs().max() < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_divides_logits_and_multiplies_by_t_squared(kind):
    s, t = _pair()
    hot = token_divergence(s, t, kind, temperature=2.5)
    assert hot.item() == pytest.approx(2.5**2 * token_divergence(s / 2.5, t / 2.5, kind).item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck(kind, chunk_size):
    s, t = _pair(n=5, v=4, seed=1)
    mask = torch.tensor([True, True, False, True, True])

    def fn(x):
        return token_divergence(x, t, kind, mask=mask, temperature=1.5, beta=0.3, chunk_size=chunk_size)

    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_chunked_equals_naive(kind, dtype, tol):
    s, t = _pair(n=23, v=50, dtype=dtype, seed=2)
    mask = torch.rand(23, generator=torch.Generator().manual_seed(3)) > 0.25
    for m in (None, mask):
        ref, ref_g = _value_and_grad(s, t, kind, mask=m, temperature=2.0)
        for chunk_size in (1, 5, 23, 64):  # 5 does not divide 23; 64 is more than N
            got, got_g = _value_and_grad(s, t, kind, mask=m, temperature=2.0, chunk_size=chunk_size)
            assert got.dtype == ref.dtype and got_g.dtype == dtype
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            torch.testing.assert_close(got_g, ref_g, rtol=tol, atol=tol)


def test_chunked_bf16_stores_grads_in_bf16_and_computes_in_float32():
    s, t = _pair(n=16, v=40, dtype=torch.bfloat16)
    loss, g = _value_and_grad(s, t, "forward_kl", chunk_size=6)
    ref, ref_g = _value_and_grad(s, t, "forward_kl")
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g)


def test_chunked_backward_scales_by_grad_output_and_allows_retain_graph():
    s, t = _pair()
    loss = chunked_token_divergence(s, t, "tvd", chunk_size=5)
    (once,) = torch.autograd.grad(loss, s, retain_graph=True)
    (thrice,) = torch.autograd.grad(3.0 * loss, s)
    torch.testing.assert_close(thrice, 3.0 * once)


def test_chunked_without_grad_gives_the_same_sum():
    s, t = _pair()
    with torch.no_grad():
        assert chunked_token_divergence(s, t, "jsd", chunk_size=5).item() == pytest.approx(
            token_divergence(s, t, "jsd").item(), rel=1e-12
        )


def test_chunked_refuses_a_teacher_that_requires_grad():
    s, t = _pair()
    with pytest.raises(KDLabError, match=r"teacher_logits\.detach\(\)"):
        token_divergence(s, t.requires_grad_(), "forward_kl", chunk_size=4)


def test_mean_divides_by_the_valid_tokens():
    s, t = _pair()
    mask = torch.arange(12) % 3 != 0
    assert mean(s, t, "reverse_kl", mask=mask, temperature=2.0).item() == pytest.approx(
        token_divergence(s, t, "reverse_kl", mask=mask, temperature=2.0).item() / 8, rel=1e-12
    )


def test_shared_vocab_cuts_the_padding_rows():
    s, t = _pair(n=3, v=8)
    padded_teacher = torch.cat([t, torch.randn(3, 4, dtype=t.dtype)], dim=-1)  # 4 padding rows
    cut_s, cut_t = shared_vocab(s, padded_teacher)
    assert cut_s.shape == cut_t.shape == (3, 8)
    assert torch.equal(cut_t, t) and cut_s.data_ptr() == s.data_ptr()  # views, no copy
    assert token_divergence(cut_s, cut_t, "forward_kl").item() == token_divergence(s, t, "forward_kl").item()
    assert shared_vocab(s, padded_teacher, vocab_size=5)[1].shape == (3, 5)
    with pytest.raises(KDLabError, match=r"vocab_size must be in \[1, 8\]"):
        shared_vocab(s, padded_teacher, vocab_size=9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "kl"}, "valid kinds: forward_kl, reverse_kl, jsd, tvd, skew_kl, skew_rkl"),
        ({"beta": 1.5}, r"beta must be in \[0, 1\]"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\]"),
        ({"alpha": 1.0}, r"alpha must be in \[0, 1\)"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
    ],
)
def test_bad_options_name_the_valid_values(options, message):
    s, t = _pair()
    kw = {"kind": "jsd", "chunk_size": 4, **options}
    with pytest.raises(KDLabError, match=message):
        token_divergence(s, t, **kw)
    if "chunk_size" not in options:
        with pytest.raises(KDLabError, match=message):
            token_divergence(s, t, **{**kw, "chunk_size": None})


def test_bad_shapes_point_to_the_fix():
    s, t = _pair()
    with pytest.raises(KDLabError, match="shared_vocab"):
        token_divergence(s, t[:, :5], "forward_kl")
    with pytest.raises(KDLabError, match=r"flatten\(0, -2\)"):
        token_divergence(s.detach()[None], t[None], "forward_kl")
    with pytest.raises(KDLabError, match=r"labels\.flatten"):
        token_divergence(s, t, "forward_kl", mask=torch.ones(12))
