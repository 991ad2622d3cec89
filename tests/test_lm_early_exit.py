"""Early exits on transformers (algorithm=early_exit): the loss by hand, its gradients (what detach_backbone
stops), an exported exit against the multi-exit model, each exit's metrics and cost in a run, and what the
algorithm refuses before anything trains. The fast_dev_run of each scheme is tests/test_lm.py's matrix."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_glue import glue_cfg
from test_lm import FDR, lm_cfg

from kd_lab.algorithms import EarlyExit
from kd_lab.algorithms.base import BuildContext
from kd_lab.core.recorder import probe_shapes, record
from kd_lab.core.tasks.classification import Classification
from kd_lab.core.tasks.language_modeling import LanguageModeling
from kd_lab.errors import KDLabError
from kd_lab.models.hf import causal_lm, masked_lm, sequence_classifier
from kd_lab.models.mlp import MLP
from kd_lab.run.train import train
from kd_lab.tools.exits import export_exit

V, T = 50, 6


def gpt2(layers: int = 3):
    torch.manual_seed(0)
    return causal_lm(vocab_size=V, max_positions=T, hidden_size=16, num_layers=layers, num_heads=2).eval()


def built(student, x, task, **kwargs) -> EarlyExit:
    algo = EarlyExit(**kwargs)
    algo.bind(student, None)
    algo.build(probe_shapes(student, algo.student_taps, x), {}, BuildContext(task, 0))
    return algo


def step(student, algo, x, task):
    from helpers import step_outputs

    logits, feats = record(student, algo.student_taps, x)
    target = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1)  # next tokens; the last counts nothing
    return step_outputs(logits=logits, batch={"input": x, "target": target}, features=feats, task=task)


def test_two_class_loss_by_hand():
    """Deep logits (0, ln 3) and an exit at (0, 0): p = (1/4, 3/4), q = (1/2, 1/2), label 1."""
    algo = EarlyExit(ce_weight=1.0, exit_ce_weight=0.5, kd_weight=2.0, temperature=1.0)
    algo.exit_paths = ["block"]
    algo.heads = torch.nn.ModuleList([torch.nn.Identity()])
    from helpers import step_outputs

    deep = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    out = step_outputs(logits=deep, batch={"target": torch.tensor([1])}, features={"block": torch.zeros(1, 2)})
    terms = algo(out)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812
    assert terms["ce"].item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert terms["exit_ce"].item() == pytest.approx(0.5 * math.log(2.0), abs=1e-6)
    assert terms["exit_kd"].item() == pytest.approx(2.0 * kl, abs=1e-6)


def test_lm_exit_loss_and_gradients_with_a_detached_backbone():
    student, task = gpt2().train(), LanguageModeling(V)
    x = torch.randint(0, V, (4, T))
    algo = built(student, x, task, exit_ce_weight=0.5, temperature=2.0)
    assert algo.exit_paths == ["transformer.h.0", "transformer.h.1"]
    for head in algo.heads:  # exits far from the deep output: a KL large enough to compare in float32
        head.layers[0].weight.data.normal_(0, 20)
    out = step(student, algo, x, task)
    terms = algo(out)
    # by hand: each exit is a copy of ln_f, then the shared lm_head; KL to the detached deep output, T^2 scaled
    deep = out.logits.detach()[:, :-1].flatten(0, 1)
    kd, ce = 0.0, 0.0
    for i, path in enumerate(algo.exit_paths):
        z = student.lm_head(algo.heads[i].layers[0](out.features[path]))[:, :-1].flatten(0, 1)
        p = F.softmax(deep / 2, -1)
        kd += (p * (p.log() - F.log_softmax(z / 2, -1))).sum(-1).mean() * 4
        ce += F.cross_entropy(z, x[:, 1:].flatten())
    assert terms["exit_kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert terms["exit_ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)
    (terms["exit_kd"] + terms["exit_ce"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.heads.parameters())
    # detach_backbone: the exits train their own norms only, not the blocks or the shared head
    assert all(p.grad is None for p in student.parameters())
    assert not any(p is q for p in algo.parameters() for q in student.parameters())  # the head is not copied


def test_joint_training_reaches_the_backbone():
    student, task = gpt2().train(), LanguageModeling(V)
    x = torch.randint(0, V, (4, T))
    algo = built(student, x, task, detach_backbone=False)
    algo(step(student, algo, x, task))["exit_kd"].backward()
    assert student.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
    assert student.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_exported_exit_equals_the_exit_inside_the_model(arch):
    torch.manual_seed(0)
    if arch == "gpt2":
        student, task = gpt2(), LanguageModeling(V)
    else:
        student = masked_lm(vocab_size=V, max_positions=T, hidden_size=16, num_layers=3, num_heads=2).eval()
        task = LanguageModeling(V, objective="masked")
    x = torch.randint(1, V, (2, T))
    algo = built(student, x, task, exits=[1]).eval()
    inside = algo.exit_logits(record(student, algo.student_taps, x)[1])["exit1"]
    torch.testing.assert_close(export_exit(student, algo, "exit1")(x), inside, rtol=0, atol=0)


def test_classifier_exit_is_a_copy_of_pooler_and_classifier():
    torch.manual_seed(0)
    student = sequence_classifier(vocab_size=V, max_positions=T, hidden_size=16, num_layers=2, num_heads=2).eval()
    x = torch.randint(1, V, (3, T))
    algo = built(student, x, Classification(2))
    logits = algo.exit_logits(record(student, algo.student_taps, x)[1])["exit1"]
    assert logits.shape == (3, 2)
    assert algo.heads[0].layers[0] is not student.bert.pooler  # a copy: the exit learns on its own


def test_refusals_name_the_problem_and_the_fix():
    x = torch.randint(0, V, (2, T))
    task = LanguageModeling(V)
    with pytest.raises(KDLabError, match=r"needs a transformer student.*use algorithm=byot"):
        EarlyExit().bind(MLP((8,), 2), None)
    with pytest.raises(KDLabError, match="at least 2 blocks"):
        EarlyExit().bind(gpt2(layers=1), None)
    with pytest.raises(KDLabError, match=r"block 2, but .* 0\.\.1"):
        EarlyExit(exits=[2]).bind(gpt2(), None)
    with pytest.raises(KDLabError, match="the last block"):
        EarlyExit(exits=["transformer.h.2"]).bind(gpt2(), None)
    with pytest.raises(KDLabError, match="no module at path"):
        EarlyExit(exits=["transformer.h.9"]).bind(gpt2(), None)
    gpt2_classifier = sequence_classifier(
        arch="gpt2", vocab_size=V, max_positions=T, hidden_size=16, num_layers=2, num_heads=2
    )
    with pytest.raises(KDLabError, match=r"student\.model\.arch=bert"):
        built(gpt2_classifier, x, Classification(2))
    assert built(gpt2(), x, task).exit_paths  # the same spec on a causal LM builds


def test_lm_run_reports_each_exit_and_its_cost(make_cfg):
    results, _ = train(lm_cfg(make_cfg, "scheme=self", "algorithm=early_exit", "student.model.num_layers=2"))
    assert results["status"] == "finished"
    exits = results["algorithm"]["exits"]
    assert list(exits) == ["exit1", "student"] and exits["exit1"]["tap"] == "transformer.h.0"
    assert exits["exit1"]["flops"] < exits["student"]["flops"]
    assert exits["exit1"]["params"] < exits["student"]["params"]
    for key in ("exit1/test/ppl", "ensemble/test/ppl", "test/ppl"):
        assert math.isfinite(results["best"][key]) and results["best"][key] >= 1.0


def test_sequence_classification_run_reports_each_exit(make_cfg, tmp_path):
    results, _ = train(
        glue_cfg(make_cfg, tmp_path, "scheme=self", "algorithm=early_exit", "student.model.num_layers=2")
    )
    assert results["status"] == "finished"
    assert 0.0 <= results["best"]["exit1/test/acc"] <= 1.0
    assert list(results["algorithm"]["exits"]) == ["exit1", "student"]


def test_offline_scheme_is_refused_at_build_time(make_cfg):
    with pytest.raises(KDLabError, match="early_exit' cannot run under scheme 'offline'"):
        train(make_cfg(*FDR, "algorithm=early_exit", fast=False))
