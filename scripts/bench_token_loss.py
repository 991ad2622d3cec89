"""Token-level distillation loss: plain autograd against the chunked Function, time and peak memory.

    python scripts/bench_token_loss.py                      # CPU, V=32000, N=8192, float32
    python scripts/bench_token_loss.py --device cuda --dtype bf16 --kind jsd

Time: median over --reps of one forward + backward (after one untimed warm-up rep).
Peak memory is the memory the loss needs on top of its inputs (student and teacher logits), including the
student's .grad that backward writes:
- cuda: torch.cuda.max_memory_allocated() minus memory_allocated() before the loss, reset per variant.
- cpu: each variant runs in its own subprocess, and the number is the process's peak RSS after the reps
  (getrusage ru_maxrss) minus its RSS just before the first rep (/proc/self/statm). It is coarse: pages,
  not tensors, and it counts whatever the allocator keeps. --in-process runs both variants in this process
  (fast, for tests); the CPU memory column is then n/a, since one high-water mark cannot be split in two.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kd_lab.losses import KINDS, token_divergence

VARIANTS = ("naive", "chunked")
MIB = 2**20


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000, help="V")
    p.add_argument("--tokens", type=int, default=8192, help="N = batch * sequence length")
    p.add_argument("--kind", choices=KINDS, default="forward_kl")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (CPU memory column: n/a)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_now() -> int:
    """Resident bytes of this process now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(variant: str, args: argparse.Namespace, cpu_memory: bool) -> dict:
    """Time and peak extra memory of one variant; memory None where it cannot be told apart."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(args.tokens, args.vocab, device=device, dtype=dtype, generator=gen).requires_grad_()
    teacher = torch.randn(args.tokens, args.vocab, device=device, dtype=dtype, generator=gen)
    chunk = args.chunk_size if variant == "chunked" else None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_now()
    times = []
    for rep in range(args.reps + 1):
        student.grad = None
        start = time.perf_counter()
        token_divergence(student, teacher, args.kind, chunk_size=chunk).backward()
        if cuda:
            torch.cuda.synchronize()
        if rep:  # rep 0 warms up
            times.append(time.perf_counter() - start)
    peak = None
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    elif cpu_memory:
        peak = _rss_peak() - before
    return {"variant": variant, "time_s": statistics.median(times), "peak_mib": None if peak is None else peak / MIB}


def _in_subprocess(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], args: argparse.Namespace) -> str:
    n, c = rows
    mem = "peak over inputs (cuda allocator)" if args.device == "cuda" else "peak RSS over inputs"
    lines = [
        f"token loss {args.kind}: N={args.tokens} V={args.vocab} {args.dtype} on {args.device}, "
        f"chunk_size={args.chunk_size}, median of {args.reps} reps of forward+backward",
        f"{'variant':<16}{'time_s':>10}{'peak_MiB':>12}   ({mem})",
    ]
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['variant']:<16}{r['time_s']:>10.3f}{peak:>12}")
    mem_ratio = "n/a" if n["peak_mib"] is None or not n["peak_mib"] else f"{c['peak_mib'] / n['peak_mib']:.2f}"
    lines.append(f"{'chunked/naive':<16}{c['time_s'] / n['time_s']:>10.2f}{mem_ratio:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.child:
        print(json.dumps(measure(args.child, args, cpu_memory=True)))
        return []
    if args.device == "cuda" or args.in_process:
        rows = [measure(v, args, cpu_memory=False) for v in VARIANTS]
    else:
        rows = [_in_subprocess(v, argv) for v in VARIANTS]
    print(report(rows, args))
    return rows


if __name__ == "__main__":
    main()
