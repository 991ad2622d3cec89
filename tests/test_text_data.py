"""The offline text pipeline: corpora, tokenizers, packing, masking and the data module (docs/text-data.md)."""

import json
from pathlib import Path

import pytest
import torch

from kd_lab.data.text import (
    IGNORE_INDEX,
    BackendTokenizer,
    MaskTokens,
    PythonTokenizer,
    TextDataModule,
    load_corpus,
    load_pretrained,
    pack_blocks,
    pack_corpus,
    split_documents,
    train_bpe,
)
from kd_lab.data.text.corpus import Corpus, stdlib_modules
from kd_lab.errors import KDLabError

SMALL_VOCAB = 300  # the byte-level BPE needs 259 (256 bytes + 3 special tokens)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus()


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory) -> BackendTokenizer:
    return train_bpe(corpus, SMALL_VOCAB, tmp_path_factory.mktemp("tokenizers"))


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# -- corpora --------------------------------------------------------------------------------------------------
def test_pydoc_topics_is_every_topic_in_key_order(corpus):
    from pydoc_data.topics import topics

    assert corpus.documents == [topics[key] for key in sorted(topics)]
    assert corpus.name == "pydoc_topics" and corpus.python_version
    assert load_corpus("pydoc_topics").sha256 == corpus.sha256
    assert corpus.characters > 100_000


def test_sha_tracks_document_boundaries():
    assert Corpus("x", ["ab", "c"], "s").sha256 != Corpus("x", ["a", "bc"], "s").sha256


def test_stdlib_selection_skips_tests_idle_and_site_packages(tmp_path):
    write(tmp_path / "b.py", '"""Module b."""\ndef f():\n    """F does."""\n')
    write(tmp_path / "a" / "__init__.py", '"""Package a."""\nclass C:\n    """A class."""\n')
    write(tmp_path / "nodoc.py", "x = 1\n")
    write(tmp_path / "broken.py", 'print "python 2"\n')
    for skipped in ("test", "idlelib", "site-packages", "a/tests"):
        write(tmp_path / skipped / "m.py", '"""Skipped."""\n')
    assert list(stdlib_modules(tmp_path)) == [
        ("a/__init__.py", "Package a.\n\nA class."),
        ("b.py", "Module b.\n\nF does."),
    ]


@pytest.mark.slow
def test_stdlib_docstrings_corpus():
    stdlib = load_corpus("stdlib_docstrings")
    assert len(stdlib.documents) > 100 and stdlib.python_version
    assert any("Return" in doc for doc in stdlib.documents)


def test_user_txt_and_jsonl_files_in_sorted_order(tmp_path):
    write(tmp_path / "b.txt", "second file")
    write(tmp_path / "a" / "one.jsonl", '{"text": "line one"}\n\n{"text": "line two", "id": 2}\n')
    write(tmp_path / "c.csv", "not read")
    write(tmp_path / ".hidden" / "x.txt", "not read")
    write(tmp_path / "empty.txt", "  \n")
    files = load_corpus(path=tmp_path)
    assert files.name == "files" and files.python_version is None
    assert files.documents == ["line one", "line two", "second file"]
    write(tmp_path / "body.jsonl", '{"body": "custom field"}\n')
    assert load_corpus(path=tmp_path / "body.jsonl", jsonl_field="body").documents == ["custom field"]
    assert load_corpus(corpus="files", path=tmp_path / "b.txt").documents == ["second file"]


@pytest.mark.parametrize(
    ("files", "path", "field", "message"),
    [
        ({}, "missing", "text", "does not exist"),
        ({"a.txt": " \n\t", "b.jsonl": '{"text": ""}\n'}, "", "text", "is empty"),
        ({"a.txt": b"caf\xe9"}, "a.txt", "text", "a.txt is not UTF-8: byte 0xe9 at offset 3"),
        ({"a.jsonl": '{"text": "ok"}\n{"text": oops}\n'}, "a.jsonl", "text", "a.jsonl line 2 is not JSON"),
        ({"a.jsonl": '{"text": "ok"}\n{"body": "x"}\n'}, "a.jsonl", "text", "a.jsonl line 2 has no 'text' field"),
        ({"a.jsonl": '["text"]\n'}, "a.jsonl", "text", "line 1 has no 'text' field (found: a JSON array)"),
        ({"a.jsonl": '{"text": 3}\n'}, "a.jsonl", "text", "is a JSON number, not a string"),
        ({"a.csv": "x"}, "a.csv", "text", "is not a .txt or .jsonl file"),
        ({"a.csv": "x"}, "", "text", "holds no .txt or .jsonl files"),
    ],
)
def test_bad_user_corpora_name_the_problem(tmp_path, files, path, field, message):
    for name, data in files.items():
        write(tmp_path / name, data)
    with pytest.raises(KDLabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_corpus(path=tmp_path / path, jsonl_field=field)


def test_bad_corpus_names(tmp_path):
    with pytest.raises(KDLabError, match="is not one of"):
        load_corpus("wikipedia")
    with pytest.raises(KDLabError, match="both choose the text"):
        load_corpus("stdlib_docstrings", path=tmp_path)
    with pytest.raises(KDLabError, match=r"set data.path"):
        load_corpus("files")


# -- tokenizers -----------------------------------------------------------------------------------------------
def test_bpe_round_trip_and_special_ids(bpe):
    text = "def f(x):\n\treturn x  # héllo wörld € 😀 <eos>"
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.eos_id not in ids  # a literal "<eos>" in the text is text
    assert (bpe.pad_id, bpe.eos_id, bpe.mask_id) == (0, 1, 2) and bpe.vocab_size == SMALL_VOCAB
    assert bpe.encode_batch([text, "x"]) == [ids, bpe.encode("x")]


def test_bpe_cache_hit_is_the_same_tokenizer(corpus, bpe, tmp_path):
    cache = Path(bpe.source)
    assert cache.exists() and not list(cache.parent.glob("*.tmp"))
    again = train_bpe(corpus, SMALL_VOCAB, cache.parent)
    assert again.source == bpe.source and again.fingerprint == bpe.fingerprint
    assert train_bpe(corpus, SMALL_VOCAB).fingerprint == bpe.fingerprint  # training is deterministic
    assert train_bpe(corpus, SMALL_VOCAB + 20, cache.parent).fingerprint != bpe.fingerprint


def test_bpe_errors(corpus, tmp_path):
    with pytest.raises(KDLabError, match=r"data.vocab_size=256 is below the 259"):
        train_bpe(corpus, 256)
    tokenizer = train_bpe(corpus, SMALL_VOCAB, tmp_path)
    Path(tokenizer.source).write_text('{"truncated": ')
    with pytest.raises(KDLabError, match=r"is unreadable.*delete it"):
        train_bpe(corpus, SMALL_VOCAB, tmp_path)


def test_pretrained_tokenizer_from_a_local_directory(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe.backend, pad_token="<pad>", eos_token="<eos>", mask_token="<mask>"
    )
    hf.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, BackendTokenizer)
    assert loaded.fingerprint == bpe.fingerprint  # the same mapping, whichever way it was read
    assert (loaded.pad_id, loaded.eos_id, loaded.mask_id, loaded.vocab_size) == (0, 1, 2, SMALL_VOCAB)
    assert loaded.decode(loaded.encode("naïve text")) == "naïve text"


def test_pretrained_python_tokenizer(tmp_path):
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path)  # no tokenizer.json: transformers' PythonBackend
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, PythonTokenizer) and loaded.mask_id is None
    ids = loaded.encode("naïve </s>")
    assert loaded.eos_id not in ids and loaded.decode(ids) == "naïve </s>"


def test_pretrained_errors(tmp_path):
    with pytest.raises(KDLabError, match="is not a directory"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(KDLabError, match="has no tokenizer files"):
        load_pretrained(tmp_path)


# -- splits and packing ---------------------------------------------------------------------------------------
def test_document_split_is_seeded_disjoint_and_complete():
    splits = split_documents(79, (0.9, 0.05, 0.05), seed=0)
    assert splits == split_documents(79, (0.9, 0.05, 0.05), seed=0) != split_documents(79, seed=1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [71, 4, 4]
    assert sorted(i for ids in splits.values() for i in ids) == list(range(79))
    assert all(len(ids) == 1 for ids in split_documents(3).values())  # at least one document each


def test_document_split_errors():
    with pytest.raises(KDLabError, match=r"2 document\(s\), too few to split"):
        split_documents(2)
    with pytest.raises(KDLabError, match="sum to 1"):
        split_documents(10, (0.5, 0.5, 0.5))
    with pytest.raises(KDLabError, match="three positive numbers"):
        split_documents(10, (1.0, 0.0, 0.0))


def test_pack_blocks_joins_with_eos_and_drops_the_tail():
    blocks = pack_blocks([[5, 6, 7], [8, 9]], eos_id=1, block_size=2)
    assert blocks.dtype == torch.int64 and blocks.tolist() == [[5, 6, 7], [1, 8, 9]]  # the last EOS is the tail
    with pytest.raises(KDLabError, match=r"split 'val' has 3 tokens in 1 document\(s\).*smaller data.block_size"):
        pack_blocks([[5, 6]], eos_id=1, block_size=4, split="val")


def test_pack_corpus_keeps_documents_in_their_split(corpus, bpe, tmp_path):
    packed = pack_corpus(corpus, bpe, block_size=32, cache_dir=tmp_path)
    assert not set(packed.documents["train"]) & (set(packed.documents["val"]) | set(packed.documents["test"]))
    for split, blocks in packed.blocks.items():
        assert blocks.shape == (packed.tokens[split] // 33, 33)
        own = pack_blocks(bpe.encode_batch([corpus.documents[i] for i in packed.documents[split]]), bpe.eos_id, 32)
        assert torch.equal(blocks, own)  # exactly this split's documents, in corpus order
    cached = pack_corpus(corpus, bpe, block_size=32, cache_dir=tmp_path)
    assert all(torch.equal(cached.blocks[s], packed.blocks[s]) for s in packed.blocks)
    assert len(list(tmp_path.glob("packed-*.pt"))) == 1
    next(tmp_path.glob("packed-*.pt")).write_bytes(b"not a torch file")
    with pytest.raises(KDLabError, match=r"packed-text cache .* is unreadable"):
        pack_corpus(corpus, bpe, block_size=32, cache_dir=tmp_path)


# -- masking --------------------------------------------------------------------------------------------------
def masked(ids: torch.Tensor, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    mask = MaskTokens(mask_id=2, vocab_size=50, special_ids=(0, 1), **kwargs)
    return mask({"input": ids, "target": ids, "index": torch.arange(len(ids))}, torch.Generator().manual_seed(seed))


def test_mask_tokens_follows_bert():
    ids = torch.randint(3, 50, (256, 128), generator=torch.Generator().manual_seed(0))
    ids[:, -8:] = 0  # padding
    out = masked(ids)
    picked = out["target"] != IGNORE_INDEX
    assert torch.equal(out["target"][picked], ids[picked])  # the original id where picked, -100 elsewhere
    assert torch.equal(out["input"][~picked], ids[~picked])  # nothing changes where not picked
    assert not picked[:, -8:].any()  # padding is never picked
    assert abs(picked[:, :-8].float().mean().item() - 0.15) < 0.005
    became_mask = (out["input"] == 2) & picked
    changed = (out["input"] != ids) & ~became_mask
    kept = picked & (out["input"] == ids)
    n = picked.sum().item()
    assert abs(became_mask.sum().item() / n - 0.8) < 0.02
    assert abs((changed.sum().item() + kept.sum().item()) / n - 0.2) < 0.02
    assert not torch.isin(out["input"][changed], torch.tensor([0, 1, 2])).any()  # random ids are never special


# Pinned: a change to the draws changes every masked run, so it must be deliberate.
GOLDEN_PICKED = [[0, 2], [0, 3], [0, 12], [1, 7], [1, 15]]  # the last one keeps its token


def test_mask_tokens_is_deterministic_given_the_generator():
    ids = torch.arange(3, 43).view(2, 20)
    first = masked(ids, seed=0)
    assert all(torch.equal(first[k], masked(ids, seed=0)[k]) for k in first)
    assert not torch.equal(first["target"], masked(ids, seed=1)["target"])
    picked = first["target"] != IGNORE_INDEX
    assert picked.nonzero().tolist() == GOLDEN_PICKED
    assert first["target"][picked].tolist() == [5, 6, 15, 30, 38]
    assert first["input"][picked].tolist() == [2, 2, 2, 2, 38]


def test_mask_tokens_rejects_bad_probabilities():
    with pytest.raises(KDLabError, match="mask_prob=0"):
        MaskTokens(mask_id=2, vocab_size=50, mask_prob=0)
    with pytest.raises(KDLabError, match="sum to at most 1"):
        MaskTokens(mask_id=2, vocab_size=50, mask_fraction=0.9, random_fraction=0.2)


# -- the data module ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """One cache for the data-module tests: the first trains and packs, the others read the cache."""
    return tmp_path_factory.mktemp("text-data")


def module(data_dir: Path, **kwargs) -> TextDataModule:
    kwargs = {"vocab_size": SMALL_VOCAB, "block_size": 16, "batch_size": 8, **kwargs}
    return TextDataModule(data_dir=data_dir, **kwargs)


def test_causal_data_module(text_dir):
    dm = module(text_dir)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == batch["target"].shape == (8, 16) and batch["input"].dtype == torch.int64
    assert torch.equal(batch["input"][:, 1:], batch["target"][:, :-1])  # the target is the next token
    assert (dm.vocab_size, dm.pad_id, dm.eos_id, dm.mask_id) == (SMALL_VOCAB, 0, 1, 2)
    info = dm.corpus_info
    assert info["name"] == "pydoc_topics" and info["sha256"] == load_corpus().sha256
    assert info["tokenizer_fingerprint"] == dm.tokenizer.fingerprint
    assert set(info["tokens_per_split"]) == {"train", "val", "test"}
    assert all(len(dm.splits[s]["input"]) == n for s, n in info["blocks_per_split"].items())
    json.dumps(info)  # results can record it as it is
    dm.check_model_positions(16)
    with pytest.raises(KDLabError, match=r"data.block_size=16 is longer than the model's 8 positions.*block_size=8"):
        dm.check_model_positions(8)


def test_masked_data_module(text_dir):
    dm = module(text_dir, objective="masked")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    picked = batch["target"] != IGNORE_INDEX
    assert picked.any() and (batch["input"][picked] == dm.mask_id).any()
    assert isinstance(dm.augment, MaskTokens)
    again = module(text_dir, objective="masked", seed=7)  # another training seed: the same evaluation masks
    again.setup()
    assert torch.equal(dm.splits["val"]["input"], again.splits["val"]["input"])
    assert (dm.splits["val"]["target"] != IGNORE_INDEX).any()


def test_data_module_errors(tmp_path):
    with pytest.raises(KDLabError, match=r"data.objective='span'"):
        module(tmp_path, objective="span")
    with pytest.raises(KDLabError, match=r"data.mask_prob=1.5 must be in \(0, 1\]"):
        module(tmp_path, objective="masked", mask_prob=1.5)
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path / "byt5")
    with pytest.raises(KDLabError, match=r"has 384 tokens but data.vocab_size=300; set data.vocab_size=384"):
        module(tmp_path, tokenizer=tmp_path / "byt5").setup()
    with pytest.raises(KDLabError, match=r"data.objective=masked needs a mask token"):
        module(tmp_path, tokenizer=tmp_path / "byt5", vocab_size=384, objective="masked").setup()
    for name in ("a", "b", "c"):
        write(tmp_path / "text" / f"{name}.txt", f"document {name}")
    with pytest.raises(KDLabError, match=r"split 'train' has \d+ tokens in 1 document.*smaller data.block_size"):
        module(tmp_path, path=tmp_path / "text").setup()
