"""Token divergences in bounded memory: the gradient is computed chunk by chunk in the forward pass.

Plain autograd on [N, V] logits keeps several float32 [N, V] tensors alive until backward (both
log-softmaxes, the probabilities, their differences). At N = 8192 and V = 32000 each one is 1 GiB.
Here the N tokens are walked in chunks of ``chunk_size`` rows. Each chunk is upcast to float32, its loss and
its gradient w.r.t. the student rows are computed at once, and only the gradient is kept, in the student's
dtype. Backward just scales that saved gradient by grad_output. The same idea as the chunked losses of
Liger-Kernel (Hsu et al. 2024), in plain PyTorch.

What stays alive: one [N, V] gradient in the student's dtype, which backward has to produce anyway, and
the float32 temporaries of one chunk. The price: the gradient is computed even when backward never runs,
and backward makes one more [N, V] tensor when it scales the saved gradient.
Teacher logits are constants here; use the plain path (chunk_size=None) to train through the teacher.
"""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kd_lab.errors import KDLabError
from kd_lab.losses.divergences import check_inputs, check_options, per_token_divergence, work_dtype


def _chunks(n_rows: int, rows: Tensor | None, chunk_size: int):
    """(slice or index tensor) per chunk: slices are views, index tensors select the valid rows."""
    for start in range(0, n_rows, chunk_size):
        yield slice(start, start + chunk_size) if rows is None else rows[start : start + chunk_size]


def _take(x: Tensor, where) -> Tensor:
    return x[where] if isinstance(where, slice) else x.index_select(0, where)


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, rows, kind, temperature, beta, alpha, chunk_size):
        dtype = work_dtype(student, teacher)
        n_rows = student.shape[0] if rows is None else rows.numel()
        # masked rows keep a zero gradient; without a mask every row is written below
        grad = torch.empty_like(student) if rows is None else torch.zeros_like(student)
        total = torch.zeros((), dtype=dtype, device=student.device)
        for where in _chunks(n_rows, rows, chunk_size):
            with torch.enable_grad():
                s = _take(student, where).detach().to(dtype).requires_grad_()
                loss = per_token_divergence(s, _take(teacher, where), kind, temperature, beta, alpha).sum()
                (g,) = torch.autograd.grad(loss, s)
            total += loss.detach()
            if rows is None:
                grad[where] = g
            else:
                grad.index_copy_(0, where, g.to(grad.dtype))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # out of place: an in-place scale would corrupt a second backward with retain_graph=True
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None, None


def chunked_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """token_divergence (same arguments, same sum over valid tokens) in chunks of ``chunk_size`` rows.

    Raises KDLabError when the teacher logits require grad: they are treated as constants.
    """
    check_options(kind, temperature, beta, alpha)
    check_inputs(student_logits, teacher_logits, mask)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise KDLabError(f"chunk_size must be a positive int (rows per chunk, e.g. 1024), got {chunk_size!r}.")
    if teacher_logits.requires_grad:
        raise KDLabError(
            "the chunked token loss treats teacher logits as constants, but they require grad; pass "
            "teacher_logits.detach(), or chunk_size=None to backpropagate into the teacher."
        )
    # one host sync for the whole call, not one per chunk
    rows = None if mask is None else mask.nonzero().squeeze(1)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _ChunkedDivergence.apply(
            student_logits, teacher_logits, rows, kind, temperature, beta, alpha, chunk_size
        )
    # nothing to differentiate: the chunks' sums alone, without gradients
    n_rows = student_logits.shape[0] if rows is None else rows.numel()
    total = torch.zeros((), dtype=work_dtype(student_logits, teacher_logits), device=student_logits.device)
    with torch.no_grad():
        for where in _chunks(n_rows, rows, chunk_size):
            s, t = _take(student_logits, where), _take(teacher_logits, where)
            total += per_token_divergence(s, t, kind, temperature, beta, alpha).sum()
    return total
