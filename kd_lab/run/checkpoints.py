"""Loading model weights from a file, with errors that say what is wrong and how to fix it."""

import re
from pathlib import Path

import torch
from torch import nn

from kd_lab.errors import KDLabError, brief

SHOWN = 5  # keys listed per kind of mismatch
# a file that has at least this fraction of the model's keys, each with the right shape, and nothing else, is
# the model's own state with keys lost (damaged or cut), not the state of another architecture
INCOMPLETE_AT = 0.5


def _fix(path: Path, role: str) -> str:
    """The fix for a file that cannot be used: a teacher-store entry is retrained once it is deleted."""
    if (path.parent / "meta.json").is_file():
        return f"delete the teacher-store entry {path.parent} and the next run retrains it"
    return f"re-create it, or set {role}.ckpt_path=null to train the {role} (it is cached for later runs)"


def read_state_dict(path: str | Path, role: str = "teacher") -> dict[str, torch.Tensor]:
    """Accepts a kd-lab teacher-store file, a kd-lab/Lightning checkpoint (``student.*`` keys) or a plain
    state dict."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(str(p) for p in (*path.glob("*.pt"), *path.glob("checkpoints/*.ckpt")))[:3]
        raise KDLabError(
            f"{role}.ckpt_path={path} is a directory, not a checkpoint file; point it at a file"
            + (f", e.g. {inside[0]}." if inside else " (a teacher.pt or a run's checkpoints/best.ckpt).")
        )
    if not path.is_file() and (path.parent / "meta.json").is_file():  # a store entry that lost its weights
        raise KDLabError(f"teacher-store entry {path.parent} is damaged: it has no {path.name}; {_fix(path, role)}.")
    if not path.is_file():
        raise KDLabError(
            f"{role}.ckpt_path={path} does not exist. Point it at a checkpoint file, or set "
            f"{role}.ckpt_path=null to train the {role} (it is cached for later runs)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:  # a whole pickled object (a config, a model class), which weights_only loading refuses
            raise KDLabError(
                f"{role} checkpoint {path} holds a Python object ({refused.group(1)}) that safe loading "
                "(torch.load weights_only) refuses; save plain model.state_dict() instead."
            ) from e
        raise KDLabError(
            f"{role} checkpoint {path} cannot be read ({brief(e, sentence=True)}): it is truncated, "
            f"corrupt or not a torch checkpoint; {_fix(path, role)}."
        ) from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KDLabError(f"{role} checkpoint {path} holds no state dict of tensors; save model.state_dict().")
    if isinstance(obj, dict) and "state_dict" in obj and any(k.startswith("student.") for k in state):
        # a kd-lab run's checkpoint: its student (an online teacher, peers or exit heads live beside it)
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    elif state and all(k.startswith("student.") for k in state):
        state = {k.removeprefix("student."): v for k, v in state.items()}
    return state


def _listed(keys: list[str]) -> str:
    return f"{keys[:SHOWN]}" + (f"... ({len(keys)} in all)" if len(keys) > SHOWN else "")


def load_weights(model: nn.Module, path: str | Path, role: str = "teacher") -> nn.Module:
    state = read_state_dict(path, role)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    fitting = len(own) - len(missing) - len(mismatched)
    if missing and not unexpected and not mismatched and fitting >= INCOMPLETE_AT * len(own):
        raise KDLabError(
            f"{role} checkpoint {path} does not fit {type(model).__name__} ({role}.model): it has {fitting} of "
            f"its {len(own)} keys, all with the right shapes, but lacks {_listed(missing)}. It is incomplete or "
            f"damaged (a state of this architecture with keys lost, not another architecture): "
            f"{_fix(Path(path), role)}."
        )
    if missing or unexpected or mismatched:
        raise KDLabError(
            f"{role} checkpoint {path} does not fit {type(model).__name__} ({role}.model): "
            f"missing keys {_listed(missing)}, unexpected keys {_listed(unexpected)}, "
            f"shape mismatches (file vs model) {_listed(mismatched)}. It was saved from another architecture: "
            f"pick the {role} config that wrote it ({role}=<name>, {role}.model.* as it was), "
            f"or {_fix(Path(path), role)}."
        )
    model.load_state_dict(state)
    return model
