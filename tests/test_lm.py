"""The language-modeling task end to end: every algorithm that declares it, masked LM, the generation report,
bad input, padded vocabularies, pretrained students and the token normalization (docs/language-models.md).

Everything runs tiny GPT-2/BERT models (vocabulary 300, blocks of 16 tokens) on the real, offline
``pydoc_topics`` corpus; the BPE is trained once per session in the shared data dir."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from kd_lab.algorithms import TokenKD
from kd_lab.errors import KDLabError
from kd_lab.losses.divergences import KINDS
from kd_lab.run.assemble import build_run
from kd_lab.run.builders import build_datamodule
from kd_lab.run.checks.compatibility import algorithm_classes
from kd_lab.run.train import summary, train

LM = "language_modeling"
LM_TINY = [
    "experiment=lm",
    "data.vocab_size=300",
    "data.block_size=16",
    "teacher.model.hidden_size=32",
    "teacher.model.num_layers=1",
    "teacher.model.num_heads=2",
    "student.model.hidden_size=16",
    "student.model.num_layers=1",
    "student.model.num_heads=2",
    "teacher.max_epochs=1",
    "trainer.max_epochs=1",
    "data.batch_size=8",
    "task.prompts=2",
    "task.new_tokens=4",
    "task.prompt_length=4",
    "trainer.accelerator=cpu",
    "logger=none",
]
FDR = [*LM_TINY, "debug=fdr"]
MASKED = ["data=text_mlm", "teacher=bert_teacher", "student=bert_student"]  # LM_TINY sizes apply to BERT too

CLASSES = algorithm_classes()
LM_ALGORITHMS = sorted(name for name, cls in CLASSES.items() if LM in cls.task_kinds)
OTHER_ALGORITHMS = sorted(name for name, cls in CLASSES.items() if LM not in cls.task_kinds)
LM_PAIRS = [(name, scheme) for name in LM_ALGORITHMS for scheme in sorted(CLASSES[name].schemes)]
# what an algorithm needs on an LM beyond its defaults (its default extra teachers are classifiers)
LM_SETTINGS = {
    "multi_teacher": ["algorithm.extra_teachers=[gpt2_teacher]"],
    # its cosine term compares last hidden states: the student takes the teacher's width (LM_TINY: 32)
    "distilbert": ["student.model.hidden_size=32"],
    # the same width, and two layers: PKD-skip maps every student layer but the last
    "pkd": ["student.model.hidden_size=32", "student.model.num_layers=2", "teacher.model.num_layers=2"],
    # an exit needs a block before the last one
    "early_exit": ["student.model.num_layers=2"],
}


def lm_cfg(make_cfg, *overrides: str):
    """A composed LM config: no FAST classification overrides (``data=fake`` would win over the experiment)."""
    return make_cfg(*FDR, *overrides, fast=False)


def assert_lm_metrics(results: dict, teacher: bool = True) -> None:
    """Finite test metrics; ``teacher``: the run has a teacher to compare with (not under scheme=self)."""
    assert results["status"] == "finished"
    best = results["best"]
    assert math.isfinite(best["test/ppl"]) and best["test/ppl"] >= 1.0
    if not teacher:
        assert "test/teacher_ppl" not in best
        return
    for key in ("test/teacher_ppl", "test/agreement"):
        assert math.isfinite(best[key]), key
    assert 0.0 <= best["test/agreement"] <= 1.0
    assert best["test/teacher_ppl"] >= 1.0


def test_the_lm_algorithms_are_the_declared_ones():
    """The matrix below is derived from the classes; this pins what they declare today."""
    assert {"none", "kd", "fitnet", "codistillation", "token_kd"} <= set(LM_ALGORITHMS)
    assert ("codistillation", "online") in LM_PAIRS and ("codistillation", "offline") not in LM_PAIRS


@pytest.mark.parametrize(("algorithm", "scheme"), LM_PAIRS)
def test_fast_dev_run_of_every_lm_algorithm_and_scheme(make_cfg, algorithm, scheme):
    cfg = lm_cfg(make_cfg, f"algorithm={algorithm}", f"scheme={scheme}", *LM_SETTINGS.get(algorithm, []))
    results, objs = train(cfg)
    assert objs["trainer"].fast_dev_run
    # algorithm=none trains without the teacher; the test still compares with it. scheme=self has none.
    assert_lm_metrics(results, teacher=scheme != "self")
    if algorithm == "fitnet":  # "middle" of one block is block 0, on both models; a per-token projection
        assert list(objs["run"].algorithm.paths) == ["transformer.h.0", "transformer.h.0"]
        assert type(objs["run"].algorithm.regressor).__name__ == "TokenRegressor"


def test_fitnet_with_explicit_block_taps(make_cfg):
    cfg = lm_cfg(
        make_cfg,
        "algorithm=fitnet",
        "teacher.model.num_layers=2",
        "algorithm.student_tap=transformer.h.0",
        "algorithm.teacher_tap=transformer.h.1",
    )
    results, objs = train(cfg)
    assert_lm_metrics(results)
    assert list(objs["run"].algorithm.paths) == ["transformer.h.0", "transformer.h.1"]


@pytest.mark.parametrize("divergence", KINDS)
def test_token_kd_with_every_divergence(make_cfg, divergence):
    results, objs = train(lm_cfg(make_cfg, "algorithm=token_kd", f"algorithm.divergence={divergence}"))
    assert_lm_metrics(results)
    assert objs["run"].algorithm.divergence == divergence


@pytest.mark.parametrize("algorithm", OTHER_ALGORITHMS)
def test_an_algorithm_without_language_modeling_fails_at_build_time(make_cfg, algorithm, tmp_path):
    scheme = "offline" if "offline" in CLASSES[algorithm].schemes else sorted(CLASSES[algorithm].schemes)[0]
    cfg = lm_cfg(make_cfg, f"algorithm={algorithm}", f"scheme={scheme}")
    with pytest.raises(KDLabError, match=f"algorithm '{algorithm}' cannot run on a language_modeling task"):
        train(cfg)
    assert not (tmp_path / "teachers").exists()  # nothing was trained
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"


@pytest.mark.parametrize("algorithm", ["token_kd", "kd"])
def test_masked_lm_runs_and_reports_no_generation(make_cfg, algorithm):
    results, objs = train(lm_cfg(make_cfg, *MASKED, f"algorithm={algorithm}"))
    assert_lm_metrics(results)
    assert objs["run"].task.objective == "masked"
    assert results["report"] == {}  # a masked LM does not generate
    text = summary(results, objs["trainer"].default_root_dir)
    assert "generation" not in text and "acceptance" not in text


def test_the_generation_report_of_a_causal_run(make_cfg, tmp_path):
    train(lm_cfg(make_cfg))
    report = json.loads((tmp_path / "run" / "results.json").read_text())["report"]
    for model in ("student", "teacher"):
        speed = report["generation"][model]
        assert speed["tokens_per_second"] > 0 and speed["new_tokens"] == 2 * 4  # task.prompts x task.new_tokens
    for mode in ("greedy", "sampled"):
        assert 0.0 <= report["speculative"][mode]["acceptance_rate"] <= 1.0


# -- bad input: one KDLabError sentence each --------------------------------------------------------------
def assert_refused(cfg, message: str) -> None:
    with pytest.raises(KDLabError) as caught:
        train(cfg)
    assert str(caught.value) == message


def test_a_block_longer_than_the_models_positions(make_cfg):
    cfg = lm_cfg(make_cfg, "data.block_size=32", "student.model.max_positions=16")
    assert_refused(
        cfg,
        "data.block_size=32 is longer than the model's 16 positions; set data.block_size=16 (or less), or use a "
        "model with at least 32 positions.",
    )


VOCAB_MESSAGE = (
    "the student predicts 280 tokens but the tokenizer has 300: the model was made for another tokenizer. "
    "Build it with vocab_size=${data.vocab_size}, or load its own tokenizer (data.tokenizer=<its directory>); "
    "teachers and students with different tokenizers need cross-tokenizer methods (ULD, MinED), which kd-lab "
    "does not have."
)
OUTPUT_MESSAGE = (
    "the student outputs shape (2, 300), but language modeling needs logits of shape (batch, tokens, "
    "vocabulary): use a language model (kd_lab.models.hf.causal_lm or masked_lm)."
)


def test_a_student_vocabulary_smaller_than_the_tokenizers(make_cfg):
    assert_refused(lm_cfg(make_cfg, "student.model.vocab_size=280"), VOCAB_MESSAGE)


def test_the_task_refuses_a_smaller_vocabulary_in_the_logits():
    """The check itself, on logits: what the run above should reach."""
    from kd_lab.core.tasks import LanguageModeling

    with pytest.raises(KDLabError) as caught:
        LanguageModeling(vocab_size=300).check_output(torch.zeros(2, 16, 280), "student")
    assert str(caught.value) == VOCAB_MESSAGE


def classifier_cfg(make_cfg, *overrides: str):
    kept = [o for o in FDR if not o.startswith("student.")]  # a classifier has no hidden_size, num_heads, ...
    return make_cfg(*kept, "student=mlp_small", *overrides, fast=False)


def test_a_classifier_student_on_text(make_cfg):
    """A classifier that reads token ids (an EmbeddingBag: (B, T) ids -> (B, 300) scores) is refused by the
    task's output check, naming the shape it gave."""
    cfg = classifier_cfg(make_cfg)
    with open_dict(cfg):
        cfg.student.model = {"_target_": "torch.nn.EmbeddingBag", "num_embeddings": 300, "embedding_dim": 300}
    assert_refused(cfg, OUTPUT_MESSAGE)


def test_a_shipped_classifier_student_on_text(make_cfg):
    with pytest.raises(KDLabError):
        train(classifier_cfg(make_cfg))


def test_a_shipped_classifier_student_with_sizes_on_text(make_cfg):
    cfg = classifier_cfg(make_cfg, "student.model.input_shape=[16]", "student.model.num_classes=300")
    assert_refused(
        cfg,
        "the student (MLP) cannot take the data's input (a torch.int64 tensor of shape (2, 16)): RuntimeError: "
        "mat1 and mat2 must have the same dtype, but got Long and Float. Pick a student made for this data "
        "(the task is language_modeling).",
    )


def test_an_empty_user_corpus(make_cfg, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\t\n")
    path = tmp_path / "empty.txt"
    assert_refused(
        lm_cfg(make_cfg, f"data.path={path}"),
        f"corpus 'files' from {path.resolve()} is empty: its 1 document(s) hold no text other than whitespace; "
        "add text to the files or choose another data.path.",
    )


def test_a_user_corpus_that_is_not_utf8(make_cfg, tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café".encode("latin-1"))
    assert_refused(
        lm_cfg(make_cfg, f"data.path={path}"),
        f"{path} is not UTF-8: byte 0xe9 at offset 3 (unexpected end of data); re-encode it as UTF-8 (e.g. iconv "
        "-f latin1 -t utf-8 latin.txt) or remove it from data.path.",
    )


# -- models: padded vocabulary, pretrained weights ---------------------------------------------------------
def built(cfg):
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return build_run(cfg, datamodule)


def train_batch(run, n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in run.datamodule.splits["train"].items()}


def test_a_padded_student_vocabulary_is_sliced_to_the_tokenizers(make_cfg):
    cfg = lm_cfg(make_cfg, "student.model.vocab_size=320")
    run = built(cfg)
    batch = train_batch(run, 2)
    raw = run.student(batch["input"])
    assert raw.logits.shape == (2, 16, 320)
    assert run.step.logits(raw, "student").shape == (2, 16, 300)
    assert run.step.outputs(batch).logits.shape == (2, 16, 300)
    assert run.step.outputs(batch).teacher_logits.shape == (2, 16, 300)


def test_a_padded_student_vocabulary_runs_end_to_end(make_cfg):
    results, _ = train(lm_cfg(make_cfg, "student.model.vocab_size=320"))
    assert_lm_metrics(results)


def test_a_pretrained_student_directory(make_cfg, tmp_path):
    from kd_lab.models.hf import causal_lm

    torch.manual_seed(123)
    saved = causal_lm("gpt2", vocab_size=300, max_positions=16, hidden_size=16, num_layers=1, num_heads=2)
    saved.save_pretrained(tmp_path / "gpt2_tiny")
    cfg = lm_cfg(make_cfg, f"student.model.pretrained={tmp_path / 'gpt2_tiny'}")
    run = built(cfg)  # the student's weights before any training
    for name in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"):
        assert torch.equal(run.student.get_parameter(name), saved.get_parameter(name)), name
    results, _ = train(cfg)
    assert_lm_metrics(results)


# -- normalization: every token-level loss is a sum over valid tokens / the global batch's valid tokens ------
NO_DROPOUT = ["student.model.dropout=0", "teacher.model.dropout=0"]


def gradients(run, batch) -> list[torch.Tensor]:
    params = [p for p in [*run.student.parameters(), *run.algorithm.parameters()] if p.requires_grad]
    loss = torch.stack(list(run.step.training_terms(batch).values())).sum()
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize(
    "algorithm",
    [["algorithm=token_kd", "algorithm.divergence=forward_kl", "algorithm.ce_weight=0.5"], ["algorithm=none"]],
    ids=["token_kd", "none"],
)
def test_accumulating_two_half_batches_is_one_batch(make_cfg, algorithm):
    """accumulate_grad_batches=2 with batch b: Lightning divides each loss by 2 and sums the gradients. Causal
    LM blocks are packed, so both halves have the same valid-token count and the result is the batch of 2b."""
    run = built(lm_cfg(make_cfg, *algorithm, *NO_DROPOUT))
    batch = train_batch(run, 4)
    assert bool((batch["target"] != -100).all())
    whole = gradients(run, batch)
    halves = [gradients(run, {k: v[s] for k, v in batch.items()}) for s in (slice(0, 2), slice(2, 4))]
    for g, a, b in zip(whole, *halves, strict=True):
        torch.testing.assert_close(g, a / 2 + b / 2, rtol=0, atol=1e-6)


def test_masked_lm_losses_are_sums_over_the_masked_tokens_divided_by_their_count(make_cfg):
    """Masked LM picks 15% of the tokens per batch, so the counts vary between batches (and halves): the two
    halves of a batch do not weigh the same as in the whole. What holds exactly is the definition: the sum
    over valid (masked) tokens divided by their number, checked by hand here."""
    run = built(lm_cfg(make_cfg, *MASKED, "algorithm=token_kd", "algorithm.ce_weight=0.5", *NO_DROPOUT))
    batch = {k: v[:4] for k, v in run.datamodule.splits["val"].items()}  # masked once, with -100 elsewhere
    valid = batch["target"] != -100
    assert 0 < int(valid.sum()) < valid.numel()
    out = run.step.outputs(batch)
    terms = run.step.terms(out)
    s, t, y = out.logits[valid], out.teacher_logits[valid], batch["target"][valid]
    ce = F.cross_entropy(s, y, reduction="sum") / valid.sum()
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum() / valid.sum()
    torch.testing.assert_close(terms["ce"], 0.5 * ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["forward_kl"], kl, rtol=1e-5, atol=1e-6)
    assert isinstance(run.algorithm, TokenKD)


def test_the_online_teachers_kd_term_counts_only_the_masked_tokens(make_cfg):
    overrides = [*MASKED, "algorithm=token_kd", "scheme=online", "scheme.teacher_kd_weight=1", *NO_DROPOUT]
    run = built(lm_cfg(make_cfg, *overrides))
    batch = {k: v[:4] for k, v in run.datamodule.splits["val"].items()}
    valid = batch["target"] != -100
    out = run.step.outputs(batch)
    terms = run.step.terms(out)
    t, s = out.live_teacher_logits[0][valid], out.logits[valid].detach()
    kl = (s.softmax(-1) * (s.log_softmax(-1) - t.log_softmax(-1))).sum() / valid.sum()  # the teacher learns p_s
    torch.testing.assert_close(terms["teacher_kd"], kl, rtol=1e-5, atol=1e-6)


def test_a_generation_longer_than_the_models_positions_fails_before_training(make_cfg, tmp_path):
    with pytest.raises(
        KDLabError, match=r"task.prompt_length=12 \+ task.new_tokens=8 exceed the student's 16 positions"
    ):
        train(lm_cfg(make_cfg, "task.prompt_length=12", "task.new_tokens=8"))
    assert not list((tmp_path / "teachers").glob("*/meta.json"))  # refused before the teacher was trained
