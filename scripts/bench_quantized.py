"""Inference speed of the exported quantized student against the fp32 model, from one run of this script.

    OMP_NUM_THREADS=1 python scripts/bench_quantized.py                       # mlp_medium's shape, bits 2 4 8
    OMP_NUM_THREADS=1 python scripts/bench_quantized.py --hidden 1024 1024 --batch 256

For each bit width it prints the packed size, the forward time of the fp32 model and of the exported model
(``load_quantized``), and their ratio. The exported model dequantizes its codes once, at load: it is an fp32
model, so it runs at fp32 speed (a ratio near 1.00); the packing saves bytes, not time. For 8 bits it also
times torch's int8 dynamic quantization of the exported model's Linear layers (``torch.ao``), which runs
real integer matmuls; it re-quantizes per tensor, so its outputs differ a little (the max difference is
printed). Timings depend on the machine and its load: this script is not a test.
"""

import argparse
import io
import statistics
import time
import warnings

import torch
from torch import nn

from kd_lab.models import MLP
from kd_lab.models.quantized import UniformQuantization, size_report
from kd_lab.tools.export_quantized import export_quantized, load_quantized


def seconds_per_forward(model: nn.Module, x: torch.Tensor, repeats: int, number: int) -> float:
    """The median over ``repeats`` of the mean time of ``number`` forwards, after a warm-up."""
    with torch.inference_mode():
        for _ in range(number):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(number):
                model(x)
            times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256], help="default: mlp_medium")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--bucket-size", type=int, default=256)
    parser.add_argument("--keep-first-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # untrained weights: the speed does not depend on their values
    spec = {"_target_": "kd_lab.models.MLP", "input_shape": [1, 40], "num_classes": 10, "hidden": args.hidden}
    x = torch.randn(args.batch, 1, 40)
    fp32 = MLP([1, 40], 10, hidden=args.hidden).eval()
    t_fp32 = seconds_per_forward(fp32, x, args.repeats, args.number)
    threads = torch.get_num_threads()
    print(f"MLP hidden={args.hidden}, batch {args.batch}, {threads} thread(s), torch {torch.__version__}")
    print(f"fp32: {t_fp32 * 1e6:.1f} us per forward")
    print("bits | packed bytes | fp32 bytes | exported us | exported / fp32 | int8 us | int8 / fp32 | int8 max diff")
    for bits in args.bits:
        student = MLP([1, 40], 10, hidden=args.hidden)
        student.load_state_dict(fp32.state_dict())
        quantization = UniformQuantization(bits, args.bucket_size, keep_first_last=args.keep_first_last)
        quantization.apply(student)
        buffer = io.BytesIO()
        torch.save(export_quantized(student.eval(), spec), buffer)
        buffer.seek(0)
        exported = load_quantized(buffer)
        size = size_report(student)
        t_exp = seconds_per_forward(exported, x, args.repeats, args.number)
        int8 = "-"
        if bits == 8:
            with warnings.catch_warnings():  # torch.ao.quantization is deprecated in torch 2.13, still shipped
                warnings.simplefilter("ignore")
                dynamic = torch.ao.quantization.quantize_dynamic(exported, {nn.Linear}, dtype=torch.qint8)
                t_int8 = seconds_per_forward(dynamic, x, args.repeats, args.number)
                with torch.inference_mode():
                    diff = (dynamic(x) - exported(x)).abs().max().item()
            int8 = f"{t_int8 * 1e6:.1f} | {t_int8 / t_fp32:.2f} | {diff:.2e}"
        else:
            int8 = "- | - | -"
        print(
            f"{bits} | {size['packed_bytes']:,} | {size['fp32_bytes']:,} | {t_exp * 1e6:.1f} | "
            f"{t_exp / t_fp32:.2f} | {int8}"
        )


if __name__ == "__main__":
    main()
