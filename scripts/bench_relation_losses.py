"""RKD loss: the direct (b, b, D) form, the Gram form under autograd, and the blocked Gram form kd-lab uses.

    python scripts/bench_relation_losses.py                   # CPU, 1 thread, b=128, D=256 and D=64
    python scripts/bench_relation_losses.py --device cuda --dims 256 2048

The loss is the RKD term at its defaults: 25 * distance loss + 50 * angle loss, student embedding (b, D) with
a gradient, teacher embedding (b, D) detached. Three forms of the angle term:
  direct         (b, b, D) unit differences, then a (b, b, b) batched product: O(b^3 D).
  gram_autograd  the cosines from the pairwise squared distances (law of cosines), whole (b, b, b) tensors,
                 autograd's backward.
  gram           kd-lab's: the same cosines, a block of rows at a time, a hand-written backward.
Time: median over --reps of one forward + backward; the forms alternate rep by rep, so a load change on a
shared machine hits all alike. One untimed warm-up first. It also prints how far the losses and gradients of
the two Gram forms are from the direct form's. Nothing here is asserted.
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kd_lab.algorithms.rkd import rkd_angle_loss, rkd_angle_potentials, rkd_distance_loss

DISTANCE_WEIGHT, ANGLE_WEIGHT = 25.0, 50.0  # RKD's defaults (conf/algorithm/rkd.yaml)


# -- the direct form, as kd_lab/algorithms/rkd.py computed it before the Gram form ---------------------------
def direct_distance_potentials(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    d = d * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))
    b = len(e)
    return d / (d.sum() / (b * (b - 1)))


def direct_angle_potentials(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (b, b, D)
    return diff @ diff.transpose(1, 2)  # (b, b, b), O(b^3 D)


def direct_rkd_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return DISTANCE_WEIGHT * F.smooth_l1_loss(
        direct_distance_potentials(s), direct_distance_potentials(t)
    ) + ANGLE_WEIGHT * F.smooth_l1_loss(direct_angle_potentials(s), direct_angle_potentials(t))


def gram_autograd_rkd_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return DISTANCE_WEIGHT * rkd_distance_loss(s, t) + ANGLE_WEIGHT * F.smooth_l1_loss(
        rkd_angle_potentials(s), rkd_angle_potentials(t)
    )


def gram_rkd_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return DISTANCE_WEIGHT * rkd_distance_loss(s, t) + ANGLE_WEIGHT * rkd_angle_loss(s, t)


VARIANTS = {"direct": direct_rkd_loss, "gram_autograd": gram_autograd_rkd_loss, "gram": gram_rkd_loss}
GRAM_FORMS = ("gram_autograd", "gram")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="b")
    p.add_argument("--dims", type=int, nargs="+", default=[256, 64], help="embedding widths D to time")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args(argv)


def _once(loss_fn, s: torch.Tensor, t: torch.Tensor, device: torch.device) -> float:
    s.grad = None
    start = time.perf_counter()
    loss_fn(s, t.detach()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(dim: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(dim)
    # ReLU-like embeddings: non-negative, with a common offset, as a network's penultimate features are
    s = (torch.randn(args.batch, dim, generator=gen) + 0.5).relu().to(device).requires_grad_()
    t = (torch.randn(args.batch, dim, generator=gen) + 0.5).relu().to(device)
    grads, losses = {}, {}
    for name, fn in VARIANTS.items():
        s.grad = None
        loss = fn(s, t)
        loss.backward()  # the warm-up, and the values compared below
        losses[name], grads[name] = loss.item(), s.grad.clone()
    times = {name: [] for name in VARIANTS}
    for _ in range(args.reps):
        for name, fn in VARIANTS.items():
            times[name].append(_once(fn, s, t, device))
    row = {"dim": dim, **{f"{name}_s": statistics.median(ts) for name, ts in times.items()}}
    for name in GRAM_FORMS:
        row[f"{name}_loss_diff"] = abs(losses[name] - losses["direct"])
        row[f"{name}_grad_diff"] = (grads[name] - grads["direct"]).abs().max().item()
    row["grad_max"] = grads["direct"].abs().max().item()
    return row


def report(rows: list[dict], args: argparse.Namespace) -> str:
    threads = f", {torch.get_num_threads()} thread(s)" if args.device == "cpu" else ""
    lines = [
        f"RKD loss (25 distance + 50 angle), b={args.batch}, float32 on {args.device}{threads}, "
        f"median of {args.reps} reps of forward+backward",
        f"{'D':>6}{'direct_ms':>11}{'gram_autograd_ms':>18}{'gram_ms':>9}{'direct/gram':>13}"
        f"{'gram_autograd/gram':>20}{'max|dgrad| autograd':>21}{'max|dgrad| gram':>17}{'max|grad|':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r['dim']:>6}{r['direct_s'] * 1e3:>11.1f}{r['gram_autograd_s'] * 1e3:>18.1f}{r['gram_s'] * 1e3:>9.1f}"
            f"{r['direct_s'] / r['gram_s']:>13.2f}{r['gram_autograd_s'] / r['gram_s']:>20.2f}"
            f"{r['gram_autograd_grad_diff']:>21.1e}{r['gram_grad_diff']:>17.1e}{r['grad_max']:>11.1e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        rows = [measure(dim, args) for dim in args.dims]
        print(report(rows, args))
    finally:
        torch.set_num_threads(threads)  # as it was: main() may run inside another process (a test)
    return rows


if __name__ == "__main__":
    main()
