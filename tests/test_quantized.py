"""Quantized distillation (Polino et al. 2018): the quantizer's levels, the straight-through gradient, runs with
quantize=uniform under kd and none, the refusals before compute, and the packed export's round trip."""

import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from kd_lab.algorithms.soft_targets import kd_loss
from kd_lab.errors import KDLabError
from kd_lab.models import MLP, CNN1d
from kd_lab.models.quantized import (
    UniformQuantization,
    fake_quantize,
    quantize_codes,
    quantized_modules,
    size_report,
)
from kd_lab.run.checks.schema import validate_config
from kd_lab.run.train import train
from kd_lab.tools.export_quantized import (
    export_quantized,
    load_quantized,
    main,
    pack_codes,
    payload_bytes,
    unpack_codes,
)


# -- the quantizer -------------------------------------------------------------------------------------
def test_levels_by_hand():
    """Buckets of 4: [0, .1, .5, .9] has min 0 and max .9, so 2 bits give the levels 0, .3, .6, .9;
    a flat bucket keeps its value (span set to 1, codes 0); a short last bucket scales by its own min/max."""
    w = torch.tensor([0.0, 0.1, 0.5, 0.9, -1.0, -1.0, -1.0, -1.0, 2.0, 3.0], dtype=torch.float64)
    codes, scale, offset = quantize_codes(w, bits=2, bucket_size=4)
    # x = (w - min) / span * 3 = [0, 1/3, 5/3, 3 | 0, 0, 0, 0 | 0, 3]
    assert codes.tolist() == [0, 0, 2, 3, 0, 0, 0, 0, 0, 3]
    assert torch.allclose(scale, torch.tensor([0.3, 1 / 3, 1 / 3], dtype=torch.float64))
    assert offset.tolist() == [0.0, -1.0, 2.0]
    expected = torch.tensor([0.0, 0.0, 0.6, 0.9, -1.0, -1.0, -1.0, -1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(fake_quantize(w, 2, 4), expected, atol=1e-12)
    # 1 bit: two levels per bucket, its min and its max
    assert fake_quantize(torch.tensor([1.0, 1.4, 1.6, 2.0]), 1, 4).tolist() == [1.0, 1.0, 2.0, 2.0]


def test_eight_bits_is_close_and_keeps_the_shape():
    w = torch.randn(16, 3, 5, generator=torch.Generator().manual_seed(0))
    q = fake_quantize(w, 8, 256)
    assert q.shape == w.shape
    step = (w.max() - w.min()) / 255  # one bucket of 240 values: the error is at most half a level
    assert (q - w).abs().max() <= step / 2 + 1e-6
    assert q.unique().numel() <= 256


def test_stochastic_rounding_is_unbiased():
    """Each value rounds to one of its two neighbouring levels, up with probability frac(x): its mean is x."""
    row = torch.tensor([0.0, 0.25, 0.7, 1.0], dtype=torch.float64)  # min 0, max 1: with 1 bit, x = w
    w = row.repeat(20_000)  # 20,000 buckets of 4
    codes, _, _ = quantize_codes(w, 1, 4, stochastic=True, generator=torch.Generator().manual_seed(0))
    per_value = codes.view(-1, 4)
    assert set(per_value.unique().tolist()) == {0.0, 1.0}
    assert per_value[:, 0].eq(0).all() and per_value[:, 3].eq(1).all()  # on a level: never moved
    mean = per_value.mean(dim=0)  # standard error <= 0.5 / sqrt(20000) ~ 0.0035
    assert torch.allclose(mean, row, atol=0.02)
    deterministic, _, _ = quantize_codes(w, 1, 4)
    assert deterministic.view(-1, 4)[0].tolist() == [0.0, 0.0, 1.0, 1.0]


# -- the straight-through gradient -----------------------------------------------------------------------
def test_straight_through_gradient_reaches_the_fp32_weight():
    """The forward reads Q(w); the full-precision w receives exactly the gradient with respect to Q(w)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    UniformQuantization(bits=2, bucket_size=8, keep_first_last=False).apply(layer)
    w = layer.parametrizations.weight.original
    x, r = torch.randn(5, 8), torch.randn(5, 3)
    (layer(x) * r).sum().backward()
    w_q = fake_quantize(w.detach(), 2, 8).requires_grad_()
    (F.linear(x, w_q, layer.bias.detach()) * r).sum().backward()
    assert torch.equal(layer.weight, w_q.detach())  # the forward used the quantized weight
    assert not torch.equal(w_q.detach(), w.detach())
    assert torch.equal(w.grad, w_q.grad) and w.grad.abs().sum() > 0


def test_gradcheck_of_the_loss_on_the_quantized_weights():
    """gradcheck in float64 of the quantized-distillation loss, (1 - a) CE + a T^2 KL, with respect to the
    quantized weights and the input: the gradient that the straight-through estimator hands on. (Rounding
    itself has a zero derivative almost everywhere, so no finite difference can check the estimator; the
    test above checks that it passes the gradient on exactly.)"""
    g = torch.Generator().manual_seed(0)
    w = fake_quantize(torch.randn(3, 6, generator=g, dtype=torch.float64), 4, 6).requires_grad_()
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher, labels = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 0])

    def loss(w, x):
        logits = F.linear(x, w)
        return 0.1 * F.cross_entropy(logits, labels) + 0.9 * kd_loss(logits, teacher, 4.0)

    assert torch.autograd.gradcheck(loss, (w, x))


def test_which_layers_are_quantized():
    mlp = MLP([1, 40], 10, hidden=[16, 16])  # layers.0, layers.1, head
    UniformQuantization().apply(mlp)  # the paper's default: first and last stay fp32
    assert [n for n, _, _ in quantized_modules(mlp)] == ["layers.1.0"]
    assert not parametrize.is_parametrized(mlp.head) and not parametrize.is_parametrized(mlp.layers[1][0], "bias")
    cnn = CNN1d([1, 40], 10, channels=[4, 4, 4])
    UniformQuantization(layers=["Conv1d"], keep_first_last=False).apply(cnn)
    assert all(isinstance(m, nn.Conv1d) for _, m, _ in quantized_modules(cnn)) and len(quantized_modules(cnn)) == 3


# -- runs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["kd", "none"])
def test_fast_dev_run_quantized(make_cfg, algorithm):
    cfg = make_cfg(f"algorithm={algorithm}", "quantize=uniform", "quantize.bits=4", "student=mlp_medium", "debug=fdr")
    results, objs = train(cfg)
    assert results["status"] == "finished"
    q = results["quantize"]
    assert (q["bits"], q["bucket_size"], q["layers"]) == (4, 256, ["layers.1.0"])
    # mlp_medium: 40x256, 256x256 (quantized) and 256x10 weights, and their biases
    fp32 = 4 * (40 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)
    assert q["fp32_bytes"] == fp32
    assert q["packed_bytes"] == fp32 - 4 * 256 * 256 + 256 * 256 // 2 + 8 * 256
    student = objs["run"].student.eval()  # validation and test evaluate this quantized student
    x = torch.randn(3, 1, 40)
    plain = MLP([1, 40], 10, hidden=[256, 256])
    state = {k.replace("parametrizations.weight.original", "weight"): v for k, v in student.state_dict().items()}
    state["layers.1.0.weight"] = fake_quantize(state["layers.1.0.weight"], 4, 256)
    plain.load_state_dict(state)
    assert torch.equal(student(x), plain.eval()(x))


def test_results_record_fp32_size_without_quantization(make_cfg):
    results, _ = train(make_cfg("algorithm=none", "debug=fdr"))
    q = results["quantize"]
    assert q["name"] == "none" and q["bits"] is None and q["packed_bytes"] == q["fp32_bytes"] > 0


# -- refusals before compute -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quantize.bits=0", "quantize.bits=0 is out of range: it must be an integer in [1, 8]"),
        ("quantize.bits=9", "quantize.bits=9 is out of range: it must be an integer in [1, 8]"),
        ("quantize.bucket_size=0", "quantize.bucket_size=0 is out of range: it must be >= 1; set e.g. .*=256"),
        ("quantize.bits=2.5", "quantize.bits=2.5 has the wrong type"),
        ("+quantize.bitz=4", "unknown key quantize.bitz=4"),
    ],
)
def test_bad_values_refused_by_the_checks(make_cfg, override, message):
    with pytest.raises(KDLabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_config(make_cfg("quantize=uniform", override))


def test_direct_construction_checks_the_bounds():
    with pytest.raises(KDLabError, match=r"quantize.layers=\['LSTM'\] names \['LSTM'\] layer type"):
        UniformQuantization(layers=["LSTM"])
    with pytest.raises(KDLabError, match=r"quantize.bits=9 is out of range.*set e.g. quantize.bits=4"):
        UniformQuantization(bits=9)
    with pytest.raises(KDLabError, match=r"quantize.bucket_size=0 is out of range"):
        UniformQuantization(bucket_size=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantize.layers=[LSTM]"], r"quantize.layers=\['LSTM'\] has the wrong type: .* takes .*'Conv1d'"),
        (["student=mlp_small"], r"finds no layer .* in student=mlp_small .*quantize.keep_first_last=false"),
        (["chain=born_again"], r"quantize=uniform with chain=born_again: .*chain=null"),
    ],
)
def test_invalid_uses_fail_before_compute(make_cfg, tmp_path, overrides, message):
    cfg = make_cfg("algorithm=kd", "quantize=uniform", *overrides)
    with pytest.raises(KDLabError, match=message):
        train(cfg)
    assert not (tmp_path / "teachers").exists() or not any((tmp_path / "teachers").iterdir())  # no teacher trained


# -- export ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-37 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


def test_export_round_trip_gives_the_same_outputs():
    """3 bits (codes across byte boundaries), buckets of 7 (a short last bucket), convolutions and a Linear."""
    torch.manual_seed(0)
    spec = {"_target_": "kd_lab.models.CNN1d", "input_shape": [1, 40], "num_classes": 10, "channels": [4, 6, 6]}
    model = CNN1d([1, 40], 10, channels=[4, 6, 6])
    UniformQuantization(bits=3, bucket_size=7, keep_first_last=False).apply(model)
    model.eval()
    payload = export_quantized(model, spec)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    loaded = load_quantized(buffer)
    x = torch.randn(5, 1, 40)
    assert torch.equal(loaded(x), model(x))
    assert not any(parametrize.is_parametrized(m) for m in loaded.modules())
    assert payload_bytes(payload) == size_report(model)["packed_bytes"] < size_report(model)["fp32_bytes"]


def test_export_refuses_an_unquantized_model_and_a_foreign_file(tmp_path):
    with pytest.raises(KDLabError, match="no quantized weight"):
        export_quantized(MLP([1, 40], 10), {})
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(KDLabError, match="is not a kd-lab quantized export"):
        load_quantized(tmp_path / "plain.pt")


def test_export_cli_on_a_run(make_cfg, tmp_path, capsys):
    overrides = ["quantize=uniform", "quantize.bits=2", "student=mlp_medium", "trainer.max_epochs=1"]
    cfg = make_cfg("algorithm=none", *overrides)
    results, objs = train(cfg)
    run_dir = tmp_path / "run"
    out = tmp_path / "student.q.pt"
    main([str(run_dir), "--weights", "last", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"{results['quantize']['packed_bytes']:,} bytes packed" in printed
    x = torch.randn(4, 1, 40)
    assert torch.equal(load_quantized(out)(x), objs["run"].student.eval()(x))
    assert json.loads((run_dir / "results.json").read_text())["quantize"]["bits"] == 2
