"""TinyBERT, MiniLM and MiniLMv2 (docs/lm-methods-tinybert-minilm.md): attention internals taken by module
path, hand-computed loss values, gradient checks, refusals at build time and both TinyBERT stages end to end.

The fast_dev_run of each algorithm alone is tests/test_lm.py::test_fast_dev_run_of_every_lm_algorithm_and_scheme."""

import json
import math

import pytest
import torch
from omegaconf import open_dict
from test_lm import FDR, assert_lm_metrics
from transformers import GPT2LMHeadModel

from kd_lab.algorithms.attention_capture import AttentionCapture, head_relation, relation_kl, self_relation
from kd_lab.algorithms.minilm import MiniLM, MiniLMv2
from kd_lab.algorithms.tinybert import TinyBERT, attention_mse, soft_cross_entropy
from kd_lab.core.recorder import FeatureRecorder, probe_shapes
from kd_lab.core.tasks.language_modeling import LanguageModeling
from kd_lab.errors import KDLabError
from kd_lab.models.hf import causal_lm, masked_lm, sequence_classifier
from kd_lab.models.mlp import MLP
from kd_lab.run.builders import build_model
from kd_lab.run.train import train

V, T = 300, 10


def distance(a: dict, b: dict) -> float:
    return sum((a[k].float() - b[k].float()).pow(2).sum().item() for k in a)


def lm_cfg(make_cfg, *overrides: str, run: str = "run"):
    return make_cfg(*FDR, *overrides, fast=False, run=run)


# -- attention capture ---------------------------------------------------------------------------------
MODELS = {
    "gpt2": lambda: causal_lm("gpt2", V, 16, 32, 2, 2),
    "bert": lambda: masked_lm(V, 16, 32, 2, 2),
    "llama": lambda: causal_lm("llama", V, 16, 32, 2, 2),
    "llama_gqa": lambda: causal_lm("llama", V, 16, 32, 2, 4, num_key_value_heads=2),
    "bert_classifier_with_padding": lambda: sequence_classifier("bert", 2, V, 16, 32, 2, 2),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_captured_attention_equals_the_models_own(name):
    """Probabilities recomputed from the q/k/v projections (and the mask) match output_attentions."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randint(1, V, (2, T))
    x[1, 7:] = 0  # padding: masked only by the classifier, which builds a mask from the pad id
    capture = AttentionCapture(model, "student", "minilm")
    recorder = FeatureRecorder(model, capture.taps(1))
    with recorder, torch.no_grad():
        reference = model(x, output_attentions=True).attentions[1]
    q, k, _ = capture.heads_of(recorder.features, 1)
    scores, mask = capture.scores(q, k, 1), capture.mask(x)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(scores.softmax(-1), reference, atol=1e-6, rtol=1e-5)


def test_capture_paths_per_architecture():
    assert AttentionCapture(MODELS["gpt2"](), "s", "m").taps(0) == ["transformer.h.0.attn.c_attn"]
    assert AttentionCapture(MODELS["bert"](), "s", "m").taps(1) == [
        f"bert.encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")
    ]
    assert AttentionCapture(MODELS["llama"](), "s", "m").taps(0) == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv"
    ]


def test_capture_refuses_a_model_without_attention_modules():
    with pytest.raises(KDLabError, match=r"algorithm=minilm needs attention modules.*attn\.c_attn.*self_attn\.q_proj"):
        AttentionCapture(MLP(input_shape=(8,), num_classes=3), "student", "minilm")


# -- golden values (hand-computed) ---------------------------------------------------------------------
def test_relation_kl_golden():
    """One query, two keys: KL([e^1, e^0] / Z || [1/2, 1/2]) by hand; a second query row with one visible key
    (the causal mask) has KL 0 and counts in the mean."""
    teacher = torch.tensor([[[[1.0, 0.0], [5.0, 7.0]]]])
    student = torch.tensor([[[[0.0, 0.0], [1.0, -3.0]]]])
    mask = torch.tensor([[[[True, True], [True, False]]]])
    p = [math.e / (math.e + 1), 1 / (math.e + 1)]
    kl_row0 = sum(pi * math.log(pi / 0.5) for pi in p)
    assert relation_kl(teacher, student, mask).item() == pytest.approx((kl_row0 + 0.0) / 2, rel=1e-6)
    unmasked_row1 = 0.0  # without a mask the second row counts fully
    q1 = [1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)]
    r1 = [math.e**4 / (1 + math.e**4), 1 / (1 + math.e**4)]
    unmasked_row1 = sum(a * math.log(a / b) for a, b in zip(q1, r1, strict=True))
    assert relation_kl(teacher, student, None).item() == pytest.approx((kl_row0 + unmasked_row1) / 2, rel=1e-6)


def test_self_relation_golden():
    """Width 4 split into 2 relation heads of 2: head 0 sees (x0, x1), head 1 (x2, x3); / sqrt(2)."""
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, -1.0, 2.0]]])
    r = self_relation(x, 2)
    assert r.shape == (1, 2, 2, 2)
    s = math.sqrt(2)
    expected = torch.tensor([[[[5 / s, 2 / s], [2 / s, 1 / s]], [[25 / s, 5 / s], [5 / s, 5 / s]]]])
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(head_relation(x[:, None]), (x @ x.transpose(-1, -2) / 2)[:, None])


def test_soft_cross_entropy_golden():
    """-sum softmax(z_T / t) log_softmax(z_S / t), t = 2, over the kept positions only."""
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0], [9.0, -9.0]])
    t = torch.tensor([[0.0, 2.0], [4.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([True, True, False])

    def row(zs, zt):
        ps = [math.exp(v / 2) / sum(math.exp(u / 2) for u in zs) for v in zs]
        pt = [math.exp(v / 2) / sum(math.exp(u / 2) for u in zt) for v in zt]
        return -sum(a * math.log(b) for a, b in zip(pt, ps, strict=True))

    expected = row([2, 0], [0, 2]) + row([0, 0], [4, 0])
    assert soft_cross_entropy(s, t, mask, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_attention_mse_sets_masked_scores_to_zero():
    """TinyBERT's reference code: masked positions count as 0 in both, so they add nothing but count in the mean."""
    s = torch.tensor([[[[1.0, 100.0], [2.0, 3.0]]]])
    t = torch.tensor([[[[0.0, -100.0], [0.0, 1.0]]]])
    mask = torch.tensor([[[[True, False], [True, True]]]])
    assert attention_mse(s, t, mask).item() == pytest.approx((1 + 0 + 4 + 4) / 4)


# -- gradient checks (float64) -------------------------------------------------------------------------
def test_gradcheck_of_every_loss():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
    teacher = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: relation_kl(teacher, s, causal), (rand(1, 2, 3, 3),))
    assert torch.autograd.gradcheck(lambda x: relation_kl(teacher, self_relation(x, 2), None), (rand(1, 3, 4),))
    assert torch.autograd.gradcheck(lambda s: attention_mse(s, teacher, causal), (rand(1, 2, 3, 3),))
    z_t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda z: soft_cross_entropy(z, z_t, mask, 2.0), (rand(4, 5),))


# -- the algorithms on real models (no Trainer) --------------------------------------------------------
def test_tinybert_taps_projections_and_terms():
    torch.manual_seed(0)
    student, teacher = causal_lm("gpt2", V, 16, 16, 2, 2), causal_lm("gpt2", V, 16, 32, 4, 2)
    algo = TinyBERT()
    algo.bind(student, teacher)
    assert algo.pairs == [(0, 1), (1, 3)]  # uniform: g(m) = m N / M
    assert "transformer.drop" in algo.student_taps and "transformer.h.3" in algo.teacher_taps
    assert "transformer.h.3.attn.c_attn" in algo.teacher_taps


def test_tinybert_terms_vanish_for_a_copy_with_identity_projections():
    """A student equal to its teacher, with W_e = W_h = identity: the intermediate terms are 0; the soft
    cross-entropy of a distribution with itself is its entropy; every projection receives a gradient."""
    torch.manual_seed(0)
    teacher = causal_lm("gpt2", V, 16, 32, 2, 2).eval()
    student = causal_lm("gpt2", V, 16, 32, 2, 2).eval()
    student.load_state_dict(teacher.state_dict())
    x = torch.randint(0, V, (2, T))
    algo = TinyBERT(mapping=[[0, 0], [1, 1]])
    algo.bind(student, teacher)
    shapes_s, shapes_t = probe_shapes(student, algo.student_taps, x), probe_shapes(teacher, algo.teacher_taps, x)
    algo.build(shapes_s, shapes_t, None)
    assert sorted(algo.projections) == ["embedding", "hidden0", "hidden1"]
    with torch.no_grad():
        for projection in algo.projections.values():
            projection.weight.copy_(torch.eye(32))
            projection.bias.zero_()
    out = _step(algo, student, teacher, x)
    terms = algo(out)
    assert set(terms) == {"embedding", "hidden", "attention", "prediction"}
    for key in ("embedding", "hidden", "attention"):
        assert terms[key].item() == pytest.approx(0.0, abs=1e-10)
    p = out.teacher_logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert terms["prediction"].item() == pytest.approx(entropy.item(), rel=1e-5)
    student.transformer.h[0].mlp.c_fc.weight.data.add_(0.1)  # now the hidden states differ
    terms = algo(_step(algo, student, teacher, x))
    assert terms["hidden"].item() > 0 and terms["attention"].item() > 0
    (terms["embedding"] + terms["hidden"]).backward()
    assert all(p.weight.grad is not None for p in algo.projections.values())


def test_tinybert_refuses_different_head_counts_and_names_the_fixes():
    student, teacher = causal_lm("gpt2", V, 16, 16, 1, 2), causal_lm("gpt2", V, 16, 32, 1, 4)
    with pytest.raises(KDLabError, match=r"student has 2 heads and the teacher 4.*num_heads=4.*attention_weight=0"):
        TinyBERT().bind(student, teacher)
    TinyBERT(attention_weight=0.0).bind(student, teacher)  # without the attention term the pair is fine
    TinyBERT(stage="prediction").bind(student, teacher)  # stage 2 reads logits only


def test_refusals_of_attention_methods():
    gpt2, bert = causal_lm("gpt2", V, 16, 32, 2, 2), masked_lm(V, 16, 32, 2, 2)
    with pytest.raises(KDLabError, match="student is causal and the teacher bidirectional"):
        MiniLM().bind(gpt2, bert)
    with pytest.raises(KDLabError, match=r"student has 2 heads and the teacher 4.*algorithm=minilmv2"):
        MiniLM().bind(gpt2, causal_lm("gpt2", V, 16, 32, 2, 4))
    with pytest.raises(KDLabError, match=r"relation_heads=3 does not divide the student's queries width 32.*heads=2\."):
        MiniLMv2(relation_heads=3).bind(gpt2, causal_lm("gpt2", V, 16, 48, 2, 4))
    with pytest.raises(KDLabError, match=r"teacher_layer=5 is out of range: the teacher has 2 layers"):
        MiniLMv2(teacher_layer=5).bind(gpt2, causal_lm("gpt2", V, 16, 32, 2, 4))
    with pytest.raises(KDLabError, match=r"algorithm\.stage='two' is not one of"):
        TinyBERT(stage="two")


def test_minilmv2_pairs_different_widths_and_heads():
    """Relation heads are independent of the models' heads: a 2-head 16-wide Llama student and a 4-head 32-wide
    GPT-2 teacher, with the teacher's layer given by index."""
    torch.manual_seed(0)
    student, teacher = causal_lm("llama", V, 16, 16, 2, 2), causal_lm("gpt2", V, 16, 32, 3, 4)
    algo = MiniLMv2(relation_heads=4, teacher_layer=1)
    algo.bind(student, teacher)
    assert algo.teacher_taps == ["transformer.h.1.attn.c_attn"]
    assert algo.student_taps == [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]


def _step(algo, student, teacher, x):
    """The terms of one batch, recorded as the step records them."""
    from kd_lab.algorithms.base import StepOutputs

    algo.bind(student, teacher)
    rec_s, rec_t = FeatureRecorder(student, algo.student_taps), FeatureRecorder(teacher, algo.teacher_taps)
    with rec_t, torch.no_grad():
        z_t = teacher(x).logits
    with rec_s:
        z_s = student(x).logits
    batch = {"input": x, "target": x}
    out = StepOutputs(logits=z_s, batch=batch, teacher_logits=z_t, task=LanguageModeling(vocab_size=V))
    out.features, out.teacher_features = rec_s.features, rec_t.features
    return out


@pytest.mark.parametrize("cls", [MiniLM, MiniLMv2])
def test_minilm_terms_vanish_for_a_copy_of_the_teacher(cls):
    torch.manual_seed(0)
    teacher = causal_lm("gpt2", V, 16, 32, 2, 2).eval()
    student = causal_lm("gpt2", V, 16, 32, 2, 2).eval()
    x = torch.randint(0, V, (2, T))
    algo = cls(ce_weight=0.0)
    different = algo(_step(algo, student, teacher, x))
    assert all(v.item() > 1e-6 for v in different.values())
    different["qq" if cls is MiniLMv2 else "attention"].backward()
    assert student.transformer.h[1].attn.c_attn.weight.grad.abs().sum() > 0
    student.load_state_dict(teacher.state_dict())
    same = algo(_step(algo, student, teacher, x))
    assert set(same) == ({"attention", "value"} if cls is MiniLM else {"qq", "kk", "vv"})
    assert all(abs(v.item()) < 1e-6 for v in same.values())


# -- end to end ----------------------------------------------------------------------------------------
def test_minilm_with_different_heads_fails_before_the_teacher_trains(make_cfg, tmp_path):
    cfg = lm_cfg(make_cfg, "algorithm=minilm", "teacher.model.num_heads=4")
    with pytest.raises(KDLabError, match=r"student\.model\.num_heads=4"):
        train(cfg)
    assert not (tmp_path / "teachers").exists()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"


def test_minilmv2_fast_dev_run_across_widths_heads_and_architectures(make_cfg):
    cfg = lm_cfg(
        make_cfg,
        "algorithm=minilmv2",
        "student=llama_student",
        "student.model.intermediate_size=32",
        "teacher.model.num_heads=4",
        "teacher.model.num_layers=2",
        "algorithm.teacher_layer=0",
    )
    results, objs = train(cfg)
    assert_lm_metrics(results)
    assert objs["run"].algorithm.teacher_taps == ["transformer.h.0.attn.c_attn"]


def test_tinybert_fast_dev_run_on_bert(make_cfg):
    cfg = lm_cfg(
        make_cfg,
        "data=text_mlm",
        "teacher=bert_teacher",
        "student=bert_student",
        "algorithm=tinybert",
        "algorithm.mapping=[[0,0]]",  # explicit pairs through the config
    )
    results, objs = train(cfg)
    assert results["status"] == "finished"
    assert "bert.embeddings" in objs["run"].algorithm.student_taps
    assert objs["run"].algorithm.pairs == [(0, 0)]


def test_tinybert_chain_runs_both_stages_and_carries_the_student(make_cfg, tmp_path):
    chain = ("algorithm=tinybert", "chain=tinybert", "teacher.model.num_layers=2")
    cfg = lm_cfg(make_cfg, *chain)
    results, objs = train(cfg)
    assert_lm_metrics(results)
    [stage1] = results["chain"]
    assert stage1["stage"] == "stage1-gpt2_student" and not stage1["reused"]
    stage1_results = json.loads((tmp_path / "teachers" / stage1["path"].split("/")[-1] / "results.json").read_text())
    assert stage1_results["config"]["algorithm"]["stage"] == "intermediate"
    algo = objs["run"].algorithm
    assert algo.stage == "prediction" and algo.student_taps == []  # stage 2: the logits only
    assert objs["run"].student.training  # loaded with from_pretrained, it still trains with dropout
    # stage 2 started from stage 1's weights: one step later it is nearer them than a fresh init of its seed
    from transformers import AutoModelForCausalLM

    first = AutoModelForCausalLM.from_pretrained(f"{stage1['path']}/student").state_dict()
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.student.model).state_dict()
    final = objs["run"].student.state_dict()
    assert type(objs["run"].student) is GPT2LMHeadModel
    assert distance(final, first) < distance(final, fresh)
    # a second run reuses stage 1 from the store
    again, _ = train(
        lm_cfg(make_cfg, "algorithm=tinybert", "chain=tinybert", "teacher.model.num_layers=2", run="again")
    )
    assert again["chain"][0]["reused"]


def test_tinybert_chain_refuses_another_algorithm(make_cfg, tmp_path):
    with pytest.raises(KDLabError, match=r"chain=tinybert sets algorithm.stage.*algorithm=tinybert"):
        train(lm_cfg(make_cfg, "algorithm=token_kd", "chain=tinybert"))
    assert not (tmp_path / "teachers").exists()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"


def test_tinybert_chain_refuses_a_student_it_cannot_carry(make_cfg, tmp_path):
    """The chain carries weights through save_pretrained: a student config without ``pretrained`` is refused."""
    cfg = lm_cfg(make_cfg, "algorithm=tinybert", "chain=tinybert")
    with open_dict(cfg):
        del cfg.student.model.pretrained
    with pytest.raises(KDLabError, match=r"not a Hugging Face model \(no student\.model\.pretrained\)"):
        train(cfg)
    assert not (tmp_path / "teachers").exists()


def test_tinybert_chain_carries_the_last_weights_of_stage_one(make_cfg, tmp_path, monkeypatch):
    """Stage 1 does not train the predictions, so its best validation perplexity says nothing about it: the
    chain hands on its last epoch's weights. Checkpoints are kept here (rmtree patched out) to compare."""
    import kd_lab.run.chain as chain

    monkeypatch.setattr(chain.shutil, "rmtree", lambda *a, **k: None)
    cfg = make_cfg(
        *[o for o in FDR if o != "debug=fdr"],
        "algorithm=tinybert",
        "chain=tinybert",
        "trainer.max_epochs=3",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "callbacks.model_checkpoint.mode=max",  # "best" = the worst perplexity, an epoch before the last
        fast=False,
    )
    results, _ = train(cfg)
    entry = results["chain"][0]["path"]
    carried = torch.load(f"{entry}/teacher.pt", weights_only=True)

    def student_of(name):
        state = torch.load(f"{entry}/checkpoints/{name}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}

    last, best = student_of("last"), student_of("best")
    assert all(torch.equal(carried[k], last[k]) for k in last)
    assert any(not torch.equal(last[k], best[k]) for k in last)  # the two differ here, so the check means something
