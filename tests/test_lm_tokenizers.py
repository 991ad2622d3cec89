"""A model saved with a tokenizer other than the data's is refused at build time; with the same tokenizer it
builds. A padded vocabulary is sliced to the tokenizer's exactly."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kd_lab.data.text.corpus import Corpus
from kd_lab.data.text.tokenizer import train_bpe
from kd_lab.errors import KDLabError
from kd_lab.models.hf import causal_lm
from kd_lab.run.assemble import build_run
from kd_lab.run.builders import build_datamodule

TINY = [
    "experiment=lm", "logger=none", "trainer.accelerator=cpu", "data.vocab_size=300", "data.block_size=16",
    "teacher.model.hidden_size=16", "teacher.model.num_layers=1", "teacher.model.num_heads=2",
    "student.model.hidden_size=16", "student.model.num_layers=1", "student.model.num_heads=2",
    "task.prompt_length=4", "task.new_tokens=4",
]  # fmt: skip


def lm_cfg(make_cfg, *overrides: str):
    return make_cfg(*TINY, *overrides, fast=False)


def save_model_with_tokenizer(directory, tokenizer_backend) -> None:
    causal_lm(vocab_size=300, max_positions=16, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(directory)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_backend, eos_token="<eos>", pad_token="<pad>", mask_token="<mask>"
    ).save_pretrained(directory)


def test_a_model_with_another_tokenizer_is_refused(make_cfg, tmp_path):
    other = train_bpe(Corpus("other", ["completely different text " * 50, "with its own merges " * 40], "test"), 300)
    save_model_with_tokenizer(tmp_path / "student", other.backend)
    cfg = lm_cfg(make_cfg, f"student.model.pretrained={tmp_path / 'student'}")
    with pytest.raises(KDLabError, match=r"the student was saved with its own tokenizer .* differs from the data's"):
        build_run(cfg, build_datamodule(cfg))


def test_a_model_with_the_data_tokenizer_builds(make_cfg, tmp_path):
    cfg = lm_cfg(make_cfg)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    save_model_with_tokenizer(tmp_path / "student", datamodule.tokenizer.backend)
    saved = tmp_path / "student"
    cfg = lm_cfg(make_cfg, f"student.model.pretrained={saved}", f"data.tokenizer={saved}")
    run = build_run(cfg, build_datamodule(cfg))
    assert run.task.vocab_size == 300


def test_a_padded_vocabulary_is_sliced_to_the_tokenizer(make_cfg):
    cfg = lm_cfg(make_cfg, "student.model.vocab_size=320")
    datamodule = build_datamodule(cfg)
    run = build_run(cfg, datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    run.student.eval()  # no dropout: the two forwards below must see the same function
    out = run.step.outputs(batch)
    assert out.logits.shape[-1] == 300 == out.teacher_logits.shape[-1]
    full = run.student(batch["input"]).logits
    assert full.shape[-1] == 320 and torch.equal(full[..., :300], out.logits)
