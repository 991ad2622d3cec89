"""The teacher top-k token store of language models and the divergences on its sparse support
(kd_lab/losses/sparse.py, kd_lab/run/view_store.py TokenTopkStore, docs/lm-topk-store.md)."""

import math

import pytest
import torch
from test_lm import FDR, MASKED
from torch import nn

from kd_lab.algorithms import TokenKD
from kd_lab.algorithms.base import StepOutputs
from kd_lab.core.tasks.language_modeling import LanguageModeling
from kd_lab.errors import KDLabError
from kd_lab.losses import KINDS, per_token_divergence
from kd_lab.losses.sparse import TopkSupport, attach_support, sparse_token_divergence, support_of
from kd_lab.run.assemble import build_run
from kd_lab.run.builders import build_datamodule
from kd_lab.run.train import train
from kd_lab.run.view_store import TokenTopkStore, ViewStore, compress_topk, expand_topk, refusal, token_bytes

OPTIONS = {"beta": 0.3, "alpha": 0.2}


def full_support(teacher: torch.Tensor) -> TopkSupport:
    """k = V: every id stored, no tail bucket."""
    v = teacher.shape[-1]
    values, index = teacher.topk(v, dim=-1)
    return TopkSupport(values, index, torch.full(teacher.shape[:1], float("-inf"), dtype=teacher.dtype), v)


# -- the divergences on the sparse support -------------------------------------------------------------------
def hand_buckets(temperature: float) -> tuple[list[float], list[float]]:
    """Teacher logits [2, 1, 0, 0] at top-2 (fill logit 0 for the two tail ids); student logits [0, 1, 2, 0]."""
    t = [math.exp(2 / temperature), math.exp(1 / temperature), 2 * math.exp(0)]
    s_all = [math.exp(x / temperature) for x in (0, 1, 2, 0)]
    s = [s_all[0], s_all[1], s_all[2] + s_all[3]]  # the student's tail: ids 2 and 3
    return [x / sum(t) for x in t], [x / sum(s_all) for x in s]


def hand_support() -> tuple[torch.Tensor, TopkSupport]:
    student = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    values, index, fill = compress_topk(torch.tensor([[2.0, 1.0, 0.0, 0.0]]), 2)
    assert fill.item() == 0.0 and index.tolist() == [[0, 1]]  # log(mean(e^0, e^0)) = 0
    return student, TopkSupport(values, index, fill, 4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hand_computed_forward_reverse_kl_and_tvd(temperature):
    p_t, p_s = hand_buckets(temperature)
    t2 = temperature**2
    expected = {
        "forward_kl": t2 * sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True)),
        "reverse_kl": t2 * sum(b * math.log(b / a) for a, b in zip(p_t, p_s, strict=True)),
        "tvd": t2 * 0.5 * sum(abs(a - b) for a, b in zip(p_t, p_s, strict=True)),
    }
    student, support = hand_support()
    for kind, value in expected.items():
        got = sparse_token_divergence(student, support, kind, temperature=temperature)
        assert got.item() == pytest.approx(value, rel=1e-5), kind


def test_hand_computed_jsd_and_skew():
    p_t, p_s = hand_buckets(1.0)
    b, a = OPTIONS["beta"], OPTIONS["alpha"]
    m = [b * x + (1 - b) * y for x, y in zip(p_t, p_s, strict=True)]
    jsd = b * sum(x * math.log(x / z) for x, z in zip(p_t, m, strict=True))
    jsd += (1 - b) * sum(y * math.log(y / z) for y, z in zip(p_s, m, strict=True))
    skew = sum(x * math.log(x / (a * x + (1 - a) * y)) for x, y in zip(p_t, p_s, strict=True))
    skew_r = sum(y * math.log(y / (a * y + (1 - a) * x)) for x, y in zip(p_t, p_s, strict=True))
    student, support = hand_support()
    for kind, value in {"jsd": jsd, "skew_kl": skew, "skew_rkl": skew_r}.items():
        got = sparse_token_divergence(student, support, kind, **OPTIONS)
        assert got.item() == pytest.approx(value, rel=1e-5), kind


@pytest.mark.parametrize("kind", KINDS)
def test_k_equal_to_the_vocabulary_is_the_dense_divergence(kind):
    g = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(6, 11, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    mask = torch.tensor([True, False, True, True, False, True])
    dense = per_token_divergence(student[mask], teacher[mask], kind, temperature=1.5, **OPTIONS).sum()
    sparse = sparse_token_divergence(student, full_support(teacher), kind, mask=mask, temperature=1.5, **OPTIONS)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    values, index, fill = compress_topk(torch.randn(3, 7, generator=g, dtype=torch.float64), 3)
    # fp16 values would be constants of the test anyway; float64 ones let gradcheck also cover the teacher side
    values = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fill = fill.double().requires_grad_()

    def loss(s, v, f):
        return sparse_token_divergence(s, TopkSupport(v, index, f, 7), kind, temperature=2.0, **OPTIONS)

    assert torch.autograd.gradcheck(loss, (student, values, fill))


def test_the_tail_bucket_loses_only_the_students_shape_inside_the_tail():
    """With k < V the sparse forward KL is at most the dense KL against the rebuilt teacher (log-sum
    inequality), and equal when the student is uniform inside the tail."""
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(5, 20, generator=g), torch.randn(5, 20, generator=g)
    values, index, fill = compress_topk(teacher, 4)
    support = TopkSupport(values.float(), index, fill, 20)
    rebuilt = expand_topk(values, index, fill, 20)
    dense = per_token_divergence(student, rebuilt, "forward_kl").sum()
    assert sparse_token_divergence(student, support, "forward_kl") < dense
    flat_tail = rebuilt + 0.5  # the student = the rebuilt teacher shifted: uniform inside the tail
    torch.testing.assert_close(
        sparse_token_divergence(flat_tail, support, "forward_kl"),
        per_token_divergence(flat_tail, rebuilt, "forward_kl").sum(),
        atol=1e-5,
        rtol=1e-5,
    )


def test_bad_support_names_the_fix():
    student, support = hand_support()
    with pytest.raises(KDLabError, match=r"flatten.*TopkSupport.flat"):
        sparse_token_divergence(student, TopkSupport(support.values[0], support.index, support.fill, 4), "tvd")
    with pytest.raises(KDLabError, match="over 5 classes, the student has 4"):
        sparse_token_divergence(student, TopkSupport(support.values, support.index, support.fill, 5), "tvd")


def test_token_kd_uses_the_sparse_form_when_the_teacher_logits_carry_a_support():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    target = torch.randint(9, (2, 4), generator=g)
    target[0, 1] = -100
    values, index, fill = compress_topk(teacher, 3)
    rebuilt = expand_topk(values, index, fill, 9)
    task = LanguageModeling(vocab_size=9)
    algorithm = TokenKD(divergence="reverse_kl")

    def term(teacher_logits):
        out = StepOutputs(logits=student, batch={"target": target}, teacher_logits=teacher_logits, task=task)
        return algorithm(out)["reverse_kl"]

    support = TopkSupport(values, index, fill, 9)
    marked = attach_support(rebuilt.clone(), support)
    mask = target.flatten() != -100
    expected = sparse_token_divergence(student.flatten(0, 1), support.flat(), "reverse_kl", mask=mask) / mask.sum()
    torch.testing.assert_close(term(marked), expected)
    assert not torch.allclose(term(rebuilt), expected)  # unmarked: the dense divergence, another number
    assert support_of(rebuilt * 1) is None  # an op drops the mark


# -- the store ------------------------------------------------------------------------------------------------
def test_bytes_per_token():
    assert [token_bytes(k, 2048) for k in (8, 32, 128)] == [36, 132, 516]  # 4k + 4 with int16 ids
    assert token_bytes(8, 50257) == 52  # int32 ids above 32767


class Lookup(nn.Module):
    """A 'teacher' whose logits are a fixed table of the token id: easy to check."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x)


def test_store_marks_positions_no_loss_reads_and_reads_back_by_sample(tmp_path):
    torch.manual_seed(0)
    teacher = Lookup(10).eval()
    inputs = torch.randint(10, (5, 3))
    valid = torch.ones(5, 3, dtype=torch.bool)
    valid[1, 2] = False
    store = TokenTopkStore(tmp_path, {"format": "top4"}, inputs, valid, 4, 2, lambda out, i: out)
    store.fill([teacher], [], torch.device("cpu"))
    assert store.stats == {"read": 0, "filled": 1, "live": 0}
    assert store.bytes_per_token == token_bytes(4, 10) + 4 / inputs.numel()  # + the stored vocabulary size
    (logits,), _ = store.lookup(torch.tensor([3, 1]))
    with torch.no_grad():
        values, index, fill = compress_topk(teacher(inputs[[3, 1]]), 4)
    torch.testing.assert_close(logits[0], expand_topk(values, index, fill, 10)[0])
    torch.testing.assert_close(logits[1, :2], expand_topk(values, index, fill, 10)[1, :2])
    assert logits[1, 2].eq(0).all()  # the marker rebuilds to all-zero logits
    assert support_of(logits).values.shape == (2, 3, 4)
    again = TokenTopkStore(tmp_path, {"format": "top4"}, inputs, valid, 4, 2, lambda out, i: out)
    again.fill([teacher], [], torch.device("cpu"))
    assert again.stats["read"] == 1
    torch.testing.assert_close(again.lookup(torch.tensor([3, 1]))[0][0], logits)


def test_a_sweep_fills_the_token_store_once_and_every_seed_reads_it(make_cfg, tmp_path):
    overrides = [*FDR, "perf.view_store=true", "perf.view_store_topk=8"]
    first, objects = train(make_cfg(*overrides, fast=False, run="fill"))
    store = objects["module"].step.teacher_cache
    assert isinstance(store, TokenTopkStore) and store.stats["filled"] == 1
    again, objects = train(make_cfg(*overrides, fast=False, run="read"))
    assert objects["module"].step.teacher_cache.stats["read"] == 1
    assert again["best"]["test/ppl"] == first["best"]["test/ppl"]  # the filling run saw the stored numbers too
    # one copy per sample: another seed (another batch order) reads it too. (Another data.batch_size would
    # also train another teacher in the teacher store, so it is another store.)
    _, objects = train(make_cfg(*overrides, "seed=1", fast=False, run="seed1"))
    assert objects["module"].step.teacher_cache.stats["read"] == 1
    stores = list((tmp_path / "teachers" / "views").glob("tokens-*"))
    assert len(stores) == 1 and not list((tmp_path / "teachers" / "views").glob("*/epoch_*"))


def test_masked_lm_uses_the_per_epoch_store_with_the_sparse_support(make_cfg):
    cfg = make_cfg(*FDR, *MASKED, fast=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    assert not datamodule.teacher_outputs_per_sample  # masks change every epoch
    run = build_run(cfg, datamodule)
    assert refusal(datamodule, run.step.scheme, run.step.algorithm, run.step.teachers, False) is None
    store = ViewStore(cfg.paths.teacher_store, {}, [], 8, 0, 1.0, False)
    rebuilt = store.view_of(torch.randn(2, 3, 20))
    assert support_of(rebuilt).values.shape == (2, 3, 8)


def built(cfg):
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return build_run(cfg, datamodule)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["perf.view_store_topk=301"], r"perf.view_store_topk=301 is larger than teacher 0's 300 classes"),
        (["perf.view_store_topk=8", "scheme=online"], r"scheme=online trains the teacher.*scheme=offline"),
    ],
)
def test_refusals_before_any_compute(make_cfg, tmp_path, overrides, message):
    with pytest.raises(KDLabError, match=message):
        built(make_cfg(*FDR, *overrides, fast=False))
    assert not (tmp_path / "teachers" / "views").exists()  # nothing written, no teacher pass


def test_k_below_one_is_refused_by_the_config_check(make_cfg):
    with pytest.raises(KDLabError, match="view_store_topk"):
        train(make_cfg(*FDR, "perf.view_store_topk=0", fast=False))
