"""GLUE-format sentence(-pair) classification data read from the official TSV files in ``data_dir``.

The layouts are those of GLUE's download script (``glue_data/<TASK>/``):

- SST-2: ``train.tsv``, ``dev.tsv`` with a header ``sentence\\tlabel`` (labels 0, 1).
- MRPC: ``Quality\\t#1 ID\\t#2 ID\\t#1 String\\t#2 String`` (Quality 0, 1).
- RTE: ``index\\tsentence1\\tsentence2\\tlabel`` (entailment, not_entailment).
- CoLA: no header, four columns ``source\\tlabel\\tauthor_label\\tsentence`` (labels 0, 1).
- MNLI: ``train.tsv``, ``dev_matched.tsv``; many columns, of which ``sentence1``, ``sentence2``, ``gold_label``
  (entailment, neutral, contradiction).

GLUE's test files have no labels. So the dev file is our test split, and the validation split is held out
from train (``val_size``, seeded by ``split_seed``), as for CIFAR. Published dev-set numbers are our test numbers.

What the models read: ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, truncated longest-first to
``max_length`` and padded with the pad token. The trained BPE has no [CLS] or [SEP], so its ``<eos>`` plays
both. A pretrained tokenizer's own [CLS] / [SEP] (or <s> / </s>) are used when it has them. There are no
token-type ids: the model sees one tensor, and DistilBERT's students do without them too.
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kd_lab.data.base import TensorDataModule
from kd_lab.data.text.corpus import Corpus
from kd_lab.data.text.tokenizer import BackendTokenizer, TextTokenizer, load_pretrained, train_bpe
from kd_lab.errors import KDLabError

GLUE_URL = "https://gluebenchmark.com/tasks (or the download_glue_data.py script)"
CLS_NAMES = ("[CLS]", "<s>", "<cls>")
SEP_NAMES = ("[SEP]", "</s>", "<sep>")


@dataclass(frozen=True)
class GlueFormat:
    folder: str  # the download script's folder name
    train_file: str
    test_file: str  # GLUE's dev file: the test sets have no labels
    columns: tuple[str, ...] | None  # the header's required columns; None: no header, read by position
    text: tuple[str | int, ...]  # one or two text columns (names, or positions without a header)
    label: str | int
    labels: tuple[str, ...]  # the label strings, in class-index order

    @property
    def num_classes(self) -> int:
        return len(self.labels)


FORMATS = {
    "sst2": GlueFormat("SST-2", "train.tsv", "dev.tsv", ("sentence", "label"), ("sentence",), "label", ("0", "1")),
    "mrpc": GlueFormat(
        "MRPC",
        "train.tsv",
        "dev.tsv",
        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        ("#1 String", "#2 String"),
        "Quality",
        ("0", "1"),
    ),
    "rte": GlueFormat(
        "RTE",
        "train.tsv",
        "dev.tsv",
        ("index", "sentence1", "sentence2", "label"),
        ("sentence1", "sentence2"),
        "label",
        ("entailment", "not_entailment"),
    ),
    "cola": GlueFormat("CoLA", "train.tsv", "dev.tsv", None, (3,), 1, ("0", "1")),
    "mnli": GlueFormat(
        "MNLI",
        "train.tsv",
        "dev_matched.tsv",
        ("sentence1", "sentence2", "gold_label"),
        ("sentence1", "sentence2"),
        "gold_label",
        ("entailment", "neutral", "contradiction"),
    ),
}
COLA_COLUMNS = 4


def read_tsv(path: Path, fmt: GlueFormat) -> tuple[list[tuple[str, ...]], list[int]]:
    """The texts (one or two per row) and class indices of one GLUE file; any flaw names the file and line."""
    if not path.is_file():
        raise KDLabError(
            f"GLUE file {path} is missing. Download the GLUE data ({GLUE_URL}) and point data.data_dir at the "
            f"directory that holds {fmt.folder}/ (or set data.folder to the folder with {fmt.train_file} and "
            f"{fmt.test_file})."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise KDLabError(f"GLUE file {path} is not UTF-8 ({e.reason} at byte {e.start}); download it again.") from e
    # QUOTE_NONE: GLUE's quote characters are text (MRPC, MNLI), as GLUE's own readers take them
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows_start = 1
    if fmt.columns is None:
        width, where = COLA_COLUMNS, list(range(COLA_COLUMNS))
        index = {i: i for i in where}
        rows_start = 0
        expected = f"{COLA_COLUMNS} tab-separated columns and no header (source, label, author_label, sentence)"
    else:
        expected = f"a header with the columns {list(fmt.columns)}"
        header = rows[0] if rows else []
        missing = [c for c in fmt.columns if c not in header]
        if missing:
            raise KDLabError(
                f"GLUE file {path}: its header {header[:8]} lacks the columns {missing}; a {fmt.folder} file has "
                f"{expected}. Is it the right task's file, complete and tab-separated? Download it again."
            )
        width, index = len(header), {c: header.index(c) for c in fmt.columns}
    texts, labels = [], []
    for number, row in enumerate(rows[rows_start:], start=rows_start + 1):
        if not row:
            continue  # a trailing blank line
        if len(row) < width:
            raise KDLabError(
                f"GLUE file {path}, line {number}: {len(row)} columns where {expected} needs {width}; the file "
                "is truncated or not tab-separated. Download it again."
            )
        label = row[index[fmt.label]].strip()
        if label not in fmt.labels:
            raise KDLabError(
                f"GLUE file {path}, line {number}: label {label!r} is not one of {list(fmt.labels)} "
                f"({fmt.folder}'s labels); the file is damaged or belongs to another task."
            )
        texts.append(tuple(row[index[c]] for c in fmt.text))
        labels.append(fmt.labels.index(label))
    if not labels:
        raise KDLabError(f"GLUE file {path} holds no examples (expected {expected} and one row per example).")
    return texts, labels


def special_id(tok: TextTokenizer, names: tuple[str, ...], fallback: int) -> int:
    """The id of the first of ``names`` that the tokenizer knows, else ``fallback`` (the BPE's <eos>)."""
    if isinstance(tok, BackendTokenizer):
        found = [tok.backend.token_to_id(name) for name in names]
    else:
        vocab = tok.hf.get_vocab()
        found = [vocab.get(name) for name in names]
    return next((i for i in found if i is not None), fallback)


def encode_pairs(texts: list[tuple[str, ...]], tok: TextTokenizer, max_length: int, cls_id: int, sep_id: int) -> Tensor:
    """``[CLS] a [SEP] (b [SEP])`` per example, cut longest-first to ``max_length``, padded: (N, max_length)."""
    columns = list(zip(*texts, strict=True))
    encoded = [tok.encode_batch(list(column)) for column in columns]
    out = torch.full((len(texts), max_length), tok.pad_id, dtype=torch.long)
    room = max_length - 1 - len(columns)  # the tokens left after [CLS] and one [SEP] per text
    for i, parts in enumerate(zip(*encoded, strict=True)):
        parts = [list(p) for p in parts]
        while sum(len(p) for p in parts) > room:  # longest-first, as BERT's run_classifier truncates
            max(parts, key=len).pop()
        ids = [cls_id]
        for p in parts:
            ids += [*p, sep_id]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class GLUEDataModule(TensorDataModule):
    def __init__(
        self,
        data_dir: str | Path,
        task: str,
        folder: str | None = None,
        max_length: int = 128,
        tokenizer: str | Path | None = None,
        vocab_size: int = 8192,
        metrics: tuple[str, ...] = ("acc",),
        monitor: str = "acc",
        val_size: int | float = 0.1,
        **kwargs: Any,
    ):
        """``task``: one of ``FORMATS``. ``folder``: the directory of its files, relative to ``data_dir``
        (default ``glue_data/<SST-2|MRPC|...>``). ``tokenizer``: a local pretrained tokenizer directory;
        None trains a byte-level BPE of ``vocab_size`` tokens on this task's training text (cached).
        ``metrics`` and ``monitor``: what task=sequence_classification measures and selects by on this
        data set (they live here because they belong to the data set). ``kwargs`` go to TensorDataModule."""
        if task not in FORMATS:
            raise KDLabError(f"data.task={task!r} is not a GLUE task kd-lab reads; use one of {sorted(FORMATS)}.")
        if max_length < 8:  # [CLS] and up to two [SEP] leave too little text below 8 tokens
            raise KDLabError(
                f"data.max_length={max_length} leaves little room for text after [CLS] and [SEP]; set 8 or more."
            )
        fmt = FORMATS[task]
        kwargs.pop("num_classes", None)  # the format decides it
        super().__init__(num_classes=fmt.num_classes, input_shape=(max_length,), val_size=val_size, **kwargs)
        self.data_dir, self.task, self.fmt = Path(data_dir), task, fmt
        self.folder = self.data_dir / (folder if folder is not None else f"glue_data/{fmt.folder}")
        self.max_length = max_length
        self.tokenizer_dir = tokenizer
        self.requested_vocab_size = vocab_size
        self.metrics, self.monitor = tuple(metrics), monitor
        self._texts: dict[str, tuple[list[tuple[str, ...]], list[int]]] = {}
        self._tokenizer: TextTokenizer | None = None

    def texts(self, split: str) -> tuple[list[tuple[str, ...]], list[int]]:
        """The raw texts and labels of ``train`` or ``test`` (GLUE's dev file), read once."""
        if split not in self._texts:
            name = self.fmt.train_file if split == "train" else self.fmt.test_file
            self._texts[split] = read_tsv(self.folder / name, self.fmt)
        return self._texts[split]

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            if self.tokenizer_dir is not None:
                tok = load_pretrained(self.tokenizer_dir)
            else:
                texts, _ = self.texts("train")  # only training text: the dev (test) text must not shape the BPE
                documents = [" ".join(t) for t in texts]
                corpus = Corpus(f"glue-{self.task}", documents, str(self.folder / self.fmt.train_file))
                tok = train_bpe(corpus, self.requested_vocab_size, self.data_dir / "text" / "tokenizers")
            if tok.vocab_size > self.requested_vocab_size:  # a model sized by data.vocab_size could not embed it
                raise KDLabError(
                    f"the tokenizer ({tok.source}) has {tok.vocab_size} tokens but data.vocab_size="
                    f"{self.requested_vocab_size}; set data.vocab_size={tok.vocab_size}."
                )
            self._tokenizer = tok
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def cls_id(self) -> int:
        return special_id(self.tokenizer, CLS_NAMES, self.tokenizer.eos_id)

    @property
    def sep_id(self) -> int:
        return special_id(self.tokenizer, SEP_NAMES, self.tokenizer.eos_id)

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        tok = self.tokenizer
        if tok.pad_id in (self.cls_id, self.sep_id):
            raise KDLabError(
                f"the tokenizer ({tok.source}) pads with its [CLS]/[SEP] token (id {tok.pad_id}), so the models "
                "could not tell padding from text; give it a pad token of its own (tokenizer.add_special_tokens"
                "({'pad_token': '[PAD]'}), then save it) or use data.tokenizer=null."
            )
        out = {}
        for split in ("train", "test"):
            texts, labels = self.texts(split)
            ids = encode_pairs(texts, tok, self.max_length, self.cls_id, self.sep_id)
            out[split] = (ids, torch.tensor(labels, dtype=torch.long))
        return out

    def check_model_positions(self, max_positions: int) -> None:
        """Fail before training when the model cannot read a whole padded example."""
        if self.max_length > max_positions:
            raise KDLabError(
                f"data.max_length={self.max_length} is longer than the model's {max_positions} positions; set "
                f"data.max_length={max_positions} (or less), or give the model max_positions={self.max_length}."
            )
