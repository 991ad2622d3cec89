"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with the student as the draft model and
the teacher as the target, to measure the acceptance rate DistillSpec (Zhou et al. 2024) optimises.

One round: the draft proposes ``gamma`` tokens one at a time, the target scores all of them in one forward,
the longest acceptable prefix is kept, and one more token comes from the target (the correction at the
first rejection, or a bonus token when all ``gamma`` were accepted). So every round makes progress and the
output follows the target's distribution (sampled mode) or equals the target's greedy decoding (greedy).

Costs, kept simple on purpose: prompts are decoded one at a time (rows accept different numbers of tokens,
so a batch would need ragged sequences); the target re-reads the whole prefix every round (no KV cache);
the draft keeps a KV cache, cut back to the accepted prefix after each round.
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from kd_lab.errors import KDLabError
from kd_lab.lm.generation import cache_kwarg, check_prompts, eval_mode, probabilities
from kd_lab.models.hf import vocab_size

MODES = ("greedy", "sampled")


@dataclass
class Speculation:
    """What speculative decoding produced: ``sequences`` is ``(B, P + max_new_tokens)``, prompts first."""

    sequences: Tensor
    proposed: int
    accepted: int
    rounds: int


def acceptance_rate(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    prompts: Tensor,
    gamma: int = 4,
    max_new_tokens: int = 32,
    mode: str = "greedy",
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """``acceptance_rate`` = accepted / proposed draft tokens, over all prompts and rounds;
    ``mean_accepted_per_round`` = accepted / rounds (each round also adds one target token).

    ``greedy``: a draft token is accepted iff it is the target's argmax there. ``sampled``: draft token x is
    accepted with probability ``min(1, p_target(x) / p_draft(x))``, both at ``temperature``. The last round
    proposes fewer than ``gamma`` tokens when fewer are left to make, so ``proposed`` counts only tokens
    that could be kept.
    """
    run = speculative_decode(draft, target, prompts, gamma, max_new_tokens, mode, temperature, seed)
    return {
        "acceptance_rate": run.accepted / run.proposed,
        "mean_accepted_per_round": run.accepted / run.rounds,
        "rounds": run.rounds,
        "proposed": run.proposed,
        "accepted": run.accepted,
    }


def speculative_decode(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    prompts: Tensor,
    gamma: int = 4,
    max_new_tokens: int = 32,
    mode: str = "greedy",
    temperature: float = 1.0,
    seed: int = 0,
) -> Speculation:
    """Decode ``max_new_tokens`` per prompt (``(B, P)`` ids, no padding). Every random draw comes from one
    ``torch.Generator`` seeded with ``seed``: the same seed gives the same tokens and counts."""
    if mode not in MODES:
        raise KDLabError(f"mode={mode!r}: use one of {', '.join(MODES)}")
    if gamma < 1:
        raise KDLabError(f"gamma={gamma} must be at least 1")
    # Vocabularies that differ by embedding padding share their first rows: both are cut to the shorter one
    # (exact when no token id reaches the padding, as for a tokenizer smaller than both).
    shared = min(vocab_size(draft), vocab_size(target))
    check_prompts(draft, prompts, max_new_tokens)
    check_prompts(target, prompts, max_new_tokens)
    if mode == "sampled" and temperature <= 0:
        raise KDLabError(f"temperature={temperature} must be positive; mode='greedy' is the temperature-0 limit")
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    run = Speculation(sequences=prompts, proposed=0, accepted=0, rounds=0)
    rows = []
    with eval_mode(draft, target), torch.inference_mode():
        for prompt in prompts:
            rows.append(
                _decode_one(
                    draft, target, prompt[None], gamma, max_new_tokens, mode, temperature, generator, run, shared
                )
            )
    run.sequences = torch.cat(rows)
    return run


def _decode_one(
    draft, target, seq: Tensor, gamma, max_new_tokens, mode, temperature, generator, run, shared: int
) -> Tensor:
    end = seq.shape[1] + max_new_tokens
    cache = DynamicCache()
    while seq.shape[1] < end:
        g = min(gamma, end - seq.shape[1])
        tokens, q = _propose(draft, cache, seq, g, mode, temperature, generator, shared)
        # Logits at positions len-1 .. len+g-1 score the g draft tokens and the token after them.
        logits = target(input_ids=torch.cat([seq, tokens[None]], dim=1)).logits[0, seq.shape[1] - 1 :, :shared]
        if mode == "greedy":
            n, token = verify_greedy(tokens, logits)
        else:
            n, token = verify_sampled(tokens, q, probabilities(logits, temperature), generator)
        run.proposed += g
        run.accepted += n
        run.rounds += 1
        seq = torch.cat([seq, tokens[None, :n], token.view(1, 1)], dim=1)
        # Keys of rejected draft tokens must not be attended to next round.
        extra = cache.get_seq_length() - (seq.shape[1] - 1)
        if extra > 0:
            cache.crop(-extra)  # a negative count removes that many (transformers 4.x and 5.x alike)
    return seq[:, :end]


def _propose(draft, cache, seq: Tensor, g: int, mode: str, temperature: float, generator, shared: int):
    """``g`` draft tokens and, in sampled mode, the ``(g, V)`` draft probabilities they were drawn from."""
    step = seq[:, cache.get_seq_length() :]  # tokens the draft's cache has not seen yet
    tokens, probs = [], []
    for _ in range(g):
        logits = draft(input_ids=step, use_cache=True, **{cache_kwarg(draft): cache}).logits[0, -1, :shared]
        if mode == "greedy":
            token = logits.argmax()
        else:
            probs.append(probabilities(logits, temperature))
            token = torch.multinomial(probs[-1], 1, generator=generator)[0]
        tokens.append(token)
        step = token.view(1, 1)
    return torch.stack(tokens), (torch.stack(probs) if probs else None)


def verify_greedy(tokens: Tensor, logits: Tensor) -> tuple[int, Tensor]:
    """Accepted count n (leading draft tokens equal to the target's argmax) and the target's next token.

    ``tokens``: ``(g,)`` draft tokens; ``logits``: ``(g + 1, V)`` target logits at the positions before
    each draft token and after the last one."""
    best = logits.argmax(dim=-1)
    n = int((tokens == best[:-1]).long().cumprod(0).sum())
    return n, best[n]


def verify_sampled(tokens: Tensor, q: Tensor, p: Tensor, generator: torch.Generator) -> tuple[int, Tensor]:
    """Rejection sampling of Leviathan et al.: accepted count n and the next token, drawn so that every
    produced token follows the target distribution ``p`` exactly, whatever the draft distribution ``q``.

    ``tokens``: ``(g,)`` draft tokens drawn from ``q`` (``(g, V)``); ``p``: ``(g + 1, V)`` target
    probabilities at the same positions plus the one after the last draft token."""
    for i, x in enumerate(tokens.tolist()):
        r = torch.rand((), generator=generator, device=p.device)
        if r * q[i, x] < p[i, x]:  # r < p / q with r in [0, 1): probability min(1, p / q)
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        if residual.sum() <= 0:  # only by rounding, when p == q: then p itself is the residual's law
            residual = p[i]
        return i, torch.multinomial(residual / residual.sum(), 1, generator=generator)[0]
    return len(tokens), torch.multinomial(p[-1], 1, generator=generator)[0]
