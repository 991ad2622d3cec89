"""Per-token divergences between the teacher's and the student's next-token distributions.

Logits are [N, V]: the batch and time dimensions flattened into N token positions, V the vocabulary.
p_T = softmax(teacher / T) and p_S = softmax(student / T) at temperature T.

    forward_kl  KL(p_T || p_S)                  Hinton et al. 2015 soft targets, at every position
    reverse_kl  KL(p_S || p_T)                  mode seeking (MiniLLM, Gu et al. 2024)
    jsd         b KL(p_T || m) + (1-b) KL(p_S || m),  m = b p_T + (1-b) p_S   (GKD, Agarwal et al. 2024)
    tvd         0.5 * sum_v |p_T - p_S|         (f-distill, Wen et al. 2023)
    skew_kl     KL(p_T || a p_T + (1-a) p_S)    (DistiLLM, Ko et al. 2024)
    skew_rkl    KL(p_S || a p_S + (1-a) p_T)    (DistiLLM)

jsd follows TRL's GKDTrainer: beta=0 is forward KL(p_T || p_S) and beta=1 is reverse KL(p_S || p_T), both
special-cased. The formula itself goes to 0 at both ends; it is jsd/b that tends to KL(p_T || p_S) as b -> 0
and jsd/(1-b) that tends to KL(p_S || p_T) as b -> 1. So the endpoints are a jump in scale, not a limit.

Every result is multiplied by T^2. The gradient of a softened divergence shrinks as 1/T^2 (Hinton et al.),
and T^2 keeps it on the scale of the hard-label loss when T changes.

The functions return the SUM over valid tokens. The caller divides by the number of valid tokens in the
whole optimizer step (all micro-batches, all ranks). A per-micro-batch mean would weight a token in a short
micro-batch more than one in a long micro-batch, so accumulation and DDP would not match one big batch.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lab.errors import KDLabError

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl")


def check_divergence(kind: str) -> None:
    """Refuse an unknown ``algorithm.divergence`` when the algorithm is built, naming the valid ones."""
    if kind not in KINDS:
        raise KDLabError(f"algorithm.divergence={kind!r} is not one of {list(KINDS)}.")


def check_options(kind: str, temperature: float, beta: float, alpha: float) -> None:
    """Raise KDLabError on an unknown kind or an out-of-range option, naming what is valid."""
    if kind not in KINDS:
        raise KDLabError(f"unknown token divergence kind {kind!r}; valid kinds: {', '.join(KINDS)}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise KDLabError(f"temperature must be a finite number > 0, got {temperature}; 1.0 is the usual value.")
    if not 0.0 <= beta <= 1.0:
        raise KDLabError(f"beta must be in [0, 1] (0: forward KL(T||S), 1: reverse KL(S||T)), got {beta}.")
    if not 0.0 <= alpha < 1.0:
        raise KDLabError(f"alpha must be in [0, 1) (1 makes the skew loss 0), got {alpha}; DistiLLM uses 0.1.")


def check_inputs(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> None:
    """Raise KDLabError unless the logits are matching [N, V] tensors and the mask is a boolean [N]."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise KDLabError(
            f"student and teacher logits must both be [N, V], got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}; flatten batch and time with .flatten(0, -2), and use "
            "shared_vocab() when the vocabularies differ by embedding padding."
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != student_logits.shape[:1]):
        raise KDLabError(
            f"mask must be a boolean tensor of shape [N] = [{student_logits.shape[0]}], got {mask.dtype} "
            f"{tuple(mask.shape)}; use labels.flatten() != -100."
        )


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half and bfloat16 inputs (a softmax over 32k+ entries loses too much in 8 bits of
    mantissa), float64 kept as float64 so that gradcheck can run."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities. Logits must be finite: then log_p is finite, and a p that
    underflows to 0 contributes 0 * finite = 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """log(w p + (1-w) q) for 0 < w < 1, by logaddexp: never forms p or q in linear space."""
    return torch.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """[N] divergences (times T^2), computed in work_dtype; no mask and no validation of the inputs."""
    dtype = work_dtype(student_logits, teacher_logits)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0) or (kind == "skew_kl" and alpha == 0.0):
        d = _kl(log_t, log_s)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0) or (kind == "skew_rkl" and alpha == 0.0):
        d = _kl(log_s, log_t)
    elif kind == "jsd":
        log_m = _log_mix(log_t, log_s, beta)
        d = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    elif kind == "tvd":
        d = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    elif kind == "skew_kl":
        d = _kl(log_t, _log_mix(log_t, log_s, alpha))
    elif kind == "skew_rkl":
        d = _kl(log_s, _log_mix(log_s, log_t, alpha))
    else:
        raise KDLabError(f"unknown token divergence kind {kind!r}; valid kinds: {', '.join(KINDS)}.")
    return d * temperature**2


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Sum over the tokens where ``mask`` is true of T^2 * D(p_T, p_S) (module docstring for the kinds).

    ``mask`` [N]: labels != -100. Masked rows are dropped before any compute, so they contribute exactly 0
    and get exactly 0 gradient even when their logits are garbage; dropping them costs one host sync.
    ``chunk_size``: walk the tokens in chunks of that many rows with a memory-bounded autograd Function
    (kd_lab/losses/chunked.py); teacher logits are then constants. None: plain autograd on all rows.
    The result is float32 (float64 for float64 inputs).
    """
    if chunk_size is not None:
        # imported here: chunked.py builds on this module's per-token math
        from kd_lab.losses.chunked import chunked_token_divergence

        return chunked_token_divergence(
            student_logits, teacher_logits, kind, mask, temperature, beta, alpha, chunk_size
        )
    check_options(kind, temperature, beta, alpha)
    check_inputs(student_logits, teacher_logits, mask)
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    return per_token_divergence(student_logits, teacher_logits, kind, temperature, beta, alpha).sum()


def mean(student_logits: Tensor, teacher_logits: Tensor, kind: str, mask: Tensor | None = None, **options) -> Tensor:
    """token_divergence divided by this call's valid-token count (1 when there are none).

    Right for one batch on one device. Under gradient accumulation or DDP, divide the sum by the valid
    tokens of the global batch instead (module docstring)."""
    total = token_divergence(student_logits, teacher_logits, kind, mask, **options)
    count = student_logits.shape[0] if mask is None else int(mask.sum())
    return total / max(count, 1)


def shared_vocab(
    student_logits: Tensor, teacher_logits: Tensor, vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Views of both logits cut to the common vocabulary prefix (or to ``vocab_size``) on the last dim.

    Models of one tokenizer often pad the embedding to a multiple of 64 or 128 rows, so their V differ.
    The cut is exact when both share the tokenizer and the rows past the cut are padding that no token id
    uses: the softmax over the kept rows is then the model's distribution over real tokens (the mass a
    padded row had is dropped and the rest renormalized). It is no fix for two different tokenizers.
    """
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    if vocab_size is not None:
        if not 0 < vocab_size <= v:
            raise KDLabError(f"vocab_size must be in [1, {v}] (the smaller vocabulary), got {vocab_size}.")
        v = vocab_size
    return student_logits[..., :v], teacher_logits[..., :v]
