"""Token divergences on a teacher's top-k support: the k stored classes plus one tail bucket.

A top-k store (kd_lab/run/view_store.py, docs/lm-topk-store.md) keeps, per token, the teacher's k largest
logits (``values``), their vocabulary ids (``index``) and one ``fill`` logit. Each of the other V - k ids
gets the fill logit, so the tail keeps the teacher's exact probability mass at temperature 1.

The divergences here compare two distributions over k + 1 buckets:

    teacher  softmax over [values / T, fill / T + log(V - k)]        (the tail as one bucket)
    student  p_S at the k ids, and its own tail mass 1 - sum_k p_S   (computed as a logsumexp, never 1 - x)

Then every kind of kd_lab/losses/divergences.py applies as is, on the buckets. With k = V there is no tail
bucket, and the result equals the dense divergence (tests/test_lm_topk_store.py). With k < V it is a lower
bound of the dense divergence against the reconstructed teacher (log-sum inequality): the student's shape
inside the tail is not seen, only its mass.

Like token_divergence, the functions return the sum over valid tokens, times T^2.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kd_lab.errors import KDLabError
from kd_lab.losses.divergences import _kl, _log_mix, check_options, work_dtype

SUPPORT_ATTR = "topk_support"  # the attribute a store sets on the dense logits it reconstructs


@dataclass(frozen=True)
class TopkSupport:
    """A teacher's top-k logits: ``values`` [..., k], ``index`` [..., k], ``fill`` [...], over ``classes``."""

    values: Tensor
    index: Tensor
    fill: Tensor
    classes: int

    def flat(self) -> "TopkSupport":
        """The same support with every leading dimension flattened into one, as [N, k] and [N]."""
        k = self.values.shape[-1]
        return TopkSupport(self.values.reshape(-1, k), self.index.reshape(-1, k), self.fill.reshape(-1), self.classes)


def attach_support(logits: Tensor, support: TopkSupport) -> Tensor:
    """Mark dense logits rebuilt from a top-k store with the support they came from.

    The step and every algorithm keep seeing plain dense logits. A loss that knows the sparse form
    (token_kd) reads it back with ``support_of``. Any op on the tensor drops the mark, so a changed tensor
    falls back to the dense loss instead of using a stale support."""
    setattr(logits, SUPPORT_ATTR, support)
    return logits


def support_of(logits: Tensor | None) -> TopkSupport | None:
    return getattr(logits, SUPPORT_ATTR, None) if logits is not None else None


def check_support(student_logits: Tensor, support: TopkSupport, mask: Tensor | None) -> None:
    """Raise KDLabError unless the support matches the [N, V] student logits."""
    n, v = student_logits.shape if student_logits.dim() == 2 else (None, None)
    k = support.values.shape[-1]
    if n is None or support.values.shape != (n, k) or support.index.shape != (n, k) or support.fill.shape != (n,):
        raise KDLabError(
            f"sparse token divergence: student logits must be [N, V] and the support [N, k], [N, k], [N]; got "
            f"{tuple(student_logits.shape)}, {tuple(support.values.shape)}, {tuple(support.index.shape)}, "
            f"{tuple(support.fill.shape)}. Flatten batch and time with .flatten(0, -2) and TopkSupport.flat()."
        )
    if support.classes != v or not 1 <= k <= v:
        raise KDLabError(
            f"sparse token divergence: the teacher's top-{k} support is over {support.classes} classes, the "
            f"student has {v}; use a store made for this vocabulary (k in [1, {v}])."
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (n,)):
        raise KDLabError(
            f"mask must be a boolean tensor of shape [N] = [{n}], got {mask.dtype} {tuple(mask.shape)}; use "
            "labels.flatten() != -100."
        )


def bucket_log_probs(student_logits: Tensor, support: TopkSupport, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p_S, log p_T) over the k + 1 buckets ([N, k + 1]; [N, k] when k = V), in work_dtype."""
    dtype = work_dtype(student_logits, support.values.float(), support.fill.float())
    k, v = support.values.shape[-1], support.classes
    index = support.index.long()
    z = student_logits.to(dtype) / temperature
    log_z = z.logsumexp(-1, keepdim=True)
    log_s = z.gather(-1, index) - log_z
    t = support.values.to(dtype) / temperature
    if k < v:
        # the student's tail mass as a logsumexp over the ids outside the top k: exact, no 1 - sum cancellation
        tail_s = z.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True) - log_z
        log_s = torch.cat([log_s, tail_s], -1)
        tail_t = support.fill.to(dtype).unsqueeze(-1) / temperature + math.log(v - k)
        t = torch.cat([t, tail_t], -1)
    return log_s, t.log_softmax(-1)


def bucket_divergence(log_s: Tensor, log_t: Tensor, kind: str, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """[N] divergences between two distributions given by log-probabilities (the kinds of divergences.py)."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0) or (kind == "skew_kl" and alpha == 0.0):
        return _kl(log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0) or (kind == "skew_rkl" and alpha == 0.0):
        return _kl(log_s, log_t)
    if kind == "jsd":
        log_m = _log_mix(log_t, log_s, beta)
        return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    if kind == "tvd":
        return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    if kind == "skew_kl":
        return _kl(log_t, _log_mix(log_t, log_s, alpha))
    if kind == "skew_rkl":
        return _kl(log_s, _log_mix(log_s, log_t, alpha))
    raise KDLabError(f"unknown token divergence kind {kind!r}; see kd_lab.losses.divergences.KINDS.")


def sparse_token_divergence(
    student_logits: Tensor,
    support: TopkSupport,
    kind: str,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Sum over the tokens where ``mask`` is true of T^2 * D(p_T, p_S) on the top-k support.

    ``student_logits`` [N, V]; ``support`` flat ([N, k], [N, k], [N]). Masked rows are dropped first, so
    they contribute exactly 0 (their stored marker is never read)."""
    check_options(kind, temperature, beta, alpha)
    check_support(student_logits, support, mask)
    if mask is not None:
        student_logits = student_logits[mask]
        support = TopkSupport(support.values[mask], support.index[mask], support.fill[mask], support.classes)
    log_s, log_t = bucket_log_probs(student_logits, support, temperature)
    return bucket_divergence(log_s, log_t, kind, beta, alpha).sum() * temperature**2
