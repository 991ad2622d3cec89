"""Tokenizers for language-model data: a byte-level BPE trained here on the corpus, or a pretrained one read
from a local directory. Both are used through the small ``TextTokenizer`` protocol.

The trained BPE is cached as one ``tokenizer.json`` keyed by the corpus digest and the training settings, so a
second run reads it instead of training. A tokenizer's ``fingerprint`` digests everything that decides which
ids a text gets; two models may share logits only when their data share a fingerprint.
"""

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kd_lab.data.text.corpus import Corpus
from kd_lab.errors import KDLabError, brief
from kd_lab.utils.io import atomic_write_text  # the mode of a plain open(), not mkstemp's 0600

log = logging.getLogger(__name__)

# No <unk>: byte-level BPE spells every string with its 256 byte tokens, so an unknown token cannot occur.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<mask>")
BYTE_ALPHABET = 256
BPE_FORMAT = "kd-lab-byte-bpe-1"  # bump when the training recipe changes: old caches then stop matching
# Runtime settings, not the text -> ids mapping: transformers adds an empty post-processor when it saves a
# tokenizer, and we never add special tokens on encode, so neither may change the fingerprint.
UNHASHED_KEYS = ("version", "truncation", "padding", "post_processor")


class TextTokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int
    mask_id: int | None  # None: a causal tokenizer, unusable for the masked objective
    special_ids: tuple[int, ...]  # never masked, never drawn as random replacements
    fingerprint: str
    source: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def digest(obj: Any, length: int = 16) -> str:
    """A short sha256 of a JSON-able object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class BackendTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer``: the trained BPE, or the Rust core of a fast pretrained one."""

    def __init__(self, backend: Tokenizer, pad_id: int, eos_id: int, mask_id: int | None, special_ids, source: str):
        self.backend = Tokenizer.from_str(backend.to_str())  # a copy: switching off truncation must not leak
        self.backend.no_truncation()  # a tokenizer.json may cap encodings at the model's length; we pack first
        self.backend.no_padding()
        self.backend.encode_special_tokens = True  # a literal "<eos>" in the text is text, not a document end
        self.pad_id, self.eos_id, self.mask_id = pad_id, eos_id, mask_id
        self.special_ids = tuple(sorted(set(special_ids)))
        self.source = source
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        config = {k: v for k, v in json.loads(self.backend.to_str()).items() if k not in UNHASHED_KEYS}
        self.fingerprint = digest({"tokenizer": config, "pad": pad_id, "eos": eos_id, "mask": mask_id})

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


class PythonTokenizer:
    """A transformers tokenizer with no Rust core (``PythonBackend``, e.g. ByT5's)."""

    def __init__(self, hf: Any, pad_id: int, eos_id: int, mask_id: int | None, special_ids, source: str):
        self.hf = hf
        self.pad_id, self.eos_id, self.mask_id = pad_id, eos_id, mask_id
        self.special_ids = tuple(sorted(set(special_ids)))
        self.source = source
        self.vocab_size = len(hf)
        vocab = sorted(hf.get_vocab().items(), key=lambda item: (item[1], item[0]))
        ids = {"pad": pad_id, "eos": eos_id, "mask": mask_id}
        self.fingerprint = digest({"class": type(hf).__name__, "vocab": vocab, **ids})

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a literal "</s>" in the text is text; verbose=False: no too-long warning
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=True, verbose=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def bpe_settings(corpus: Corpus, vocab_size: int) -> dict[str, Any]:
    """What decides the trained tokenizer, hence its cache key."""
    return {
        "format": BPE_FORMAT,
        "corpus_sha256": corpus.sha256,
        "vocab_size": vocab_size,
        "special_tokens": list(SPECIAL_TOKENS),
        "tokenizers": tokenizers.__version__,  # another release may merge differently
    }


def train_bpe(corpus: Corpus, vocab_size: int = 2048, cache_dir: str | Path | None = None) -> BackendTokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (fewer if the corpus runs out of pairs to merge), read from
    ``cache_dir`` when it was trained there before."""
    smallest = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise KDLabError(
            f"data.vocab_size={vocab_size} is below the {smallest} tokens a byte-level BPE needs "
            f"({BYTE_ALPHABET} bytes + {len(SPECIAL_TOKENS)} special tokens); set data.vocab_size={smallest} or more."
        )
    cache = Path(cache_dir) / f"bpe-{digest(bpe_settings(corpus, vocab_size))}.json" if cache_dir else None
    if cache is not None and cache.exists():
        backend = _read_cached(cache)
    else:
        backend = _train(corpus, vocab_size)
        if cache is not None:
            atomic_write_text(backend.to_str(), cache)
    pad, eos, mask = (backend.token_to_id(token) for token in SPECIAL_TOKENS)
    source = str(cache) if cache is not None else f"bpe trained on {corpus.name}"
    return BackendTokenizer(backend, pad, eos, mask, (pad, eos, mask), source)


def _train(corpus: Corpus, vocab_size: int) -> Tokenizer:
    log.info(
        "Training a byte-level BPE of %d tokens on %s (%d documents)", vocab_size, corpus.name, len(corpus.documents)
    )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # first, so their ids are 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen in the corpus or not
        show_progress=False,
    )
    backend.train_from_iterator(corpus.documents, trainer=trainer, length=len(corpus.documents))
    return backend


def _read_cached(cache: Path) -> Tokenizer:
    try:
        backend = Tokenizer.from_file(str(cache))
    except Exception as e:
        raise KDLabError(
            f"tokenizer cache {cache} is unreadable ({brief(e, sentence=True)}): it is truncated or corrupt; "
            f"delete it (rm {cache}) and the next run trains it again."
        ) from e
    if any(backend.token_to_id(token) is None for token in SPECIAL_TOKENS):
        raise KDLabError(f"tokenizer cache {cache} lacks the tokens {SPECIAL_TOKENS}; delete it (rm {cache}).")
    return backend


def load_pretrained(directory: str | Path) -> BackendTokenizer | PythonTokenizer:
    """The tokenizer that ``transformers.AutoTokenizer`` reads from a local directory (never the hub)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise KDLabError(
            f"data.tokenizer={directory} is not a directory; set it to a directory written by "
            "tokenizer.save_pretrained(dir), or data.tokenizer=null to train a BPE on the corpus."
        )
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise KDLabError(
            f"data.tokenizer={directory} has no tokenizer files (tokenizer.json or tokenizer_config.json); "
            "write them with tokenizer.save_pretrained(dir), or set data.tokenizer=null to train a BPE."
        )
    from transformers import AutoTokenizer  # seconds to import: only when a pretrained tokenizer is asked for

    try:
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise KDLabError(
            f"transformers could not load the tokenizer in {directory} ({brief(e, sentence=True)}); check that "
            "the files are complete and that its tokenizer class's requirements (e.g. sentencepiece) are installed."
        ) from e
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    if eos is None:
        raise KDLabError(
            f"the tokenizer in {directory} has no eos or sep token to end documents with; set one "
            "(tokenizer.eos_token = ...) and save it again."
        )
    pad = hf.pad_token_id if hf.pad_token_id is not None else eos  # GPT-2 style: blocks are full, pad unused
    mask = getattr(hf, "mask_token_id", None)
    special = {pad, eos, *hf.all_special_ids} | ({mask} if mask is not None else set())
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        return BackendTokenizer(backend, pad, eos, mask, special, str(folder))
    return PythonTokenizer(hf, pad, eos, mask, special, str(folder))
