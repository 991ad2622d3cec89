"""``kd-lab-export-quantized RUN_DIR``: a ``quantize=uniform`` run's student as packed integer codes.

    kd-lab-export-quantized logs/runs/<run> --out student.q.pt       # --weights last: the last epoch's weights
    model = load_quantized("student.q.pt"); logits = model(x)

The file holds, for each quantized weight, its codes bit-packed into bytes (``bits`` per weight) and an fp32
scale and offset per bucket; every other tensor (biases, unquantized layers, BatchNorm) stays fp32; and the
student's model config, so that ``load_quantized`` rebuilds the model. The loader dequantizes the codes once,
with the function the training forward uses, so the rebuilt fp32 model gives the fake-quantized student's
outputs exactly. It runs at fp32 speed: the packing saves bytes on disk and in transfer, not compute
(scripts/bench_quantized.py measures it, and torch's int8 kernels for 8 bits).
"""

import argparse
import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from kd_lab.errors import KDLabError
from kd_lab.models.quantized import dequantize, plain_state_dict, quantize_codes, quantized_modules
from kd_lab.run.builders import build, build_model, to_dict

FORMAT = "kd-lab-quantized/1"


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes in [0, 2**bits - 1] as a uint8 stream of ceil(n * bits / 8) bytes, low bit first."""
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise KDLabError(f"codes outside [0, {2**bits - 1}] cannot be packed into {bits} bits each.")
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first ``numel`` codes of a stream written by ``pack_codes``, as int64."""
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: numel * bits]
    return (stream.view(numel, bits) << torch.arange(bits)).sum(dim=1)


def export_quantized(model: nn.Module, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The payload of a quantized ``model`` (built from ``model_cfg``, a model config with ``_target_``)."""
    found = quantized_modules(model)
    if not found:
        raise KDLabError(
            "the model has no quantized weight: export a student of a quantize=uniform run (kd-lab quantize=uniform)."
        )
    state = plain_state_dict(model)
    quantized = {}
    for name, module, q in found:
        key = f"{name}.weight" if name else "weight"
        w = module.parametrizations.weight.original.detach().cpu()
        codes, scale, offset = quantize_codes(w, q.bits, q.bucket_size)  # evaluation rounding: what tests ran
        quantized[key] = {
            "codes": pack_codes(codes, q.bits),
            "scale": scale.to(w.dtype),
            "offset": offset.to(w.dtype),
            "shape": list(w.shape),
            "bits": q.bits,
            "bucket_size": q.bucket_size,
        }
        del state[key]
    rest = {k: v.detach().cpu() for k, v in state.items()}
    return {"format": FORMAT, "model": model_cfg, "quantized": quantized, "fp32": rest}


def payload_bytes(payload: dict[str, Any]) -> int:
    """The bytes of the payload's tensors a deployment needs: codes, scales, offsets and the floating tensors
    left (the count ``kd_lab.models.quantized.size_report`` records; the file adds torch's small headers)."""
    total = sum(t.nbytes for t in payload["fp32"].values() if t.is_floating_point())
    for item in payload["quantized"].values():
        total += item["codes"].nbytes + item["scale"].nbytes + item["offset"].nbytes
    return total


def load_quantized(source: str | Path | dict[str, Any] | io.BytesIO) -> nn.Module:
    """The fp32 model a payload (or a file of one) describes, its quantized weights dequantized, in eval mode."""
    payload = source if isinstance(source, dict) else torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise KDLabError(
            f"{source if not isinstance(source, dict) else 'the payload'} is not a kd-lab quantized export "
            f"(format {FORMAT}); write one with kd-lab-export-quantized RUN_DIR."
        )
    model = build_model(OmegaConf.create(payload["model"]))
    state = dict(payload["fp32"])
    for key, item in payload["quantized"].items():
        numel = math.prod(item["shape"])
        codes = unpack_codes(item["codes"], item["bits"], numel).view(item["shape"])
        state[key] = dequantize(codes, item["scale"], item["offset"], item["bucket_size"])
    model.load_state_dict(state)
    return model.eval()


def student_of_run(run_dir: Path, weights: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """The quantized student of a finished run and its model config, with the ``weights`` checkpoint."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise KDLabError(f"{results_path} does not exist: give the directory of a finished kd-lab run.")
    cfg = OmegaConf.create(json.loads(results_path.read_text())["config"])
    if (cfg.get("quantize") or {}).get("name", "none") == "none":
        raise KDLabError(f"{run_dir} is not a quantized run (quantize=none): train one with kd-lab quantize=uniform.")
    ckpt = run_dir / "checkpoints" / f"{weights}.ckpt"
    if not ckpt.is_file():
        raise KDLabError(f"{ckpt} does not exist; the run's checkpoints are {sorted(ckpt.parent.glob('*.ckpt'))}.")
    student = build(cfg.quantize).apply(build_model(cfg.student.model), f"student={cfg.student.name}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    student.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    return student.eval(), to_dict(cfg.student.model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-lab-export-quantized", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--weights", default="best", choices=["best", "last"])
    parser.add_argument("--out", type=Path, help="default: <run_dir>/student.q.pt")
    args = parser.parse_args(argv)
    try:
        student, model_cfg = student_of_run(args.run_dir, args.weights)
    except KDLabError as e:
        raise SystemExit(f"kd-lab-export-quantized: {e}") from None
    payload = export_quantized(student, model_cfg)
    out = args.out or args.run_dir / "student.q.pt"
    torch.save(payload, out)
    fp32 = sum(4 * t.numel() for t in plain_state_dict(student).values() if t.is_floating_point())
    packed = payload_bytes(payload)
    print(f"{args.run_dir} -> {out}: {packed:,} bytes packed, {fp32:,} bytes fp32 ({fp32 / packed:.2f}x smaller)")


if __name__ == "__main__":
    main()
