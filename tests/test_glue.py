"""task=sequence_classification on GLUE-format TSV files (docs/glue.md): the readers of every format on tiny
files, bad files, the encoding the models read, the metrics on hand-made predictions, the build-time checks,
and fast_dev_runs of `none` and `kd` with a tiny BERT teacher and student."""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from kd_lab.core.tasks import SequenceClassification
from kd_lab.data.text.glue import FORMATS, GLUEDataModule, encode_pairs, read_tsv
from kd_lab.errors import KDLabError
from kd_lab.models.hf import sequence_classifier
from kd_lab.run.checks.schema import validate_config
from kd_lab.run.train import train

POSITIVE = ["a fine warm film", "great fun and moving", "a lovely clever story", "bright and funny work"]
NEGATIVE = ["a dull cold film", "boring and flat", "a tedious weak story", "grim and tiresome work"]


def sst2_rows(n: int) -> list[str]:
    """``n`` SST-2 rows whose label follows the words, so a model can learn it."""
    return [f"{(POSITIVE if i % 2 else NEGATIVE)[i % 4]} {i}\t{i % 2}" for i in range(n)]


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_sst2(folder: Path, n_train: int = 48, n_dev: int = 16) -> Path:
    write(folder / "train.tsv", ["sentence\tlabel", *sst2_rows(n_train)])
    write(folder / "dev.tsv", ["sentence\tlabel", *sst2_rows(n_dev)])
    return folder


def write_mrpc(folder: Path) -> Path:
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [f'{i % 2}\t{100 + i}\t{200 + i}\tThe cat sat {i}.\tA "cat" sat {i}.' for i in range(24)]
    write(folder / "train.tsv", [header, *rows])
    write(folder / "dev.tsv", [header, *rows[:8]])
    return folder


# -- the readers, one per format -------------------------------------------------------------------------------
def test_sst2_reader(tmp_path):
    texts, labels = read_tsv(write_sst2(tmp_path, 4, 2) / "train.tsv", FORMATS["sst2"])
    assert texts == [(f"{NEGATIVE[0]} 0",), (f"{POSITIVE[1]} 1",), (f"{NEGATIVE[2]} 2",), (f"{POSITIVE[3]} 3",)]
    assert labels == [0, 1, 0, 1]


def test_mrpc_reader_keeps_quotes_as_text(tmp_path):
    texts, labels = read_tsv(write_mrpc(tmp_path) / "dev.tsv", FORMATS["mrpc"])
    assert texts[1] == ("The cat sat 1.", 'A "cat" sat 1.') and labels[:3] == [0, 1, 0]


def test_rte_reader_maps_label_names(tmp_path):
    path = write(
        tmp_path / "train.tsv",
        [
            "index\tsentence1\tsentence2\tlabel",
            "0\tA man runs.\tA man moves.\tentailment",
            "1\tIt rains.\tIt is dry.\tnot_entailment",
        ],
    )
    texts, labels = read_tsv(path, FORMATS["rte"])
    assert texts == [("A man runs.", "A man moves."), ("It rains.", "It is dry.")] and labels == [0, 1]


def test_cola_reader_has_no_header(tmp_path):
    path = write(
        tmp_path / "train.tsv", ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tThey drank the pub."]
    )
    texts, labels = read_tsv(path, FORMATS["cola"])
    assert texts == [("Our friends won't buy this analysis.",), ("They drank the pub.",)] and labels == [1, 0]


def test_mnli_reader_picks_its_columns_by_name(tmp_path):
    header = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    rows = ["0\t1\t1n\tfiction\t( a )\tPremise one.\tHypothesis one.\tneutral\tneutral"]
    rows.append("1\t2\t2c\tfiction\t( b )\tPremise two.\tHypothesis two.\tcontradiction\tcontradiction")
    texts, labels = read_tsv(write(tmp_path / "dev_matched.tsv", [header, *rows]), FORMATS["mnli"])
    assert texts == [("Premise one.", "Hypothesis one."), ("Premise two.", "Hypothesis two.")] and labels == [1, 2]


# -- bad files ---------------------------------------------------------------------------------------------------
def test_a_missing_file_names_it_and_the_download(tmp_path):
    with pytest.raises(KDLabError) as err:
        read_tsv(tmp_path / "SST-2" / "train.tsv", FORMATS["sst2"])
    assert str(tmp_path / "SST-2" / "train.tsv") in str(err.value) and "data.data_dir" in str(err.value)


def test_a_header_without_the_columns_is_refused(tmp_path):
    path = write(tmp_path / "train.tsv", ["text\tlabel", "a\t0"])
    with pytest.raises(KDLabError, match=r"lacks the columns \['sentence'\]"):
        read_tsv(path, FORMATS["sst2"])


def test_a_truncated_row_names_its_line(tmp_path):
    path = write(tmp_path / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\tcut off"])
    with pytest.raises(KDLabError, match=r"train.tsv, line 3: 2 columns .* needs 4; the file is truncated"):
        read_tsv(path, FORMATS["rte"])


def test_an_unknown_label_names_the_labels(tmp_path):
    path = write(tmp_path / "train.tsv", ["sentence\tlabel", "fine\t0", "odd\tpositive"])
    with pytest.raises(KDLabError, match=r"line 3: label 'positive' is not one of \['0', '1'\]"):
        read_tsv(path, FORMATS["sst2"])


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(KDLabError, match="is not UTF-8"):
        read_tsv(path, FORMATS["sst2"])


def test_a_data_module_fails_on_a_missing_dev_file_before_training(tmp_path):
    write(tmp_path / "glue_data" / "SST-2" / "train.tsv", ["sentence\tlabel", *sst2_rows(8)])
    dm = GLUEDataModule(tmp_path, "sst2", max_length=16, vocab_size=300, val_size=2)
    with pytest.raises(KDLabError, match=r"glue_data/SST-2/dev.tsv is missing"):
        dm.setup()


# -- what the models read ----------------------------------------------------------------------------------------
class ListTokenizer:
    """One id per character (a=10, b=11, ...): encodings that a test can write down by hand."""

    pad_id, eos_id = 0, 1

    def encode_batch(self, texts):
        return [[10 + ord(c) - ord("a") for c in text] for text in texts]


def test_pairs_are_cls_a_sep_b_sep_cut_longest_first_and_padded():
    ids = encode_pairs([("abcdef", "ab"), ("a", "b")], ListTokenizer(), max_length=8, cls_id=2, sep_id=3)
    # room for 8 - 3 = 5 text tokens: "abcdef" loses 3 from its end, "ab" keeps both
    assert ids.tolist() == [[2, 10, 11, 12, 3, 10, 11, 3], [2, 10, 3, 11, 3, 0, 0, 0]]


def test_data_module_splits_train_into_train_and_val_and_tests_on_dev(tmp_path):
    write_sst2(tmp_path / "glue_data" / "SST-2", 20, 6)
    dm = GLUEDataModule(tmp_path, "sst2", max_length=16, vocab_size=300, val_size=4)
    dm.setup()
    assert len(dm.splits["train"]["target"]) == 16 and len(dm.splits["val"]["target"]) == 4
    test = dm.splits["test"]
    assert test["input"].shape == (6, 16) and test["target"].tolist() == [i % 2 for i in range(6)]
    assert (test["input"][:, 0] == dm.cls_id).all() and dm.cls_id == dm.tokenizer.eos_id  # the BPE's <eos>
    assert dm.tokenizer.decode([t for t in test["input"][0].tolist() if t > 2]) == f"{NEGATIVE[0]} 0"


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_padding_does_not_change_a_classifiers_logits(arch):
    torch.manual_seed(0)
    sizes = {"vocab_size": 40, "max_positions": 16, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    model = sequence_classifier(arch, 2, **sizes, initializer_range=0.5)  # logits far from 0: differences show
    model.eval()
    text = torch.tensor([[1, 12, 13, 14, 1]])
    short, long = torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long)
    short[:, :5], long[:, :5] = text, text
    with torch.no_grad():
        assert torch.allclose(model(short).logits, model(long).logits, atol=1e-5)
        unmasked = model(long, attention_mask=torch.ones_like(long)).logits
    if arch == "bert":  # without the pad mask BERT attends to the padding and its logits move
        assert not torch.allclose(unmasked, model(long).logits, atol=1e-5)


# -- metrics -----------------------------------------------------------------------------------------------------
def test_metrics_on_hand_made_predictions():
    task = SequenceClassification(2, metrics=["f1", "acc", "mcc"], monitor="f1")
    metrics = torch.nn.ModuleDict(task.student_metrics())
    target = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0])
    predicted = torch.tensor([1, 1, 0, 0, 0, 1, 1, 0])  # TP 3, FN 1, TN 3, FP 1
    task.update_student(metrics, torch.nn.functional.one_hot(predicted, 2).float(), {"target": target})
    # acc 6/8; F1 = 2TP / (2TP + FP + FN) = 6/8; MCC = (TP TN - FP FN) / sqrt(4 * 4 * 4 * 4) = 8/16
    values = {name: float(m.compute()) for name, m in metrics.items()}
    assert values == pytest.approx({"acc": 0.75, "f1": 0.75, "mcc": 0.5})
    assert task.headline == task.monitor == "f1"


def test_multiclass_matthews_on_hand_made_predictions():
    task = SequenceClassification(3, metrics=["mcc"], monitor="mcc")
    metrics = torch.nn.ModuleDict(task.student_metrics())
    target, predicted = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 0, 2, 1])
    task.update_student(metrics, torch.nn.functional.one_hot(predicted, 3).float(), {"target": target})
    # Gorodkin's R_K: c = 4 correct of s = 6, p = t = (2, 2, 2): (c s - p.t) / (s^2 - p.p) = (24 - 12) / (36 - 12)
    assert float(metrics["mcc"].compute()) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": ["auc"]}, r"task.metrics=\['auc'\]: \['auc'\]; choose from"),
        ({"metrics": ["acc"], "monitor": "f1"}, r"task.monitor='f1' is not among task.metrics=\['acc'\]"),
        ({"metrics": ["f1"], "monitor": "f1", "num_classes": 3}, r"f1, which is the F1 of class 1 of a binary task"),
    ],
)
def test_task_settings_that_cannot_work(kwargs, message):
    with pytest.raises(KDLabError, match=message):
        SequenceClassification(**{"num_classes": 2, **kwargs})


# -- runs ------------------------------------------------------------------------------------------------------
TINY = [
    "task=sequence_classification",
    "teacher=bert_cls_teacher",
    "student=bert_cls_student",
    "data.vocab_size=300",
    "data.max_length=16",
    "data.val_size=8",
    "data.batch_size=8",
    "teacher.model.hidden_size=32",
    "teacher.model.num_layers=1",
    "teacher.model.num_heads=2",
    "teacher.max_epochs=1",
    "student.model.hidden_size=16",
    "student.model.num_layers=1",
    "student.model.num_heads=2",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "logger=none",
    "debug=fdr",
]


def glue_cfg(make_cfg, tmp_path, *overrides, data="sst2"):
    folder = write_sst2(tmp_path / "sst2") if data == "sst2" else write_mrpc(tmp_path / "mrpc")
    return make_cfg(f"data={data}", f"data.folder={folder}", *TINY, *overrides, fast=False)


@pytest.mark.parametrize("algorithm", ["none", "kd"])
def test_fast_dev_run_on_sst2(make_cfg, tmp_path, algorithm):
    results, objs = train(glue_cfg(make_cfg, tmp_path, f"algorithm={algorithm}"))
    assert results["status"] == "finished" and objs["trainer"].fast_dev_run
    assert results["task"]["headline"] == "test/acc" and results["task"]["monitor"] == "val/acc"
    best = results["best"]
    assert (
        0 <= best["test/acc"] <= 1 and 0 <= best["test/teacher_acc"] <= 1 and math.isfinite(best["test/kl_to_teacher"])
    )
    assert type(objs["run"].student).__name__ == "BertSequenceClassifier"


def test_mrpc_reports_f1_and_accuracy(make_cfg, tmp_path):
    results, _ = train(glue_cfg(make_cfg, tmp_path, "algorithm=kd", data="mrpc"))
    assert results["task"]["headline"] == "test/f1" and {"test/f1", "test/acc"} <= set(results["best"])


def test_a_student_with_the_wrong_number_of_classes_fails_at_build_time(make_cfg, tmp_path):
    cfg = glue_cfg(make_cfg, tmp_path, "algorithm=kd", "student.model.num_labels=3")
    with pytest.raises(
        KDLabError, match=r"outputs shape \(2, 3\) but the data has 2 classes.*student.model.num_labels=2"
    ):
        train(cfg)
    assert not (tmp_path / "teachers").exists()  # the teacher was not trained


def test_a_model_with_another_pad_id_fails_at_build_time(make_cfg, tmp_path):
    cfg = glue_cfg(make_cfg, tmp_path, "algorithm=none", "student.model.pad_token_id=1")
    with pytest.raises(KDLabError, match=r"treats token 1 as padding but the data pads with 0.*pad_token_id=0"):
        train(cfg)


def test_examples_longer_than_the_models_positions_fail_at_build_time(make_cfg, tmp_path):
    cfg = glue_cfg(make_cfg, tmp_path, "algorithm=none")
    with open_dict(cfg):
        cfg.student.model.max_positions = 8
    with pytest.raises(KDLabError, match=r"data.max_length=16 is longer than the model's 8 positions"):
        train(cfg)


def test_an_image_algorithm_is_refused_on_sequence_classification(make_cfg, tmp_path):
    cfg = glue_cfg(make_cfg, tmp_path, "algorithm=crd")
    with pytest.raises(KDLabError, match=r"algorithm 'crd' cannot run on a sequence_classification task"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(
    ("data", "monitor"), [("sst2", "acc"), ("mrpc", "f1"), ("rte", "acc"), ("cola", "mcc"), ("mnli", "acc")]
)
def test_the_glue_experiments_pass_the_checks_before_compute(make_cfg, data, monitor):
    cfg = make_cfg(f"experiment=glue_{data}", "logger=none", fast=False)
    validate_config(cfg)  # keys, types, bounds and the algorithm x scheme x task pairing; nothing is built
    assert cfg.task.monitor == monitor and cfg.callbacks.model_checkpoint.monitor == f"val/{monitor}"
    assert (cfg.teacher.model.num_layers, cfg.student.model.num_layers, cfg.teacher.model.hidden_size) == (12, 6, 768)
    assert cfg.data.num_classes == (3 if data == "mnli" else 2)


def test_the_teacher_store_fine_tunes_the_teacher_and_kd_learns_the_task(make_cfg, tmp_path):
    """Four epochs on 200 SST-2-format rows whose words give the label: both models get it right."""
    folder = write_sst2(tmp_path / "sst2", 200, 40)
    runs = [o for o in TINY if o != "debug=fdr"]
    cfg = make_cfg("data=sst2", f"data.folder={folder}", *runs, "data.val_size=40", "algorithm=kd", fast=False)
    with open_dict(cfg):
        cfg.trainer.max_epochs = cfg.teacher.max_epochs = 4
    results, _ = train(cfg)
    assert any((tmp_path / "teachers").iterdir())  # the fine-tuned teacher is a store entry
    assert results["best"]["test/teacher_acc"] >= 0.9 and results["best"]["test/acc"] >= 0.9


def test_a_pretrained_masked_lm_loads_as_a_classifier_with_a_fresh_head(tmp_path):
    from kd_lab.models.hf import masked_lm

    sizes = {"vocab_size": 40, "max_positions": 16, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    masked_lm(**sizes).save_pretrained(tmp_path / "mlm")
    model = sequence_classifier("bert", 3, pretrained=str(tmp_path / "mlm"), vocab_size=40)
    saved = masked_lm(pretrained=str(tmp_path / "mlm"))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.state_dict()[key], saved.state_dict()[key])
    assert model.config.num_labels == 3 and model(torch.tensor([[1, 5, 6, 0]])).logits.shape == (1, 3)
    with pytest.raises(KDLabError, match="has vocab_size=40, but vocab_size=50 was asked for"):
        sequence_classifier("bert", 3, pretrained=str(tmp_path / "mlm"), vocab_size=50)


def test_a_gpt2_student_runs_under_a_bert_teacher(make_cfg, tmp_path):
    results, objs = train(glue_cfg(make_cfg, tmp_path, "algorithm=kd", "student.model.arch=gpt2"))
    assert results["status"] == "finished" and type(objs["run"].student).__name__ == "GPT2SequenceClassifier"


def test_unknown_task_and_too_short_examples_are_refused(tmp_path):
    with pytest.raises(KDLabError, match=r"data.task='qqp' is not a GLUE task kd-lab reads; use one of \['cola'"):
        GLUEDataModule(tmp_path, "qqp")
    with pytest.raises(KDLabError, match=r"data.max_length=4 leaves little room"):
        GLUEDataModule(tmp_path, "sst2", max_length=4)


def test_the_task_on_data_without_glue_metrics_fails_before_compute(make_cfg):
    cfg = make_cfg("task=sequence_classification")  # data=fake: no data.metrics
    with pytest.raises(KDLabError, match=r"task.metrics cannot be resolved"):
        validate_config(cfg)
