"""Teacher-generated sequences for sequence-level KD (Kim & Rush 2016), generated once and kept on disk.

The teacher continues a prefix of every training block (greedy, sampled, or beam search). The result is one
``(N, L)`` tensor of token ids: row i is the prompt of training block i followed by the teacher's
continuation, L the block's input length. It is keyed like the teacher store: a hash of the teacher's
weights, the training token ids and the generation settings. So every run that asks the same reuses it.

An entry is a directory ``<root>/<digest>/`` with ``sequences.safetensors`` (read memory-mapped) and
``key.json``. It is written under a temporary name and renamed when complete: a reader never sees half of
it. Two runs that generate the same entry at once both finish; the first rename wins, the other is dropped.
"""

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel

from kd_lab.errors import KDLabError
from kd_lab.lm.generation import check_prompts, eval_mode, pad_token_id, sample
from kd_lab.run.view_store import tensor_digest

DECODINGS = ("greedy", "sample", "beam")
FORMAT = 1  # bump when the stored layout or the meaning of a setting changes


@dataclass(frozen=True)
class GenerationSettings:
    """How the teacher generates. ``temperature`` and ``top_k`` apply to ``sample``, ``beam_size`` to
    ``beam``; ``seed`` seeds the sampler. Settings that do not apply are left out of the key."""

    decoding: str = "beam"
    prompt_length: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    beam_size: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.decoding not in DECODINGS:
            raise KDLabError(f"algorithm.decoding={self.decoding!r} is not one of {list(DECODINGS)}.")

    def as_key(self) -> dict:
        key = asdict(self)
        if self.decoding != "sample":
            for name in ("temperature", "top_k", "seed"):
                key.pop(name)
        if self.decoding != "beam":
            key.pop("beam_size")
        return key


def store_key(teacher: torch.nn.Module, train_inputs: Tensor, settings: GenerationSettings) -> dict:
    """What the stored sequences depend on: the teacher's weights, the training token ids, the settings."""
    return {
        "format": FORMAT,
        "teacher_type": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
        "teacher": tensor_digest(teacher.state_dict()),
        "train": tensor_digest({"input": train_inputs}),
        "generation": settings.as_key(),
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def generate(
    teacher: PreTrainedModel, prompts: Tensor, length: int, settings: GenerationSettings, batch_size: int = 256
) -> Tensor:
    """``(N, length)`` ids: each prompt row followed by ``length - P`` tokens of the teacher, in chunks of
    ``batch_size`` rows on the teacher's device. Sampling draws every token from one generator seeded with
    ``settings.seed``, chunk after chunk, so the same settings give the same tokens."""
    new_tokens = length - prompts.shape[1]
    device = next(teacher.parameters()).device
    check_prompts(teacher, prompts[:1], new_tokens)
    generator = torch.Generator(device).manual_seed(settings.seed) if settings.decoding == "sample" else None
    rows = []
    for chunk in prompts.split(batch_size):
        chunk = chunk.to(device)
        if settings.decoding == "sample":
            ids = sample(teacher, chunk, new_tokens, settings.temperature, settings.top_k, generator)
        else:
            ids = beam_search(teacher, chunk, new_tokens, 1 if settings.decoding == "greedy" else settings.beam_size)
        rows.append(ids.cpu())
    return torch.cat(rows).clone()  # a normal tensor: inference-mode tensors cannot be used with autograd


def beam_search(model: PreTrainedModel, prompts: Tensor, new_tokens: int, beam_size: int) -> Tensor:
    """The most likely continuation of ``new_tokens`` tokens found by a beam of ``beam_size`` (1: greedy).

    We use ``transformers``' ``generate`` with ``num_beams``: it keeps the KV cache per beam and reorders it,
    and our GPT-2 and Llama models support it. Every row gets exactly ``new_tokens`` tokens
    (``min_new_tokens``), so an end-of-sequence token never cuts a stored row short and the length
    penalty cannot change the ranking (all hypotheses have the same length)."""
    kwargs = {
        "attention_mask": torch.ones_like(prompts),
        "do_sample": False,
        "num_beams": beam_size,
        "use_cache": True,
        "pad_token_id": pad_token_id(model),
        "eos_token_id": model.generation_config.eos_token_id,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        # Some default generation configs carry sampling settings that deterministic decoding warns about.
        "temperature": None,
        "top_k": None,
        "top_p": None,
    }
    with eval_mode(model), torch.inference_mode():
        return model.generate(prompts, **kwargs)


class SequenceStore:
    """Stored teacher sequences under ``root``, one directory per key digest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest

    def load(self, digest: str) -> Tensor | None:
        """The stored ``(N, L)`` sequences, or None when this key was never written."""
        file = self.path(digest) / "sequences.safetensors"
        if not file.is_file():
            return None
        with safe_open(str(file), framework="pt") as f:  # memory-mapped: pages are read as rows are used
            return f.get_tensor("sequences").long()

    def save(self, digest: str, key: dict, sequences: Tensor, meta: dict) -> None:
        """Write the entry atomically. If another run wrote it first, keep theirs (it is the same data)."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()
        try:
            # int32 halves the bytes of int64 and holds any vocabulary
            save_file({"sequences": sequences.to(torch.int32).contiguous()}, str(staging / "sequences.safetensors"))
            (staging / "key.json").write_text(json.dumps({"key": key, **meta}, indent=2, sort_keys=True))
            try:
                staging.rename(self.path(digest))
            except OSError:
                if not (self.path(digest) / "sequences.safetensors").is_file():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def load_or_generate(
    store: SequenceStore | None,
    teacher: PreTrainedModel,
    prompts: Tensor,
    length: int,
    settings: GenerationSettings,
    train_inputs: Tensor,
    batch_size: int = 256,
) -> tuple[Tensor, dict]:
    """The sequences for this key (from the store, or generated and stored), and what results.json records:
    ``key`` (the digest), ``reused``, ``generation_seconds`` (0 when reused), ``sequences``, ``bytes``."""
    key = store_key(teacher, train_inputs, settings)
    digest = key_digest(key)
    stored = store.load(digest) if store is not None else None
    if stored is not None:
        if stored.shape != (prompts.shape[0], length):
            raise KDLabError(
                f"the sequence store entry {store.path(digest)} holds shape {tuple(stored.shape)}, but this run "
                f"needs {(prompts.shape[0], length)}: the entry is damaged; delete that directory to regenerate it."
            )
        sequences, seconds, reused = stored, 0.0, True
    else:
        start = time.perf_counter()
        sequences = generate(teacher, prompts, length, settings, batch_size)
        seconds = time.perf_counter() - start
        reused = False
        if store is not None:
            store.save(digest, key, sequences, {"generation_seconds": seconds})
    info = {
        "key": digest,
        "reused": reused,
        "generation_seconds": seconds,
        "sequences": int(sequences.shape[0]),
        "tokens_per_sequence": int(sequences.shape[1]),
        "bytes": int(sequences.numel() * 4),  # as stored (int32)
        "settings": settings.as_key(),
    }
    if store is not None:
        info["path"] = str(store.path(digest))
    return sequences, info
