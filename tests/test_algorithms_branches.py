"""Self-distillation with branches on a shared trunk: Rocket Launching (rocket.py) and ONE (one.py)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import step_outputs
from torch import nn

from kd_lab.algorithms.base import BuildContext
from kd_lab.algorithms.one import ONE, ForwardTrace, upper_part
from kd_lab.algorithms.rocket import RocketLaunching
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.recorder import SELF, probe_shapes, record
from kd_lab.core.tasks import Classification
from kd_lab.errors import KDLabError
from kd_lab.models import MLP, CNN1d
from kd_lab.run.outcome import user_error
from kd_lab.run.train import train


def _built(algo, student: nn.Module, x: torch.Tensor, classes: int = 10):
    """Bind and build ``algo`` as the step does: bind, then the probe forward, then build."""
    algo.bind(student, None)
    algo.build(probe_shapes(student, algo.student_taps, x), {}, BuildContext(Classification(classes), 0))
    return algo


def _ce(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def _softmax(logits: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in logits]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


# -- Rocket Launching ---------------------------------------------------------------------------------------
def test_rocket_terms_by_hand():
    algo = RocketLaunching(tap="layers.0", hint_weight=0.03)
    algo.tap_path, algo.booster = "layers.0", nn.Identity()  # the booster's logits are the tap's values
    light = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    booster = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    y = torch.tensor([1, 0])
    terms = algo(step_outputs(logits=light, batch={"target": y}, features={"layers.0": booster}))
    # squared errors: (1 + 4) and (1 + 1), summed over classes, then the batch mean: 3.5
    assert terms["hint"].item() == pytest.approx(0.03 * 3.5, rel=1e-6)
    assert terms["ce"].item() == pytest.approx((_ce([1, 2], 1) + _ce([0, 0], 0)) / 2, rel=1e-6)
    assert terms["booster_ce"].item() == pytest.approx((_ce([0, 4], 1) + _ce([1, 1], 0)) / 2, rel=1e-6)


def test_rocket_gradient_block_keeps_the_hint_off_the_booster():
    torch.manual_seed(0)
    student, x, y = CNN1d((1, 40), 10, channels=(4, 6, 8)), torch.randn(6, 1, 40), torch.randint(0, 10, (6,))
    for block in (True, False):
        algo = _built(RocketLaunching(gradient_block=block), student, x)
        logits, feats = record(student, algo.student_taps, x)
        algo(step_outputs(logits=logits, batch={"target": y}, features=feats))["hint"].backward()
        booster_grad = sum(p.grad.abs().sum() for p in algo.booster.parameters() if p.grad is not None)
        assert (booster_grad == 0) == block  # blocked: no gradient; unblocked: the hint moves the booster
        assert student.head.weight.grad.abs().sum() > 0  # the hint always moves the light net
        student.zero_grad()


def test_rocket_gradcheck():
    torch.manual_seed(0)
    algo = RocketLaunching(tap="layers.0", booster_width=2.0, booster_depth=1, gradient_block=False)
    student = MLP((1, 8), 3, hidden=[4]).double()
    x, y = torch.randn(5, 1, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    _built(algo, student, x, classes=3).double()

    def loss(light, feature):
        terms = algo(step_outputs(logits=light, batch={"target": y}, features={"layers.0": feature}))
        return sum(terms.values())

    light = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    feature = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (light, feature))
    algo.gradient_block = True  # the booster side is a constant of the hint: check the light side alone
    assert torch.autograd.gradcheck(lambda z: loss(z, feature.detach()), (light,))


def test_rocket_run_reports_both_nets_and_their_cost(make_cfg):
    results, _ = train(make_cfg("scheme=self", "algorithm=rocket", "student=cnn1d_tiny", "debug=fdr"))
    report = results["algorithm"]
    assert report["deployed"] == "student" and report["tap"] == "blocks.0"
    costs = report["costs"]
    assert costs["trunk"]["params"] < costs["student"]["params"] < costs["booster"]["params"]
    assert costs["booster"]["flops"] > costs["student"]["flops"]
    for key in ("test/acc", "booster/test/acc"):
        assert 0.0 <= results["best"][key] <= 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.tap=.", r"algorithm=rocket cannot branch at the student's output.*Set algorithm.tap"),
        ("algorithm.tap=blocks.9", r"no module at path 'blocks.9'.*Nearest valid paths"),
        ("algorithm.booster_depth=0", r"algorithm.booster_depth=0 is out of range: it must be >= 1"),
        ("algorithm.booster_width=0", r"algorithm.booster_width=0 is out of range: it must be > 0"),
    ],
)
def test_rocket_invalid_uses_fail_before_compute(make_cfg, tmp_path, override, message):
    with pytest.raises(Exception) as info:  # a KDLabError, or Hydra's wrapper around one from a constructor
        train(make_cfg("scheme=self", "algorithm=rocket", "student=cnn1d_tiny", override, "debug=fdr"))
    assert re.search(message, str(user_error(info.value)))
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


# -- ONE ----------------------------------------------------------------------------------------------------
def test_one_terms_by_hand():
    # two branches on a (B, 2) shared feature: the student's logits and an identity branch; a gate of
    # constant scores weights them 1/2 each
    algo = ONE(branches=2, temperature=3.0, rampup=0.0)
    algo.tap_path = "layers.0"
    algo.branches = nn.ModuleList([nn.Identity()])
    algo.gate = lambda shared: torch.zeros(shared.shape[0], 2)
    student, branch, y = [0.0, 0.0], [2.0, 0.0], 0
    ensemble = [1.0, 0.0]
    terms = algo(
        step_outputs(
            logits=torch.tensor([student]),
            batch={"target": torch.tensor([y])},
            features={"layers.0": torch.tensor([branch]), SELF: torch.tensor([student])},
        )
    )
    assert terms["ce"].item() == pytest.approx(_ce(student, y), rel=1e-6)
    assert terms["branch_ce"].item() == pytest.approx(_ce(branch, y), rel=1e-6)
    assert terms["ensemble_ce"].item() == pytest.approx(_ce(ensemble, y), rel=1e-6)
    p_e = _softmax(ensemble, 3.0)
    kd = 9 * (_kl(p_e, _softmax(student, 3.0)) + _kl(p_e, _softmax(branch, 3.0)))
    assert terms["branch_kd"].item() == pytest.approx(kd, rel=1e-5)


def test_one_ramp_follows_the_reference_sigmoid():
    algo = ONE(rampup=0.25)
    algo.on_epoch_start(0, 100)
    assert algo.ramp == pytest.approx(math.exp(-5))
    algo.on_epoch_start(10, 100)  # t = 10 / 25
    assert algo.ramp == pytest.approx(math.exp(-5 * 0.6**2))
    algo.on_epoch_start(25, 100)
    assert algo.ramp == 1.0
    off = ONE(rampup=0.0)
    off.on_epoch_start(0, 100)
    assert off.ramp == 1.0


def test_one_losses_and_gradients_on_a_cnn():
    torch.manual_seed(0)
    student, x, y = CNN1d((1, 40), 10, channels=(4, 6, 8)), torch.randn(6, 1, 40), torch.randint(0, 10, (6,))
    algo = _built(ONE(), student, x)
    assert algo.tap_path == "blocks.1" and len(algo.branches) == 2
    logits, feats = record(student, algo.student_taps, x)
    terms = algo(step_outputs(logits=logits, batch={"target": y}, features=feats))
    # the same by hand, from the branches and the gate
    shared = feats["blocks.1"]
    zs = [logits, *(b(shared) for b in algo.branches)]
    g = F.softmax(algo.gate(shared), -1)
    ens = sum(g[:, i : i + 1] * z for i, z in enumerate(zs))
    p_e = F.softmax(ens.detach() / 3, -1)
    kd = sum((p_e * (p_e.log() - F.log_softmax(z / 3, -1))).sum(-1).mean() * 9 for z in zs)
    assert terms["branch_ce"].item() == pytest.approx(sum(F.cross_entropy(z, y) for z in zs[1:]).item(), rel=1e-5)
    assert terms["ensemble_ce"].item() == pytest.approx(F.cross_entropy(ens, y).item(), rel=1e-5)
    assert terms["branch_kd"].item() == pytest.approx(kd.item(), rel=1e-4)  # a small KL: float32 rounding
    # the KL does not move the ensemble: no gradient into the gate from it
    terms["branch_kd"].backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in algo.gate.parameters())
    assert student.blocks[0][0].weight.grad.abs().sum() > 0  # the branches train the shared trunk
    terms["ensemble_ce"].backward()
    assert algo.gate[2].weight.grad.abs().sum() > 0  # the ensemble's CE trains the gate


def test_one_gradcheck():
    torch.manual_seed(0)
    student = MLP((1, 8), 3, hidden=[4, 4]).double()
    x, y = torch.randn(5, 1, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    algo = _built(ONE(kd_weight=0.0), student, x, classes=3).double()

    def loss(light, shared):
        feats = {algo.tap_path: shared, SELF: light}
        return sum(algo(step_outputs(logits=light, batch={"target": y}, features=feats)).values())

    light = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (light, shared))
    # the KL toward a fixed (detached) ensemble, on the branch logits
    ensemble = torch.randn(5, 3, dtype=torch.float64)
    out = step_outputs(logits=light, batch={"target": y})
    assert torch.autograd.gradcheck(lambda z: kd_term(out, z, ensemble, 3.0), (light,))


def test_one_copies_the_upper_part_and_starts_it_apart():
    torch.manual_seed(0)
    student, x = CNN1d((1, 40), 10, channels=(4, 6, 8)).eval(), torch.randn(3, 1, 40)
    trace = ForwardTrace(student, "blocks.1")
    logits, feats = record(student, ["blocks.1"], x)
    chain = upper_part(student, trace, "one")
    assert not trace.handles  # the trace removed its hooks when the forward ended
    torch.testing.assert_close(chain.eval()(feats["blocks.1"]), logits)  # a faithful copy, with a flatten
    algo = _built(ONE(), student, x)
    copied = algo.branches[0][0][0].weight  # the copy of blocks.2's convolution, re-initialized
    assert copied.shape == student.blocks[2][0].weight.shape and not torch.equal(copied, student.blocks[2][0].weight)
    assert not torch.equal(copied, algo.branches[1][0][0].weight)  # and the copies differ from each other


class Residual(nn.Module):
    """A forward that is not a chain of modules above ``a``: ``head(h + b(h))``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.head(h + self.b(h))


def test_one_refuses_to_copy_a_forward_that_is_not_a_chain():
    x = torch.randn(4, 1, 8)
    with pytest.raises(KDLabError, match=r"does not reproduce its logits.*set algorithm.branch=head"):
        _built(ONE(tap="a"), Residual(), x, classes=3)
    algo = _built(ONE(tap="a", branch="head", head_width=2.0), Residual(), x, classes=3)  # the fix works
    assert algo.branches[0][0].out_features == 8


def test_one_run_reports_every_branch_and_the_ensemble(make_cfg):
    results, _ = train(make_cfg("scheme=self", "algorithm=one", "student=cnn1d_tiny", "debug=fdr"))
    report = results["algorithm"]
    assert report["deployed"] == "student" and report["tap"] == "blocks.1"
    costs = report["costs"]
    assert costs["branch2"]["params"] == costs["student"]["params"]  # a copy of the student's upper part
    assert costs["gated"]["params"] > costs["student"]["params"] > costs["trunk"]["params"]
    for key in ("test/acc", "branch2/test/acc", "branch3/test/acc", "gated/test/acc"):
        assert 0.0 <= results["best"][key] <= 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.branch=copies", r"algorithm.branch='copies' is not a branch kind: pick 'copy'"),
        ("algorithm.branches=1", r"algorithm.branches=1 is out of range: it must be >= 2"),
        ("algorithm.tap=.", r"algorithm=one cannot branch at the student's output.*Set algorithm.tap"),
        ("algorithm.temperature=0", r"algorithm.temperature=0 is out of range: it must be > 0"),
    ],
)
def test_one_invalid_uses_fail_before_compute(make_cfg, tmp_path, override, message):
    with pytest.raises(Exception) as info:  # a KDLabError, or Hydra's wrapper around one from a constructor
        train(make_cfg("scheme=self", "algorithm=one", "student=cnn1d_tiny", override, "debug=fdr"))
    assert re.search(message, str(user_error(info.value)))
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
