"""Generation with Hugging Face causal LMs: decoding speed (greedy, KV cache) and seeded sampling."""

import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from kd_lab.errors import KDLabError
from kd_lab.models.hf import max_positions


def generation_speed(model: PreTrainedModel, prompts: Tensor, max_new_tokens: int, repeats: int = 1) -> dict:
    """Greedy ``model.generate`` with the KV cache on ``prompts`` (``(B, P)`` token ids, no padding).

    Every row produces exactly ``max_new_tokens`` (an end-of-sequence token does not stop it early), so
    student and teacher given the same prompts do the same work and their numbers compare. One untimed
    1-token run comes first, so one-off allocations are not timed. Returns ``tokens_per_second``,
    ``seconds`` (all repeats together) and ``new_tokens`` (all rows and repeats together).
    """
    check_prompts(model, prompts, max_new_tokens)
    if repeats < 1:
        raise KDLabError(f"generation_speed: repeats={repeats} must be at least 1")
    eos = model.generation_config.eos_token_id
    kwargs = {
        "attention_mask": torch.ones_like(prompts),
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": pad_token_id(model),
        # Some default generation configs carry sampling settings that greedy decoding would warn about.
        "temperature": None,
        "top_k": None,
        "top_p": None,
        # Tells the min-length processor which token to suppress; with none there is nothing to suppress.
        "eos_token_id": eos,
    }
    with eval_mode(model), torch.inference_mode():
        model.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kwargs)
        _sync(prompts)
        start = time.perf_counter()
        for _ in range(repeats):
            out = model.generate(prompts, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kwargs)
        _sync(prompts)
        seconds = time.perf_counter() - start
    new_tokens = (out.shape[1] - prompts.shape[1]) * prompts.shape[0] * repeats
    return {"tokens_per_second": new_tokens / seconds, "seconds": seconds, "new_tokens": new_tokens}


def sample(
    model: PreTrainedModel,
    prompts: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral sampling from ``softmax(logits / temperature)``, optionally over the ``top_k`` most likely
    tokens. Returns ``(B, P + max_new_tokens)`` ids: the prompts followed by the new tokens, as ``generate``.

    Our own loop over the KV cache rather than ``generate``, because ``generate`` takes no
    ``torch.Generator``: every draw comes from ``generator`` (on the prompts' device), so a generator seeded
    the same gives the same tokens. Without one, the global torch RNG is used (``torch.manual_seed``).
    """
    check_prompts(model, prompts, max_new_tokens)
    ids, step = prompts, prompts
    with eval_mode(model), torch.inference_mode():
        cache = DynamicCache()
        for _ in range(max_new_tokens):
            logits = model(input_ids=step, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1]
            step = torch.multinomial(probabilities(logits, temperature, top_k), 1, generator=generator)
            ids = torch.cat([ids, step], dim=1)
    return ids


def probabilities(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """``softmax(logits / temperature)`` over the last dim, zero outside the ``top_k`` largest logits."""
    if temperature <= 0:
        raise KDLabError(f"temperature={temperature} must be positive; use greedy decoding for temperature 0")
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(dim=-1)


def check_prompts(model: PreTrainedModel, prompts: Tensor, max_new_tokens: int) -> None:
    """Fail before any compute on prompts or lengths the model cannot decode."""
    if not model.can_generate():
        raise KDLabError(f"{type(model).__name__} cannot generate text: use a causal LM (kd_lab.models.hf.causal_lm)")
    if prompts.dim() != 2 or prompts.dtype != torch.long or prompts.shape[1] == 0:
        raise KDLabError(f"prompts must be a (batch, length) LongTensor, got {prompts.dtype} {tuple(prompts.shape)}")
    if max_new_tokens < 1:
        raise KDLabError(f"max_new_tokens={max_new_tokens} must be at least 1")
    limit = max_positions(model)
    if prompts.shape[1] + max_new_tokens > limit:
        raise KDLabError(
            f"prompt length {prompts.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"{limit} positions: shorten one of them"
        )


def pad_token_id(model: PreTrainedModel) -> int:
    """The model's pad token, else its end-of-sequence token, else 0 (prompts are never padded here)."""
    for token in (model.generation_config.pad_token_id, model.generation_config.eos_token_id):
        if isinstance(token, list) and token:
            token = token[0]
        if token is not None:
            return int(token)
    return 0


def cache_kwarg(model: PreTrainedModel) -> str:
    """The forward's KV-cache argument: ``cache`` since transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside the block (no dropout), each model's own mode restored after it."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _sync(t: Tensor) -> None:
    # CUDA kernels run asynchronously: without a sync the clock would stop before the work ends.
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
