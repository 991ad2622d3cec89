"""DistilBERT, Patient KD and TinyBERT on task=sequence_classification (their papers' GLUE setting): the
class-logit terms by hand, the gradients, pad tokens left out of DistilBERT's cosine term, and runs on a
tiny SST-2 in GLUE's format (tests/test_glue.py writes it)."""

import math

import pytest
import torch
from test_glue import glue_cfg

from kd_lab.algorithms import PKD, DistilBERT, TinyBERT
from kd_lab.algorithms.base import StepOutputs
from kd_lab.core.tasks.sequence_classification import SequenceClassification
from kd_lab.run.train import train

KL = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL((1/4, 3/4) || (1/2, 1/2)) = 0.130812
TEACHER = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # p_T = (1/4, 3/4) and (3/4, 1/4)
LABELS = torch.tensor([1, 0])
INPUT = torch.tensor([[5, 6, 0], [7, 0, 0]])  # pad id 0


def outputs(**features) -> StepOutputs:
    student = torch.zeros(2, 2, requires_grad=True)  # p_S = (1/2, 1/2)
    return StepOutputs(
        logits=student,
        teacher_logits=TEACHER,
        batch={"input": INPUT, "target": LABELS},
        task=SequenceClassification(2),
        features=features.get("student", {}),
        teacher_features=features.get("teacher", {}),
    )


def hidden(real: list[float], pad: list[float]) -> torch.Tensor:
    """(2, 3, 2) states: ``real`` at the real tokens of INPUT, ``pad`` at its pads."""
    mask = (INPUT != 0)[..., None]
    return torch.where(mask, torch.tensor(real), torch.tensor(pad))


def test_distilbert_on_class_logits_by_hand_and_pads_out_of_the_cosine():
    algo = DistilBERT(alpha_ce=2.0, alpha_mlm=0.5, alpha_cos=1.0, temperature=1.0)
    algo.paths, algo.pad_token_id = ("s", "t"), 0
    # real tokens agree (cos 1); pads are orthogonal, which would count 1 - 0 each if they were not left out
    out = outputs(student={"s": hidden([1.0, 0.0], [0.0, 1.0])}, teacher={"t": hidden([2.0, 0.0], [1.0, 0.0])})
    terms = algo(out)
    assert terms["kd"].item() == pytest.approx(2.0 * KL, abs=1e-6)  # batch mean of two equal KLs
    assert terms["ce"].item() == pytest.approx(0.5 * math.log(2.0), abs=1e-6)
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-6)
    algo.pad_token_id = None  # no pad id known: every token counts, 3 pads of 6 tokens
    assert algo(out)["cos"].item() == pytest.approx(0.5, abs=1e-6)
    sum(terms.values()).backward()
    # d/ds of 2 * KL(p_T || softmax(s)) + 0.5 * CE = (2 (p_S - p_T) + 0.5 (p_S - y)) / batch
    expected = (2.0 * (0.5 - TEACHER.softmax(-1)) + 0.5 * (0.5 - torch.eye(2)[LABELS])) / 2
    torch.testing.assert_close(out.logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_pkd_on_class_logits_by_hand():
    algo = PKD(alpha=0.5, beta=10.0, temperature=1.0, mapping=[[0, 0]], token="first")
    algo.student_paths, algo.teacher_paths = ["s"], ["t"]
    # [CLS] states: (1, 0) against (0, 1) after normalization -> squared distance 2 over 2 units, per sample 1
    out = outputs(student={"s": hidden([3.0, 0.0], [0.0, 0.0])}, teacher={"t": hidden([0.0, 2.0], [0.0, 0.0])})
    terms = algo(out)
    assert terms["kd"].item() == pytest.approx(0.5 * KL, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.5 * math.log(2.0), abs=1e-6)
    assert terms["patience"].item() == pytest.approx(10.0 * 1.0, abs=1e-6)
    sum(terms.values()).backward()
    expected = (0.5 * (0.5 - TEACHER.softmax(-1)) + 0.5 * (0.5 - torch.eye(2)[LABELS])) / 2
    torch.testing.assert_close(out.logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_tinybert_prediction_stage_on_class_logits_by_hand():
    algo = TinyBERT(stage="prediction", prediction_weight=1.0, temperature=1.0)
    out = outputs()
    terms = algo(out)
    # soft CE against p_T with p_S uniform: -sum p_T log(1/2) = ln 2 per sample
    assert terms["prediction"].item() == pytest.approx(math.log(2.0), abs=1e-6)
    terms["prediction"].backward()
    torch.testing.assert_close(out.logits.grad, (0.5 - TEACHER.softmax(-1)) / 2, rtol=1e-5, atol=1e-6)


SAME_WIDTH = ["student.model.hidden_size=32", "student.model.num_layers=2", "teacher.model.num_layers=2"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm=distilbert", *SAME_WIDTH, "teacher.model.num_layers=4", "student.init_from_teacher=every_other"],
        ["algorithm=pkd", *SAME_WIDTH],
        ["algorithm=tinybert"],
    ],
    ids=["distilbert", "pkd", "tinybert"],
)
def test_fast_dev_run_on_sst2(make_cfg, tmp_path, overrides):
    results, objs = train(glue_cfg(make_cfg, tmp_path, *overrides))
    assert results["status"] == "finished" and objs["trainer"].fast_dev_run
    assert 0.0 <= results["best"]["test/acc"] <= 1.0 and math.isfinite(results["best"]["test/kl_to_teacher"])
    terms = objs["run"].step.training_terms(next(iter(objs["datamodule"].train_dataloader())))
    assert all(torch.isfinite(v) for v in terms.values()) and len(terms) >= 2
    if "student.init_from_teacher=every_other" in overrides:  # the classifier starts from teacher layers 0, 2
        assert results["init_from_teacher"]["teacher_layers"] == [0, 2]


def test_tinybert_chain_on_sst2_runs_both_stages(make_cfg, tmp_path):
    results, objs = train(glue_cfg(make_cfg, tmp_path, "algorithm=tinybert", "chain=tinybert"))
    assert results["status"] == "finished"
    [stage1] = results["chain"]
    assert stage1["stage"].startswith("stage1-") and objs["run"].algorithm.stage == "prediction"
