"""Relational Knowledge Distillation (Park, Kim, Lu, Cho, CVPR 2019), https://arxiv.org/abs/1904.05068

The student matches the geometry of the teacher's embedding space, not the embeddings themselves, so the two
widths may differ. On the penultimate features e (flattened to (b, D)) of a batch:
  * distance: psi_D(i, j) = ||e_i - e_j|| / mu, mu the mean distance over the pairs i != j;
    loss_D = mean over all (i, j) of smooth_l1(psi_D^s, psi_D^t);
  * angle: psi_A(i, j, k) = <normalize(e_j - e_i), normalize(e_k - e_i)>, the cosine of the angle at e_i;
    loss_A = mean over all (i, j, k) of smooth_l1(psi_A^s, psi_A^t).
    loss = ce_weight * CE + rkd_weight * (distance_weight * loss_D + angle_weight * loss_A)
Recommended: distance_weight 25, angle_weight 50 (the paper's lambda_D, lambda_A); rkd_weight 1 and ce 1 with no
Hinton term (RepDistiller / CRD benchmark, ``-a 0 -b 1``), on the embedding.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lab.algorithms.base import StepOutputs
from kd_lab.algorithms.taps import OneTapPair
from kd_lab.core.bounds import NonNegative
from kd_lab.core.recorder import TapSpec

NORM_EPS = 1e-12  # the angle's norms are clamped here, as F.normalize clamps them


def _squared_distances(e: Tensor) -> tuple[Tensor, Tensor]:
    """(b, D) -> (b, b) squared distances ||e_i - e_j||^2 in float64, and a mask of the pairs that are apart.

    They come from the Gram matrix G = x x^T of the centered embeddings x = e - mean(e):
    ||e_i - e_j||^2 = G_ii + G_jj - 2 G_ij, O(b^2 D) and no (b, b, D) tensor.
    The subtraction cancels for close pairs, so the product is in float64: with float32, a pair 1e-4 apart
    (per coordinate, features ~1) got angle cosines of 3e8. Float64 costs ~1 ms at b=128, D=256 on one CPU
    thread, and autocast and TF32 leave it alone.
    A pair is "apart" unless its squared distance is within the Gram's rounding error, 2 D eps (G_ii + G_jj);
    below it a pair counts as coincident, as identical rows do in the direct form (the rounding left ~1e-14
    for identical rows, which gave cosines of any size).
    Centering changes no difference vector. It keeps a common offset (ReLU features share a positive mean)
    out of G_ii, so the floor stays at the batch's spread: uncentered, at an offset of 1000 the floor passed a
    pair 1e-4 apart."""
    x = e.double()
    x = x - x.mean(0)
    g = x @ x.t()
    n = g.diagonal()
    total = n[:, None] + n[None, :]
    sq = total - 2 * g
    floor = (2 * x.shape[1] * torch.finfo(torch.float64).eps) * total
    apart = (sq > floor) & ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return sq, apart


def _work_dtype(e: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (the cosines need its precision), else the input's dtype."""
    return torch.promote_types(e.dtype, torch.float32)


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(b, D) -> (b, b) Euclidean distances, exactly 0 on the diagonal (squared distances are clamped at
    ``eps`` before the square root, so the gradient stays finite for coincident points)."""
    sq, _ = _squared_distances(e)
    d = sq.to(_work_dtype(e)).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=e.device))


def rkd_distance_potentials(e: Tensor) -> Tensor:
    """Pairwise distances normalized by their mean over the pairs i != j."""
    d = pairwise_distances(e)
    b = len(e)
    return d / (d.sum() / (b * (b - 1)))


def _angle_inputs(e: Tensor) -> tuple[Tensor, Tensor]:
    """(b, b) squared distances S in the working dtype, and 1 / ||e_j - e_i|| * sqrt(1/2) for the pairs apart
    (0 for the coincident ones; the sqrt(1/2) takes the 1/2 of the law of cosines below)."""
    sq64, apart = _squared_distances(e)
    sq = sq64.to(_work_dtype(e))
    return sq, torch.where(apart, sq.clamp(min=NORM_EPS**2).rsqrt(), 0.0) * 0.5**0.5


def _angle_rows(sq: Tensor, inv: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
    """Rows ``rows`` of the angle tensor: (S_ij + S_ik - S_jk) for i in rows, and the norms' product."""
    c = sq[rows, :, None] + sq[rows, None, :]
    c.sub_(sq)  # [i, j, k] = S_ij + S_ik - S_jk (broadcast over i)
    return c, inv[rows, :, None] * inv[rows, None, :]


def rkd_angle_potentials(e: Tensor) -> Tensor:
    """(b, b, b): [i, j, k] = cosine of the angle at e_i of the triangle (e_i, e_j, e_k); 0 when j or k is i.

    By the law of cosines, with S_ij = ||e_i - e_j||^2 (from the Gram matrix, see ``_squared_distances``):
        <e_j - e_i, e_k - e_i> = (S_ij + S_ik - S_jk) / 2,   ||e_j - e_i|| = sqrt(S_ij).
    So the tensor costs O(b^3) elementwise work and no (b, b, D) tensor or (b, b, b) x D product: the direct
    form (normalize the differences, then bmm) costs O(b^3 D).
    Same rules as the direct form: each norm is clamped at 1e-12 (F.normalize's eps); a zero difference
    (j == i, or a sample equal to e_i) gives a zero unit vector, hence 0 for every entry that holds it;
    [i, j, j] = 1 for a distinct pair. A coincident pair contributes no gradient.
    Precision: the sum S_ij + S_ik - S_jk is in the working dtype and cancels when e_j is close to e_i, so in
    float32 a cosine is off by ~1e-7 ||e_k - e_i|| / ||e_j - e_i||: 6e-4 for a pair 1e-4 apart per coordinate,
    6e-2 at 1e-6 (measured, features ~1). The direct form was exact there; such a cosine also moves with the
    last bits of the network's own float32 output."""
    c, norms = _angle_rows(*_angle_inputs(e), slice(None))
    return c * norms


class _AngleLoss(torch.autograd.Function):
    """mean over (i, j, k) of smooth_l1(A_s - A_t), a block of rows i at a time, with a hand-written backward.

    Autograd would keep several (b, b, b) tensors of the student's side for the backward: 8 MiB each at
    b = 128 in float32, far past the CPU's caches. Here a block of ``ROWS`` rows (b^2 ROWS entries) is built,
    used and dropped, in the forward and again in the backward, and nothing of size b^3 is kept.
    With d = A_s - A_t and c = S_ij + S_ik - S_jk, A = c * w, w = inv_ij inv_ik:
        dL/dA = clamp(d, -1, 1) / b^3 (smooth L1, beta 1),  dL/dc = dL/dA * w,  dL/dw = dL/dA * c,
    and c and w take each gradient back to S and inv along the indices they read."""

    ROWS = 8

    @staticmethod
    def forward(ctx, sq_s: Tensor, inv_s: Tensor, sq_t: Tensor, inv_t: Tensor) -> Tensor:
        ctx.save_for_backward(sq_s, inv_s, sq_t, inv_t)
        b = len(sq_s)
        total = sq_s.new_zeros(())
        for i in range(0, b, _AngleLoss.ROWS):
            rows = slice(i, i + _AngleLoss.ROWS)
            c_s, w_s = _angle_rows(sq_s, inv_s, rows)
            c_t, w_t = _angle_rows(sq_t, inv_t, rows)
            total += F.smooth_l1_loss(c_s.mul_(w_s), c_t.mul_(w_t).to(c_s.dtype), reduction="sum")
        return total / b**3

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        sq_s, inv_s, sq_t, inv_t = ctx.saved_tensors
        b = len(sq_s)
        sides = [(sq_s, inv_s, 1.0), (sq_t, inv_t, -1.0)]  # dL/dA_t = -dL/dA_s
        need = ctx.needs_input_grad
        wanted = (need[0] or need[1], need[2] or need[3])
        grads = [
            (torch.zeros_like(sq), torch.zeros_like(inv)) if want else None
            for (sq, inv, _), want in zip(sides, wanted, strict=True)
        ]
        scale = grad / b**3
        for i in range(0, b, _AngleLoss.ROWS):
            rows = slice(i, i + _AngleLoss.ROWS)
            (c_s, w_s), (c_t, w_t) = _angle_rows(sq_s, inv_s, rows), _angle_rows(sq_t, inv_t, rows)
            g = (c_s * w_s).sub_((c_t * w_t).to(c_s.dtype)).clamp_(-1, 1).mul_(scale)  # dL/dA_s
            for (_, inv, sign), (c, w), out in zip(sides, ((c_s, w_s), (c_t, w_t)), grads, strict=True):
                if out is not None:
                    _add_block_gradient(out, g.to(c.dtype) * sign, c, w, inv, rows)
        d_s, d_t = (side or (None, None) for side in grads)
        return d_s[0], d_s[1], d_t[0], d_t[1]


def _add_block_gradient(out: tuple[Tensor, Tensor], g: Tensor, c: Tensor, w: Tensor, inv: Tensor, rows: slice):
    """Add dL/dS and dL/dinv of one block of rows, given g = dL/dA there (A = c * w)."""
    d_sq, d_inv = out
    h = g * w  # dL/dc: S_ij, S_ik and -S_jk each get it
    d_sq[rows] += h.sum(2) + h.sum(1)
    d_sq -= h.sum(0)
    m = g * c  # dL/dw: inv_ij gets it times inv_ik, inv_ik gets it times inv_ij
    d_inv[rows] += (m * inv[rows, None, :]).sum(2) + (m * inv[rows, :, None]).sum(1)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    return F.smooth_l1_loss(rkd_distance_potentials(student), rkd_distance_potentials(teacher))


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """smooth_l1 of the two angle tensors (``rkd_angle_potentials``), mean over (i, j, k), without building
    them whole (``_AngleLoss``). Forward + backward at b=128 on one CPU thread: 1.5-2.2x less time than
    autograd on the whole tensors, D=64-256 (scripts/bench_relation_losses.py, docs/performance.md)."""
    return _AngleLoss.apply(*_angle_inputs(student), *_angle_inputs(teacher))


class RKD(OneTapPair):
    name = "rkd"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        rkd_weight: NonNegative = 1.0,
        distance_weight: NonNegative = 25.0,
        angle_weight: NonNegative = 50.0,
        student_tap: TapSpec = "embedding",
        teacher_tap: TapSpec = "embedding",
    ):
        super().__init__(ce_weight, student_tap, teacher_tap)
        self.rkd_weight, self.distance_weight, self.angle_weight = rkd_weight, distance_weight, angle_weight

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        e_s, e_t = self.pair(out)
        if self.distance_weight:
            terms["rkd_distance"] = self.rkd_weight * self.distance_weight * rkd_distance_loss(e_s, e_t)
        if self.angle_weight:
            terms["rkd_angle"] = self.rkd_weight * self.angle_weight * rkd_angle_loss(e_s, e_t)
        return terms
