"""DistilBERT, Patient KD and student.init_from_teacher: hand-computed golden values, gradient checks, runs, and
every invalid use refused at build time, before the teacher is trained."""

import math

import pytest
import torch
from hydra.errors import InstantiationException
from test_lm import FDR, MASKED

from kd_lab.algorithms.base import StepOutputs
from kd_lab.algorithms.distilbert import DistilBERT, cosine_loss, last_hidden_path
from kd_lab.algorithms.pkd import PKD, patience_loss, pick_token
from kd_lab.core.tasks.language_modeling import LanguageModeling
from kd_lab.errors import KDLabError
from kd_lab.models import init_from_teacher as init_module
from kd_lab.models.hf import causal_lm, masked_lm
from kd_lab.models.init_from_teacher import plan_init
from kd_lab.run.train import train

# One token, vocabulary 2. At T=2 the teacher's logits [2 ln 3, 0] give p_T = [3/4, 1/4]; the student's [0, 0]
# give p_S = [1/2, 1/2]. T^2 KL(p_T || p_S) = 4 (3/4 ln(3/2) + 1/4 ln(1/2)) = 3 ln 1.5 + ln 0.5.
KL_T2 = 3 * math.log(1.5) + math.log(0.5)
CE = math.log(2.0)  # the student's CE on target 0
COS = 1 - 1 / math.sqrt(2)  # h_S = [1, 0], h_T = [1, 1]
SAME_WIDTH = ["student.model.hidden_size=32"]  # LM_TINY's teacher is 32 wide


def outputs(student_logits, teacher_logits, target, features=None, teacher_features=None, objective="causal"):
    task = LanguageModeling(vocab_size=student_logits.shape[-1], objective=objective)
    return StepOutputs(
        logits=student_logits,
        teacher_logits=teacher_logits,
        batch={"target": target},
        features=features or {},
        teacher_features=teacher_features or {},
        task=task,
    )


def one_token(dtype=torch.float32):
    s = torch.zeros(1, 1, 2, dtype=dtype)
    t = torch.tensor([[[2 * math.log(3.0), 0.0]]], dtype=dtype)
    return s, t, torch.tensor([[0]])


# -- DistilBERT ------------------------------------------------------------------------------------------------
def test_distilbert_triple_loss_matches_the_hand_computed_value():
    s, t, y = one_token()
    algo = DistilBERT()  # the paper's 5.0 / 2.0 / 1.0 at T = 2
    algo.paths = ("s", "t")
    out = outputs(s, t, y, {"s": torch.tensor([[[1.0, 0.0]]])}, {"t": torch.tensor([[[1.0, 1.0]]])})
    terms = algo(out)
    assert terms["kd"].item() == pytest.approx(5.0 * KL_T2, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(2.0 * CE, rel=1e-5)
    assert terms["cos"].item() == pytest.approx(1.0 * COS, rel=1e-5)


def test_distilbert_valid_positions_drop_the_unpredicted_tokens():
    """Masked LM: position 0 is not predicted (-100). 'all' counts its KL and cosine, 'valid' does not."""
    s, t, _ = one_token()
    student = torch.cat([torch.tensor([[[5.0, -5.0]]]), s], dim=1)  # position 0: far from the teacher
    teacher = torch.cat([torch.tensor([[[-5.0, 5.0]]]), t], dim=1)
    hs, ht = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[-100, 0]])
    valid = DistilBERT(alpha_mlm=0.0, kd_positions="valid")
    valid.paths = ("s", "t")
    terms = valid(outputs(student, teacher, target, {"s": hs}, {"t": ht}, objective="masked"))
    assert terms["kd"].item() == pytest.approx(5.0 * KL_T2, rel=1e-5)
    assert terms["cos"].item() == pytest.approx(COS, rel=1e-5)
    every = DistilBERT(alpha_mlm=0.0, kd_positions="all")
    every.paths = ("s", "t")
    terms = every(outputs(student, teacher, target, {"s": hs}, {"t": ht}, objective="masked"))
    assert terms["cos"].item() == pytest.approx((1.0 + COS) / 2, rel=1e-5)
    assert terms["kd"].item() > 5.0 * KL_T2


def test_distilbert_loss_gradients_are_exact_in_float64():
    torch.manual_seed(0)
    algo = DistilBERT(alpha_mlm=0.0)  # the task's CE is computed in float32: it is not this method's to check
    algo.paths = ("s", "t")
    t, ht = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    target = torch.tensor([[0, 1, 2], [3, 4, -100]])

    def loss(logits, hidden):
        return sum(algo(outputs(logits, t, target, {"s": hidden}, {"t": ht})).values())

    args = (torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),)
    args += (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),)
    assert torch.autograd.gradcheck(loss, args)
    hs = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: cosine_loss(h, ht.flatten(0, 1)), (hs,))


def test_distilbert_last_hidden_state_is_the_models_hidden_states_minus_one():
    sizes = dict(vocab_size=32, max_positions=8, hidden_size=8, num_layers=2, num_heads=2)
    assert last_hidden_path(causal_lm(arch="gpt2", **sizes)) == "transformer.ln_f"
    assert last_hidden_path(causal_lm(arch="llama", **sizes)) == "model.norm"
    assert last_hidden_path(masked_lm(**sizes)) == "bert.encoder.layer.1"


def test_distilbert_refuses_another_width_before_the_teacher_is_trained(make_cfg, tmp_path):
    cfg = make_cfg(*FDR, "algorithm=distilbert", fast=False)  # student 16 wide, teacher 32
    with pytest.raises(KDLabError, match=r"16 wide and the teacher's 32.*fitnet or tinybert"):
        train(cfg)
    assert not (tmp_path / "teachers").exists() or not any((tmp_path / "teachers").iterdir())


def test_distilbert_refuses_an_unknown_position_set():
    with pytest.raises(KDLabError, match="kd_positions='masked'"):
        DistilBERT(kd_positions="masked")


def test_distilbert_on_a_masked_lm_from_every_other_teacher_layer(make_cfg):
    overrides = [*MASKED, *SAME_WIDTH, "teacher.model.num_layers=2", "student.init_from_teacher=every_other"]
    results, _ = train(make_cfg(*FDR, *overrides, "algorithm=distilbert", fast=False))
    assert results["status"] == "finished" and math.isfinite(results["best"]["test/ppl"])
    assert results["init_from_teacher"]["teacher_layers"] == [0]


# -- Patient KD ------------------------------------------------------------------------------------------------
def test_patience_loss_matches_the_hand_computed_value():
    # [3, 4] / 5 = [0.6, 0.8] against [1, 0]: squared differences 0.16 + 0.64, mean over 2 elements = 0.4
    assert patience_loss(torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[1.0, 0.0]]])).item() == pytest.approx(0.4)


def test_pkd_total_matches_the_hand_computed_value_on_the_last_token():
    s, t, y = one_token()
    algo = PKD(alpha=0.5, beta=100.0, temperature=2.0)
    algo.pairs, algo.student_paths, algo.teacher_paths, algo.token = [(0, 1)], ["s0"], ["t1"], "last"
    hs = torch.tensor([[[9.0, -9.0], [3.0, 4.0]]])  # the first token would give another value
    ht = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    terms = algo(outputs(s, t, y, {"s0": hs}, {"t1": ht}))
    assert terms["kd"].item() == pytest.approx(0.5 * KL_T2, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5 * CE, rel=1e-5)
    assert terms["patience"].item() == pytest.approx(100.0 * 0.4, rel=1e-5)


def test_pick_token_first_last_mean():
    h = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    assert pick_token(h, "first").tolist() == [[1.0, 2.0]]
    assert pick_token(h, "last").tolist() == [[3.0, 6.0]]
    assert pick_token(h, "mean").tolist() == [[2.0, 4.0]]


def test_pkd_loss_gradients_are_exact_in_float64():
    torch.manual_seed(0)
    algo = PKD(alpha=1.0, temperature=2.0)  # alpha 1: no task CE, which is computed in float32
    algo.pairs, algo.student_paths, algo.teacher_paths, algo.token = [(0, 1), (1, 3)], ["a", "b"], ["c", "d"], "mean"
    t = torch.randn(2, 3, 5, dtype=torch.float64)
    tf = {k: torch.randn(2, 3, 4, dtype=torch.float64) for k in "cd"}
    target = torch.tensor([[0, 1, 2], [3, 4, -100]])

    def loss(logits, a, b):
        return sum(algo(outputs(logits, t, target, {"a": a, "b": b}, tf)).values())

    args = tuple(
        torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((2, 3, 5), (2, 3, 4), (2, 3, 4))
    )
    assert torch.autograd.gradcheck(loss, args)


def test_pkd_maps_layers_with_layer_pairs_and_picks_the_token_by_objective(make_cfg):
    from kd_lab.run.assemble import build_run
    from kd_lab.run.builders import build_datamodule

    cfg = make_cfg(
        *FDR, *SAME_WIDTH, "algorithm=pkd", "student.model.num_layers=2", "teacher.model.num_layers=4", fast=False
    )
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    algo = build_run(cfg, datamodule).algorithm
    assert algo.pairs == [(0, 1)]  # PKD-skip, 4 -> 2
    assert algo.student_paths == ["transformer.h.0"] and algo.teacher_paths == ["transformer.h.1"]
    assert algo.token == "last"  # a causal task


@pytest.mark.parametrize(
    "overrides, words",
    [
        ([], "pairs no layer"),  # LM_TINY: one student layer, all of it left to the prediction
        (["student.model.num_layers=2", "teacher.model.num_layers=3"], "multiple"),
        (["student.model.num_layers=2", "teacher.model.num_layers=2", "algorithm.mapping=middle"], "unknown"),
        (["student.model.num_layers=2", "teacher.model.num_layers=2", "algorithm.mapping=[[0,5]]"], "out of range"),
        (["student.model.num_layers=2", "teacher.model.num_layers=2", "student.model.hidden_size=16"], "16 wide"),
        (["student.model.num_layers=2", "teacher.model.num_layers=2", "algorithm.token=cls"], "token='cls'"),
    ],
)
def test_pkd_invalid_uses_fail_before_the_teacher_is_trained(make_cfg, tmp_path, overrides, words):
    cfg = make_cfg(*FDR, *SAME_WIDTH, "algorithm=pkd", *overrides, fast=False)
    # a constructor's refusal reaches us inside Hydra's InstantiationException; the KDLabError is its cause
    with pytest.raises((KDLabError, InstantiationException), match=words) as caught:
        train(cfg)
    assert isinstance(caught.value, KDLabError) or isinstance(caught.value.__cause__, KDLabError)
    assert not (tmp_path / "teachers").exists() or not any((tmp_path / "teachers").iterdir())


def test_pkd_on_a_masked_lm_uses_the_first_token(make_cfg):
    overrides = [*MASKED, *SAME_WIDTH, "student.model.num_layers=2", "teacher.model.num_layers=2"]
    results, objs = train(make_cfg(*FDR, *overrides, "algorithm=pkd", "algorithm.mapping=last", fast=False))
    assert results["status"] == "finished" and math.isfinite(results["best"]["test/ppl"])
    assert objs["run"].algorithm.token == "first" and objs["run"].algorithm.pairs == [(0, 0)]


# -- student.init_from_teacher ---------------------------------------------------------------------------------
def gpt2(layers=4, width=16, heads=2, arch="gpt2"):
    return causal_lm(arch=arch, vocab_size=32, max_positions=8, hidden_size=width, num_layers=layers, num_heads=heads)


@pytest.mark.parametrize("spec, layers", [("every_other", [0, 2]), ([1, 3], [1, 3]), ({"layers": [3, 0]}, [3, 0])])
def test_init_copies_the_chosen_teacher_blocks_and_every_other_tensor(spec, layers):
    torch.manual_seed(0)
    teacher, student = gpt2(4), gpt2(2)
    record = plan_init(student, teacher, spec).apply()
    assert record["teacher_layers"] == layers and record["student_layers"] == [0, 1]
    t, s = dict(teacher.named_parameters()), dict(student.named_parameters())
    for j, i in enumerate(layers):
        assert torch.equal(s[f"transformer.h.{j}.attn.c_attn.weight"], t[f"transformer.h.{i}.attn.c_attn.weight"])
        assert torch.equal(s[f"transformer.h.{j}.mlp.c_fc.bias"], t[f"transformer.h.{i}.mlp.c_fc.bias"])
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        assert torch.equal(s[name], t[name])


def test_init_works_for_bert_and_llama():
    torch.manual_seed(0)
    sizes = dict(vocab_size=32, max_positions=8, hidden_size=8, num_heads=2)
    bert_t, bert_s = masked_lm(num_layers=3, **sizes), masked_lm(num_layers=2, **sizes)
    plan_init(bert_s, bert_t, "every_other").apply()
    key = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(bert_s.state_dict()[key], bert_t.state_dict()[key.replace("layer.1", "layer.2")])
    llama_t, llama_s = gpt2(3, 8, arch="llama"), gpt2(1, 8, arch="llama")
    plan_init(llama_s, llama_t, [2]).apply()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(llama_s.state_dict()[key], llama_t.state_dict()[key.replace("layers.0", "layers.2")])


@pytest.mark.parametrize(
    "student, teacher, spec, words",
    [
        (lambda: gpt2(2, 8), lambda: gpt2(4, 16), "every_other", "transformer.wte.weight has shape"),
        (lambda: gpt2(2, 16, arch="llama"), lambda: gpt2(4, 16), "every_other", "one architecture family"),
        (lambda: gpt2(3), lambda: gpt2(4), "every_other", "at least 5 teacher layers"),
        (lambda: gpt2(2), lambda: gpt2(4), [0], "lists 1 teacher layers"),
        (lambda: gpt2(2), lambda: gpt2(4), [0, 4], "teacher layer 4 is out of range"),
        (lambda: gpt2(2), lambda: gpt2(4), "half", "'half' is unknown"),
        (lambda: gpt2(2), lambda: gpt2(4), {"layer": [0, 1]}, "unknown keys"),
        (lambda: gpt2(2, 16, heads=4), lambda: gpt2(4, 16, heads=2), "every_other", "4 attention heads"),
    ],
)
def test_init_refuses_what_it_cannot_copy(student, teacher, spec, words):
    with pytest.raises(KDLabError, match=words):
        plan_init(student(), teacher(), spec)


def test_init_runs_after_the_teacher_has_its_trained_weights(make_cfg, monkeypatch):
    """The plan is made from the untrained teacher; the copy takes the trained one, before the fit."""
    seen = {}
    plan_from_config, apply = init_module.plan_from_config, init_module.InitPlan.apply

    def planned(cfg, run):
        seen["untrained"] = run.teachers[0].transformer.wte.weight.detach().clone()
        return plan_from_config(cfg, run)

    def applied(self):
        record = apply(self)
        seen["copied"] = self.student.transformer.wte.weight.detach().clone()
        seen["trained"] = self.teacher.transformer.wte.weight.detach().clone()
        return record

    monkeypatch.setattr(init_module, "plan_from_config", planned)
    monkeypatch.setattr(init_module.InitPlan, "apply", applied)
    cfg = make_cfg(*FDR, *SAME_WIDTH, "teacher.model.num_layers=2", "student.init_from_teacher=[1]", fast=False)
    results, _ = train(cfg)
    record = results["init_from_teacher"]
    assert record["teacher_layers"] == [1] and record["student_layers"] == [0] and record["tensors"] > 0
    assert torch.equal(seen["copied"], seen["trained"])
    assert not torch.equal(seen["trained"], seen["untrained"])


def test_init_refuses_a_teacher_that_learns_with_the_student(make_cfg):
    cfg = make_cfg(*FDR, *SAME_WIDTH, "scheme=online", "student.init_from_teacher=every_other", fast=False)
    with pytest.raises(KDLabError, match="needs a trained teacher"):
        train(cfg)
