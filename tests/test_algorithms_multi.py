"""Golden values, gradients and invariants of multi_teacher, adversarial and cross_modal."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import step_outputs

from kd_lab.algorithms import Adversarial, BuildContext, CrossModal, MultiTeacher, kd_loss
from kd_lab.algorithms.multi_teacher import aggregate
from kd_lab.core.tasks import Classification
from kd_lab.errors import KDLabError
from kd_lab.run.train import train

PAIRED = BuildContext(Classification(3), 10, teacher_input_key="teacher_input")  # cross-modal: two inputs


def test_aggregate_golden():
    # two teachers, one sample, two classes, T = 1: p1 = [3/4, 1/4], p2 = [1/2, 1/2]
    z1, z2 = torch.tensor([[math.log(3), 0.0]]), torch.tensor([[0.0, 0.0]])
    torch.testing.assert_close(aggregate([z1, z2], 1.0, "mean"), torch.tensor([[0.625, 0.375]]))
    w = torch.tensor([3.0, 1.0])
    torch.testing.assert_close(aggregate([z1, z2], 1.0, "weights", w), torch.tensor([[0.6875, 0.3125]]))
    # confidence, label 0: CE1 = -ln(3/4), CE2 = -ln(1/2); weights = softmax(-CE) = [3/4, 1/2] / (5/4) = [0.6, 0.4]
    got = aggregate([z1, z2], 1.0, "confidence", target=torch.tensor([0]))
    torch.testing.assert_close(got, torch.tensor([[0.6 * 0.75 + 0.4 * 0.5, 0.6 * 0.25 + 0.4 * 0.5]]))


def test_multi_teacher_with_one_teacher_is_kd():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    algo = MultiTeacher(ce_weight=0.0, kd_weight=1.0, temperature=3.0)
    algo.bind(torch.nn.Identity(), None)
    algo.build({}, {}, BuildContext(Classification(4), 10, all_teacher_shapes=[{}]))
    out = step_outputs(logits=s, batch={"target": y}, teacher_logits=t, all_teacher_logits=[t])
    assert algo(out)["kd"].item() == pytest.approx(kd_loss(s, t, 3.0).item(), rel=1e-5)


def test_multi_teacher_gradcheck_and_config_errors():
    t1, t2 = torch.randn(3, 4, dtype=torch.double), torch.randn(3, 4, dtype=torch.double)
    s = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    y = torch.tensor([0, 1, 2])

    def loss(x):
        p = aggregate([t1, t2], 2.0, "confidence", target=y)
        return F.kl_div(F.log_softmax(x / 2.0, -1), p, reduction="batchmean")

    assert torch.autograd.gradcheck(loss, (s,))
    with pytest.raises(KDLabError, match="aggregation='vote' is unknown"):
        MultiTeacher(aggregation="vote")
    algo = MultiTeacher(aggregation="weights", weights=[1.0])
    with pytest.raises(KDLabError, match="weights has 1 entries for 2 teachers"):
        algo.build({}, {}, BuildContext(Classification(4), 10, all_teacher_shapes=[{}, {}]))


def _adversarial(discriminate: str = "logits") -> Adversarial:
    algo = Adversarial(adv_weight=0.5, kd_weight=0.0, ce_weight=0.0, discriminate=discriminate)
    algo.build({}, {}, BuildContext(Classification(3), num_train=10))
    for p in algo.discriminator.parameters():
        torch.nn.init.zeros_(p)  # D outputs 0: every BCE term is ln 2
    return algo


def test_adversarial_losses_golden():
    algo = _adversarial()
    out = step_outputs(
        logits=torch.randn(4, 3), batch={"target": torch.tensor([0, 1, 2, 0])}, teacher_logits=torch.randn(4, 3)
    )
    assert algo.adversary_loss(out)["discriminator"].item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert algo(out)["adversarial"].item() == pytest.approx(0.5 * math.log(2), rel=1e-6)


def test_adversarial_gradients_reach_the_right_player():
    algo = Adversarial(adv_weight=1.0)
    algo.build({}, {}, BuildContext(Classification(3), num_train=10))
    s = torch.randn(4, 3, requires_grad=True)
    out = step_outputs(logits=s, batch={"target": torch.tensor([0, 1, 2, 0])}, teacher_logits=torch.randn(4, 3))
    algo.adversary_loss(out)["discriminator"].backward()
    assert s.grad is None  # the discriminator's loss does not train the student
    assert all(p.grad is not None for p in algo.discriminator.parameters())
    algo.zero_grad()
    algo(out)["adversarial"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert algo.adversary().module is algo.discriminator


def test_cross_modal_hint_golden_and_gradients():
    algo = CrossModal(ce_weight=0.0, kd_weight=0.0, hint_weight=2.0, student_tap="a", teacher_tap="b")
    algo.paths = ("a", "b")
    algo.build({"a": torch.Size([2, 3])}, {"b": torch.Size([2, 3])}, PAIRED)
    e_s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    e_t = torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    out = step_outputs(
        logits=torch.zeros(2, 3), batch={"target": torch.tensor([0, 1])}, teacher_logits=torch.zeros(2, 3)
    )
    out.features, out.teacher_features = {"a": e_s}, {"b": e_t}
    hint = algo(out)["hint"]
    assert hint.item() == pytest.approx(2.0 * (4 + 3) / 6)  # identity connector: MSE over 6 entries
    hint.backward()
    assert e_s.grad.abs().sum() > 0
    algo.build({"a": torch.Size([2, 5])}, {"b": torch.Size([2, 3])}, PAIRED)
    assert isinstance(algo.connector, torch.nn.Linear) and algo.connector.weight.shape == (3, 5)


def test_adversarial_fit_trains_discriminator_with_its_own_optimizer(make_cfg):
    results, objs = train(make_cfg("algorithm=adversarial", "student=cnn1d_tiny"))
    trainer, module = objs["trainer"], objs["module"]
    assert not module.automatic_optimization and len(trainer.optimizers) == 2
    d_params = {id(p) for p in module.algorithm.discriminator.parameters()}
    assert {id(p) for g in trainer.optimizers[1].param_groups for p in g["params"]} == d_params
    assert not d_params & {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert results["status"] == "finished" and trainer.global_step > 0


def test_multi_teacher_resolves_every_teacher_from_the_store(make_cfg):
    cfg = make_cfg(
        "algorithm=multi_teacher", "teacher=cnn1d_large", "teacher.model.channels=[8,8,8]",
        "algorithm.aggregation=confidence", "algorithm.hint_weight=1.0", "algorithm.hint_teachers=[0,1]",
    )  # fmt: skip
    results, objs = train(cfg)
    assert results["teacher"]["name"] == "cnn1d_large" and results["teacher"]["extra_1"]["name"] == "mlp_large"
    assert len(objs["module"].teachers) == 2
    assert set(objs["module"].algorithm.connectors) == {"0", "1"}
    again, _ = train(
        make_cfg("algorithm=multi_teacher", "teacher=cnn1d_large", "teacher.model.channels=[8,8,8]", run="b")
    )
    assert again["teacher"]["reused"] and again["teacher"]["extra_1"]["reused"]


def test_cross_modal_teacher_reads_its_own_modality(make_cfg):
    results, objs = train(make_cfg("data=fake_xmodal", "algorithm=cross_modal"))
    module = objs["module"]
    assert module.input_key == "input" and module.teacher_input_key == "teacher_input"
    assert objs["teacher"].layers[0][0].in_features == 40 and module.student.layers[0][0].in_features == 10
    assert results["status"] == "finished"
