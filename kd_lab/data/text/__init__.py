"""Offline text for language-model distillation: corpora, tokenizers, packed blocks, masking (docs/text-data.md)."""

from kd_lab.data.text.corpus import CORPORA, DEFAULT_CORPUS, Corpus, load_corpus
from kd_lab.data.text.datamodule import TextDataModule
from kd_lab.data.text.masking import IGNORE_INDEX, MaskTokens
from kd_lab.data.text.packing import PackedSplits, pack_blocks, pack_corpus, split_documents
from kd_lab.data.text.tokenizer import (
    SPECIAL_TOKENS,
    BackendTokenizer,
    PythonTokenizer,
    TextTokenizer,
    load_pretrained,
    train_bpe,
)

__all__ = [
    "CORPORA",
    "DEFAULT_CORPUS",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "BackendTokenizer",
    "Corpus",
    "MaskTokens",
    "PackedSplits",
    "PythonTokenizer",
    "TextDataModule",
    "TextTokenizer",
    "load_corpus",
    "load_pretrained",
    "pack_blocks",
    "pack_corpus",
    "split_documents",
    "train_bpe",
]
