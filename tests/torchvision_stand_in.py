"""A test-only stand-in for torchvision, so that tests/test_timm_models.py can test timm itself.

Why it exists: timm requires torchvision, and torchvision cannot be installed on kd-lab's test machines (its
wheel pulls another torch than the pinned CPU build). timm's model code does not need torchvision; only its
imports do. So CI installs timm with ``pip install --no-deps`` (.ci/run), and a fixture puts these modules
into ``sys.modules`` for one test, only where torchvision cannot be imported. kd-lab itself never uses it.

It holds exactly what timm 1.0.31 takes from torchvision when ``import timm`` runs (found with
``grep -rn torchvision`` in timm's source), and nothing more:

- ``torchvision.ops.misc.FrozenBatchNorm2d``: a real implementation. timm's norm layers build it
  (``timm.layers.create_norm``, ``freeze_batch_norm_2d``), so it must compute what torchvision's does.
- ``torchvision.transforms.functional.InterpolationMode``: a real copy of the enum. ``timm.data.transforms``
  maps its members to names when it is imported.
- ``torchvision.transforms.ToTensor`` and six data sets of ``torchvision.datasets``: placeholders. timm.data
  subclasses or imports them; kd-lab uses neither timm's transforms nor its data sets. Building one raises.

Any other name is missing on purpose: reading it raises an AttributeError that names this stand-in. timm
then takes its own fallbacks where it has them (no ``torchvision.models``: no FX feature extraction).
"""

import enum
import importlib.machinery
import types

import torch
from torch import nn

TIMM_VERSION = "1.0.31"  # the timm these names were read from (.ci/run installs it)
NOT_HERE = (
    "is not in kd-lab's test-only torchvision stand-in (tests/torchvision_stand_in.py), which holds only what "
    f"timm {TIMM_VERSION} imports. Add it there, or run with the real torchvision installed"
)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers (torchvision.ops.misc's)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A BatchNorm2d's state dict has num_batches_tracked; a frozen one has no use for it.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps})"


class InterpolationMode(enum.Enum):
    """torchvision.transforms.functional.InterpolationMode, member for member."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _placeholder(module: str, name: str) -> type:
    """A class that timm may import or subclass, and that raises when anything builds it."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"{module}.{name} is a placeholder in kd-lab's test-only torchvision stand-in "
            f"(tests/torchvision_stand_in.py): timm {TIMM_VERSION} imports it, and kd-lab's tests never build it. "
            f"Install the real torchvision to use it."
        )

    return type(name, (), {"__init__": __init__, "__module__": module})


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name, f"kd-lab's test-only stand-in for {name}.")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=__file__, is_package=True)
    module.__path__ = []  # a package, so that ``import torchvision.ops.misc`` finds its parents

    def missing(attribute: str):
        raise AttributeError(f"{name}.{attribute} {NOT_HERE}.")

    module.__getattr__ = missing  # module-level __getattr__: only names not set below reach it
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


DATA_SETS = ["CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"]  # timm.data.dataset_factory


def modules() -> dict[str, types.ModuleType]:
    """Fresh stand-in modules by their ``sys.modules`` name, each child also set on its parent."""
    found = {
        "torchvision": _module("torchvision", __version__=f"0.0.0+kd-lab-stand-in-for-timm-{TIMM_VERSION}"),
        "torchvision.ops": _module("torchvision.ops"),
        "torchvision.ops.misc": _module("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d),
        "torchvision.transforms": _module(
            "torchvision.transforms", ToTensor=_placeholder("torchvision.transforms", "ToTensor")
        ),
        "torchvision.transforms.functional": _module(
            "torchvision.transforms.functional", InterpolationMode=InterpolationMode
        ),
        "torchvision.datasets": _module(
            "torchvision.datasets", **{name: _placeholder("torchvision.datasets", name) for name in DATA_SETS}
        ),
    }
    for name, module in found.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(found[parent], child, module)
    return found
