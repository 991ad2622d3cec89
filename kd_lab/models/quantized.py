"""Quantized students: weights quantized in the forward pass, trained through a straight-through gradient.

Polino, Pascanu, Alistarh, ICLR 2018, "Model compression via distillation and quantization"
(arXiv:1802.05668; reference code antspy/quantized_distillation). A weight tensor is flattened and cut into
buckets of ``bucket_size`` values. Each bucket is scaled to [0, 1] by its own min and max, rounded to one of
``2**bits`` evenly spaced levels, and scaled back:

    code = round((w - min) / (max - min) * (2**bits - 1))          (stochastic: floor(x + u), u ~ U[0, 1))
    Q(w) = code * scale + min,   scale = (max - min) / (2**bits - 1)

The forward pass uses Q(w). The backward pass hands the gradient with respect to Q(w) to the full-precision
w unchanged (straight-through): rounding has a zero derivative almost everywhere, so w would never move.

The config group ``quantize`` (``conf/quantize``) picks a ``Quantization``; the run's assembly applies it to
the student (``kd_lab.run.assemble.build_run``). Any algorithm then trains the quantized student:
``quantize=uniform algorithm=kd`` is quantized distillation, ``quantize=uniform algorithm=none`` its baseline.
Validation and test run the quantized student in eval mode (deterministic rounding): the model you deploy.
``kd_lab.tools.export_quantized`` packs it into integer codes and rebuilds it.
"""

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kd_lab.core.bounds import Bound, check_value
from kd_lab.errors import KDLabError

# 2**bits levels are packed into bytes: one byte holds at most 8 bits, and 1 bit is the fewest (2 levels)
Bits = Annotated[int, Bound("an integer in [1, 8] (2**bits levels, packed into bytes)", lambda v: 1 <= v <= 8, "4")]
# a bucket holds at least one weight; 256 is the reference code's size
BucketSize = Annotated[int, Bound(">= 1", lambda v: v >= 1, "256")]
# the module types whose ``weight`` can be quantized, by the names the config uses
LAYER_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}
LayerType = Literal["Linear", "Conv1d", "Conv2d"]  # the schema checks each name of quantize.layers against it
# a bucket whose values are all equal has max - min = 0; the reference code then scales by 1 (codes all 0)
FLAT_SPAN = 1e-10


def bucketed(w: Tensor, bucket_size: int) -> Tensor:
    """``w`` flattened into rows of ``bucket_size``; the last row is padded with its last value, which changes
    neither its min nor its max."""
    flat = w.reshape(-1)
    pad = -flat.numel() % bucket_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, bucket_size)


def quantize_codes(
    w: Tensor, bits: int, bucket_size: int, stochastic: bool = False, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes, scale, offset)`` of ``w``: integer codes in [0, 2**bits - 1] as a float tensor of w's shape,
    and one scale and offset per bucket (``Q(w) = codes * scale + offset``, bucket by bucket)."""
    levels = 2**bits - 1
    rows = bucketed(w.detach(), bucket_size)
    low = rows.min(dim=1).values
    span = rows.max(dim=1).values - low
    span = torch.where(span < FLAT_SPAN, torch.ones_like(span), span)
    x = (rows - low[:, None]) / span[:, None] * levels  # in [0, levels]
    if stochastic:  # up with probability frac(x): the expected code is x itself (unbiased)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        codes = torch.floor(x + u)
    else:
        codes = torch.round(x)  # ties to even, as torch.round does
    codes = codes.clamp_(0, levels)
    codes = codes.reshape(-1)[: w.numel()].view(w.shape)
    return codes, span / levels, low


def dequantize(codes: Tensor, scale: Tensor, offset: Tensor, bucket_size: int) -> Tensor:
    """``codes * scale + offset`` bucket by bucket, in the dtype of ``scale``, with ``codes``' shape. The export's
    loader calls this same function, so the loaded weights equal the fake-quantized ones bit for bit."""
    rows = bucketed(codes.to(scale.dtype), bucket_size)
    return (rows * scale[:, None] + offset[:, None]).reshape(-1)[: codes.numel()].view(codes.shape)


def fake_quantize(w: Tensor, bits: int, bucket_size: int, stochastic: bool = False) -> Tensor:
    """Q(w), without a gradient of its own."""
    codes, scale, offset = quantize_codes(w, bits, bucket_size, stochastic)
    return dequantize(codes, scale, offset, bucket_size)


class StraightThrough(torch.autograd.Function):
    """Forward: Q(w). Backward: the gradient with respect to Q(w), handed to w unchanged."""

    @staticmethod
    def forward(ctx, w: Tensor, bits: int, bucket_size: int, stochastic: bool) -> Tensor:
        return fake_quantize(w, bits, bucket_size, stochastic)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


class UniformQuantizer(nn.Module):
    """The parametrization of one weight (``torch.nn.utils.parametrize``): the module reads Q(w) wherever it
    reads ``weight``; the full-precision w is ``parametrizations.weight.original``, the one the optimizer steps.
    Stochastic rounding applies in training mode only: evaluation rounds to the nearest level."""

    def __init__(self, bits: int, bucket_size: int, stochastic: bool = False):
        super().__init__()
        self.bits, self.bucket_size, self.stochastic = bits, bucket_size, stochastic

    def forward(self, w: Tensor) -> Tensor:
        return StraightThrough.apply(w, self.bits, self.bucket_size, self.stochastic and self.training)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bucket_size={self.bucket_size}, stochastic={self.stochastic}"


class Quantization:
    """What the ``quantize`` group builds: ``apply(model)`` quantizes a model in place."""

    name = "none"

    def apply(self, model: nn.Module, model_name: str = "the student") -> nn.Module:
        return model


class NoQuantization(Quantization):
    """``quantize=none``: the full-precision student (the default)."""


class UniformQuantization(Quantization):
    """``quantize=uniform``: uniform ``bits``-bit weights with per-bucket min/max scaling (Polino et al. 2018).

    ``layers``: the module types whose weights are quantized (Linear, Conv1d, Conv2d). Biases and BatchNorm stay
    fp32. ``keep_first_last``: the first and the last of those modules, in registration order, stay fp32, as in
    the reference code's experiments (``quantize_first_and_last_layer=False``)."""

    name = "uniform"

    def __init__(
        self,
        bits: Bits = 4,
        bucket_size: BucketSize = 256,
        stochastic: bool = False,
        layers: Sequence[LayerType] = ("Linear", "Conv1d", "Conv2d"),
        keep_first_last: bool = True,
    ):
        for key, value, rule in (("bits", bits, Bits), ("bucket_size", bucket_size, BucketSize)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise KDLabError(f"quantize.{key}={value!r} must be an integer; set e.g. quantize.{key}=4.")
            check_value("quantize", key, value, rule.__metadata__[0])
        unknown = [name for name in layers if name not in LAYER_TYPES]
        if unknown or not layers:
            raise KDLabError(
                f"quantize.layers={list(layers)} names {unknown or 'no'} layer type this quantizer knows; "
                f"list some of {list(LAYER_TYPES)}, e.g. quantize.layers=[Linear,Conv1d]."
            )
        self.bits, self.bucket_size, self.stochastic = bits, bucket_size, stochastic
        self.layers = tuple(layers)
        self.keep_first_last = keep_first_last

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of the modules whose weight this quantizes."""
        types = tuple(LAYER_TYPES[name] for name in self.layers)
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, types) and m.weight is not None]
        return found[1:-1] if self.keep_first_last else found

    def apply(self, model: nn.Module, model_name: str = "the student") -> nn.Module:
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            raise KDLabError(
                f"{model_name} already has parametrized weights; quantize=uniform quantizes a plain model once: "
                "build the model again, or set quantize=none."
            )
        targets = self.targets(model)
        if not targets:
            kept = " (the first and the last stay fp32: quantize.keep_first_last=true)" if self.keep_first_last else ""
            fix = "quantize.keep_first_last=false, " if self.keep_first_last else ""
            raise KDLabError(
                f"quantize=uniform finds no layer of types {list(self.layers)} to quantize in {model_name}"
                f"{kept}; set {fix}quantize.layers to the types it has, a larger student, or quantize=none."
            )
        for _, module in targets:
            parametrize.register_parametrization(
                module, "weight", UniformQuantizer(self.bits, self.bucket_size, self.stochastic)
            )
        return model


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module, UniformQuantizer]]:
    """``(path, module, quantizer)`` of every quantized weight of ``model``."""
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, UniformQuantizer):
                    found.append((name, module, p))
    return found


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of ``model`` as the same model without quantizers has it (``weight``, not
    ``parametrizations.weight.original``); quantized weights stay full precision here."""
    suffix = "parametrizations.weight.original"
    return {(k[: -len(suffix)] + "weight" if k.endswith(suffix) else k): v for k, v in model.state_dict().items()}


def packed_weight_bytes(numel: int, bits: int, bucket_size: int) -> int:
    """Bytes of one packed weight: its codes, ``bits`` each, bit-packed into bytes, and an fp32 scale and
    offset per bucket."""
    return math.ceil(numel * bits / 8) + 2 * 4 * math.ceil(numel / bucket_size)


def size_report(model: nn.Module) -> dict[str, Any]:
    """What results.json records under ``quantize``: bits, bucket size, the quantized layers, and the size in
    bytes of the packed model (``packed_bytes``: what ``kd_lab.tools.export_quantized`` stores) next to the
    fp32 model (``fp32_bytes``). Both count every floating tensor of the state dict (parameters and BatchNorm
    statistics) at 4 bytes; integer buffers (BatchNorm's batch counter) are not needed for inference."""
    found = quantized_modules(model)
    state = plain_state_dict(model)
    fp32 = sum(4 * t.numel() for t in state.values() if t.is_floating_point())
    packed = fp32
    for _, module, q in found:
        numel = module.parametrizations.weight.original.numel()
        packed += packed_weight_bytes(numel, q.bits, q.bucket_size) - 4 * numel
    first = found[0][2] if found else None
    return {
        "name": "uniform" if found else "none",
        "bits": first.bits if first else None,
        "bucket_size": first.bucket_size if first else None,
        "stochastic": first.stochastic if first else None,
        "layers": [name for name, _, _ in found],
        "fp32_bytes": fp32,
        "packed_bytes": packed,
        "compression": fp32 / packed,
    }
