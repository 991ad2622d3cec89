"""Documents to fixed-length token blocks, split into train/val/test at the document level.

Splitting whole documents (not blocks) keeps a document's text out of the other splits, so validation
measures generalisation rather than memorised neighbours. Each split's documents are tokenized, each one
followed by EOS, concatenated and cut into blocks of ``block_size + 1`` tokens: a causal model reads
``block[:, :-1]`` and predicts ``block[:, 1:]``. The ragged tail of each split is dropped.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kd_lab.data.text.corpus import Corpus
from kd_lab.data.text.tokenizer import TextTokenizer, digest
from kd_lab.errors import KDLabError, brief
from kd_lab.utils.io import atomic_torch_save

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
PACK_FORMAT = "kd-lab-pack-1"  # bump when the packing recipe changes


@dataclass(frozen=True)
class PackedSplits:
    blocks: dict[str, Tensor]  # split -> LongTensor [N, block_size + 1]
    tokens: dict[str, int]  # split -> tokens before the tail was dropped (EOS included)
    documents: dict[str, list[int]]  # split -> indices into corpus.documents


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or min(values) <= 0 or abs(sum(values) - 1) > 1e-6:
        raise KDLabError(
            f"data.split_fractions={list(values)} must be three positive numbers (train, val, test) that sum "
            "to 1, e.g. [0.9, 0.05, 0.05]."
        )
    return values  # type: ignore[return-value]


def split_documents(
    num_documents: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[int]]:
    """Document indices per split: a seeded permutation, at least one document in each split."""
    _, val_fraction, test_fraction = check_fractions(fractions)
    n_val = max(1, round(val_fraction * num_documents))
    n_test = max(1, round(test_fraction * num_documents))
    if num_documents - n_val - n_test < 1:
        raise KDLabError(
            f"the corpus has {num_documents} document(s), too few to split: {n_val} val + {n_test} test leave none "
            "to train on (train, val and test get one document each at least); add documents (one per .txt file "
            "or .jsonl line) or lower the val/test shares of data.split_fractions."
        )
    order = torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    return {name: sorted(parts[name]) for name in SPLITS}  # corpus order inside a split


def pack_blocks(token_lists: Sequence[Sequence[int]], eos_id: int, block_size: int, split: str = "train") -> Tensor:
    """``[N, block_size + 1]`` blocks of the documents joined by EOS; the ragged tail is dropped."""
    stream = torch.tensor([t for tokens in token_lists for t in (*tokens, eos_id)], dtype=torch.int64)
    width = block_size + 1
    n = len(stream) // width
    if n == 0:
        raise KDLabError(
            f"split '{split}' has {len(stream)} tokens in {len(token_lists)} document(s), fewer than one block of "
            f"block_size + 1 = {width}; set a smaller data.block_size (at most {max(len(stream) - 1, 1)}), "
            "add text, or give this split a larger share in data.split_fractions."
        )
    return stream[: n * width].view(n, width)


def pack_settings(
    corpus: Corpus, tokenizer: TextTokenizer, block_size: int, fractions: Sequence[float], seed: int
) -> dict:
    """What decides the packed blocks, hence their cache key."""
    return {
        "format": PACK_FORMAT,
        "corpus_sha256": corpus.sha256,
        "tokenizer": tokenizer.fingerprint,
        "block_size": block_size,
        "split_fractions": list(check_fractions(fractions)),
        "split_seed": seed,
    }


def pack_corpus(
    corpus: Corpus,
    tokenizer: TextTokenizer,
    block_size: int = 64,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> PackedSplits:
    """Split, tokenize and pack ``corpus``; read from ``cache_dir`` when packed there before."""
    if block_size < 1:
        raise KDLabError(f"data.block_size={block_size} must be a positive number of tokens, e.g. 64.")
    settings = pack_settings(corpus, tokenizer, block_size, fractions, seed)
    cache = Path(cache_dir) / f"packed-{digest(settings)}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        return _read_cached(cache)
    documents = split_documents(len(corpus.documents), fractions, seed)
    blocks, tokens = {}, {}
    for split in SPLITS:
        token_lists = tokenizer.encode_batch([corpus.documents[i] for i in documents[split]])
        tokens[split] = sum(len(t) + 1 for t in token_lists)
        blocks[split] = pack_blocks(token_lists, tokenizer.eos_id, block_size, split)
    packed = PackedSplits(blocks, tokens, documents)
    if cache is not None:
        log.info("Packed %s into %s blocks -> %s", corpus.name, {s: len(b) for s, b in blocks.items()}, cache)
        atomic_torch_save({"blocks": blocks, "tokens": tokens, "documents": documents, "settings": settings}, cache)
    return packed


def _read_cached(cache: Path) -> PackedSplits:
    try:
        saved = torch.load(cache, weights_only=True)
        return PackedSplits(saved["blocks"], saved["tokens"], saved["documents"])
    except Exception as e:
        raise KDLabError(
            f"packed-text cache {cache} is unreadable ({brief(e, sentence=True)}): it is truncated or corrupt; "
            f"delete it (rm {cache}) and the next run packs the corpus again."
        ) from e
