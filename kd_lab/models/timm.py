"""timm (PyTorch Image Models) as kd-lab teachers and students, built by name: ``student=timm`` or
``teacher=timm`` with ``model.arch=resnet18`` (docs/extending.md). The key is ``arch``, not ``name``:
kd-lab's builder keeps a node's ``name`` for itself (a config's display name) and does not pass it on.

Nothing is ever downloaded. The model is built with ``pretrained=False``; ``weights`` names a local file of
its state dict (``.pt``/``.pth`` from ``torch.save(model.state_dict())``, or ``.safetensors``), loaded
strictly: every key and shape must match.

timm is optional and imported only when a timm model is built. It imports torchvision when it is imported
(``timm.layers`` and ``timm.data``; seen with timm 1.0.31, 0.9.16 and 0.6.13), so it needs the torchvision
built for the installed torch. The error says what is missing and how to install it.

The model declares ``stage_taps`` (timm's ``feature_info`` modules, shallow to deep) and, when it pools with
a ``global_pool`` module, ``embedding_tap``, so feature methods find their taps as on kd-lab's own models.
"""

import difflib
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from kd_lab.errors import KDLabError, brief

INSTALL = "pip install timm"
TORCHVISION_FIX = (
    "install the torchvision built for your torch {torch} from the index your torch came from (CPU: pip install "
    "torchvision --index-url https://download.pytorch.org/whl/cpu; CUDA: the matching index at pytorch.org), "
    "then check that pip kept torch {torch}"
)
SHOWN = 5  # keys listed per kind of mismatch


def import_timm() -> ModuleType:
    """The ``timm`` module, or a KDLabError that names what is missing and the install command."""
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing == "timm":
            fix = TORCHVISION_FIX.format(torch=torch.__version__)
            raise KDLabError(
                f"timm models need the timm package, which is not installed: {INSTALL}. timm imports torchvision, "
                f"so first {fix}."
            ) from None
        if missing == "torchvision":
            fix = TORCHVISION_FIX.format(torch=torch.__version__)
            raise KDLabError(
                f"timm is installed but cannot be imported without torchvision ({brief(e)}): {fix}."
            ) from e
        raise


def timm_model(arch: str, num_classes: int, in_chans: int = 3, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=..., in_chans=..., **kwargs)``, then the state
    dict in the local file ``weights`` when it is given. ``kwargs`` go to timm unchanged (``drop_rate``,
    ``img_size`` for a vision transformer, ...)."""
    name = arch  # as timm calls it
    if kwargs.pop("pretrained", False):
        raise KDLabError(
            f"timm model {name}: pretrained=True would download weights, and kd-lab never downloads. Save the "
            f"state dict once (torch.save(model.state_dict(), 'w.pt')) and set model.weights=<that file>."
        )
    timm = import_timm()
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {near}? " if near else ""
        raise KDLabError(
            f"timm has no model named '{name}'; {hint}timm.list_models('*{name[:4]}*') lists names like it."
        ) from None
    _declare_taps(model)
    if weights is not None:
        load_state_file(model, weights, name)
    return model


def _declare_taps(model: nn.Module) -> None:
    info = getattr(model, "feature_info", None)
    stages = [f["module"] for f in info if isinstance(f, dict) and f.get("module")] if info else []
    modules = dict(model.named_modules())
    if stages and all(s in modules for s in stages):
        model.stage_taps = stages
    if isinstance(getattr(model, "global_pool", None), nn.Module):
        model.embedding_tap = "global_pool"  # (B, C): the classifier's input in timm's CNNs


def read_state_file(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a ``.safetensors`` file, or a torch file holding a state dict (or a dict
    with one under ``state_dict``, as timm's training script saves it)."""
    path = Path(path)
    if not path.is_file():
        raise KDLabError(
            f"timm model {name}: model.weights={path} is not a file; point it at a state dict saved from this "
            f"model (.pt or .safetensors), or set model.weights=null for a random init."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KDLabError(
            f"timm model {name}: model.weights={path} cannot be read ({brief(e, sentence=True)}); save it with "
            f"torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)."
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KDLabError(
            f"timm model {name}: model.weights={path} holds no state dict of tensors; save model.state_dict()."
        )
    return state


def _listed(keys: list[str]) -> str:
    return f"{keys[:SHOWN]}" + (f"... ({len(keys)} in all)" if len(keys) > SHOWN else "")


def load_state_file(model: nn.Module, path: str | Path, name: str) -> nn.Module:
    """Load the state dict in ``path`` into ``model``, strictly: a missing, extra or reshaped key is an
    error that lists them (weights of another model, or of another num_classes / in_chans)."""
    state = read_state_file(path, name)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        raise KDLabError(
            f"timm model {name}: model.weights={path} does not fit it: missing keys {_listed(missing)}, "
            f"unexpected keys {_listed(unexpected)}, shape mismatches (file vs model) {_listed(reshaped)}. "
            f"Use the file saved from this model with the same num_classes and in_chans, or set model.arch, "
            f"model.num_classes and model.in_chans as they were when it was saved."
        )
    model.load_state_dict(state, strict=True)
    return model
