"""Language-model data as a ``TensorDataModule``: packed token blocks of a corpus (see docs/text-data.md).

``causal``: input = block[:, :-1], target = block[:, 1:]. ``masked``: input = target = block[:, :-1], and
``MaskTokens`` masks each training batch with the (seed, epoch) generator of the batches; val and test are
masked once here with a generator of their own, so every evaluation scores the same masked positions.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kd_lab.data.base import TensorDataModule
from kd_lab.data.text.corpus import DEFAULT_CORPUS, Corpus, load_corpus
from kd_lab.data.text.masking import MaskTokens, check_mask_prob
from kd_lab.data.text.packing import DEFAULT_FRACTIONS, SPLITS, PackedSplits, check_fractions, pack_corpus
from kd_lab.data.text.tokenizer import TextTokenizer, load_pretrained, train_bpe
from kd_lab.errors import KDLabError

OBJECTIVES = ("causal", "masked")
EVAL_MASK_SEEDS = {"val": 1, "test": 2}  # offsets from split_seed: evaluation masks do not vary with data.seed


class TextDataModule(TensorDataModule):
    def __init__(
        self,
        data_dir: str | Path,
        corpus: str = DEFAULT_CORPUS,
        path: str | Path | None = None,
        jsonl_field: str = "text",
        tokenizer: str | Path | None = None,
        vocab_size: int = 2048,
        block_size: int = 64,
        objective: str = "causal",
        mask_prob: float = 0.15,
        split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
        split_seed: int = 0,
        **kwargs: Any,
    ):
        """``tokenizer``: a local directory holding a pretrained tokenizer; None trains a byte-level BPE of
        ``vocab_size`` tokens on the corpus. ``kwargs`` go to ``TensorDataModule`` (batch_size, seed, ...)."""
        if objective not in OBJECTIVES:
            raise KDLabError(f"data.objective={objective!r} is not one of {OBJECTIVES}.")
        if kwargs.get("augment") is not None and objective == "masked":
            raise KDLabError("data.augment cannot be combined with data.objective=masked: masking is its augmentation.")
        check_mask_prob(mask_prob)  # now, not at setup(): the mask token is known only then
        if kwargs.get("student_view") is not None:
            raise KDLabError("data.student_view (cross-modal data) is not supported for text data; remove it.")
        super().__init__(num_classes=vocab_size, input_shape=(block_size,), split_seed=split_seed, **kwargs)
        self.data_dir = Path(data_dir)
        self.corpus_args = {"corpus": corpus, "path": path, "jsonl_field": jsonl_field}
        self.tokenizer_dir = tokenizer
        self.requested_vocab_size = vocab_size
        self.block_size = block_size
        self.objective = objective
        self.mask_prob = mask_prob
        self.split_fractions = check_fractions(split_fractions)
        self._corpus: Corpus | None = None
        self._tokenizer: TextTokenizer | None = None
        self._packed: PackedSplits | None = None

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "text"

    # -- corpus and tokenizer: loaded on first use, so models can read vocab_size before setup() --------------
    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(**self.corpus_args)
        return self._corpus

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            if self.tokenizer_dir is not None:
                tok = load_pretrained(self.tokenizer_dir)
            else:
                tok = train_bpe(self.corpus, self.requested_vocab_size, self.cache_dir / "tokenizers")
            self._check_tokenizer(tok)
            self._tokenizer = tok
        return self._tokenizer

    def _check_tokenizer(self, tok: TextTokenizer) -> None:
        if tok.vocab_size > self.num_classes:  # a model sized by data.vocab_size could not emit its ids
            raise KDLabError(
                f"the tokenizer ({tok.source}) has {tok.vocab_size} tokens but data.vocab_size={self.num_classes}; "
                f"set data.vocab_size={tok.vocab_size}."
            )
        if self.objective == "masked" and tok.mask_id is None:
            raise KDLabError(
                f"data.objective=masked needs a mask token, and the tokenizer ({tok.source}) has none; use "
                "data.objective=causal, a tokenizer with a mask token, or data.tokenizer=null (the BPE has one)."
            )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def mask_id(self) -> int | None:
        return self.tokenizer.mask_id

    def masker(self) -> MaskTokens:
        tok = self.tokenizer
        assert tok.mask_id is not None  # _check_tokenizer refuses masked data without one
        return MaskTokens(tok.mask_id, tok.vocab_size, self.mask_prob, special_ids=tok.special_ids)

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._pack()  # trains or reads the tokenizer and writes the packed cache once, before setup() on all ranks

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        packed = self._pack()
        if self.objective == "masked":
            self.augment = self.masker()
        for split in SPLITS:
            self.splits[split] = self._split_tensors(split, packed.blocks[split])

    def _pack(self) -> PackedSplits:
        if self._packed is None:
            self._packed = pack_corpus(
                self.corpus,
                self.tokenizer,
                self.block_size,
                self.split_fractions,
                self.split_seed,
                cache_dir=self.cache_dir / "packed",
            )
        return self._packed

    def _split_tensors(self, split: str, blocks: Tensor) -> dict[str, Tensor]:
        index = torch.arange(len(blocks))
        if self.objective == "causal":
            return {"input": blocks[:, :-1].contiguous(), "target": blocks[:, 1:].contiguous(), "index": index}
        tokens = blocks[:, :-1].contiguous()
        batch = {"input": tokens, "target": tokens, "index": index}
        if split == "train":
            return batch  # masked per batch by self.augment
        generator = torch.Generator().manual_seed(self.split_seed * 1000 + EVAL_MASK_SEEDS[split])
        return self.masker()(batch, generator)

    @property
    def teacher_outputs_per_sample(self) -> bool:
        """Whether a frozen teacher's outputs depend on the training sample alone, not on the epoch or seed.

        True for causal data without augmentation: every epoch feeds the same blocks, only in another order.
        The teacher top-k token store (kd_lab.run.view_store.TokenTopkStore) then keeps one copy per sample.
        Masked data draw new masks every epoch, so their store stays per (epoch, batch)."""
        return self.objective == "causal" and self.augment is None

    # -- what results should record ----------------------------------------------------------------------------
    @property
    def corpus_info(self) -> dict[str, Any]:
        packed, corpus, tok = self._pack(), self.corpus, self.tokenizer
        return {
            "name": corpus.name,
            "source": corpus.source,
            "sha256": corpus.sha256,
            "python_version": corpus.python_version,
            "documents": len(corpus.documents),
            "characters": corpus.characters,
            "tokenizer": tok.source,
            "tokenizer_fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "block_size": self.block_size,
            "objective": self.objective,
            "documents_per_split": {s: len(packed.documents[s]) for s in SPLITS},
            "tokens_per_split": dict(packed.tokens),
            "blocks_per_split": {s: len(packed.blocks[s]) for s in SPLITS},
        }

    def check_model_positions(self, max_positions: int) -> None:
        """Fail before training when the model cannot attend over a whole block."""
        if self.block_size > max_positions:
            raise KDLabError(
                f"data.block_size={self.block_size} is longer than the model's {max_positions} positions; set "
                f"data.block_size={max_positions} (or less), or use a model with at least {self.block_size} positions."
            )
