"""Loading model weights from a file, with errors that say what is wrong and how to fix it."""

from pathlib import Path

import torch
from torch import nn

from kd_lab.errors import KDLabError, brief


def read_state_dict(path: str | Path, role: str = "teacher") -> dict[str, torch.Tensor]:
    """Accepts a kd-lab teacher-store file, a kd-lab/Lightning checkpoint (``student.*`` keys) or a plain
    state dict."""
    path = Path(path)
    if not path.is_file():
        raise KDLabError(
            f"{role}.ckpt_path={path} does not exist. Point it at a checkpoint file, or set "
            f"{role}.ckpt_path=null to train the {role} (it is cached for later runs)."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KDLabError(
            f"{role} checkpoint {path} cannot be read ({brief(e)}): it is truncated, "
            "corrupt or not a torch checkpoint. Re-create it, or set ckpt_path=null to retrain."
        ) from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KDLabError(f"{role} checkpoint {path} holds no state dict of tensors; save model.state_dict().")
    if state and all(k.startswith("student.") for k in state):  # a kd-lab run's checkpoint
        state = {k.removeprefix("student."): v for k, v in state.items()}
    return state


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
    if missing or unexpected or mismatched:
        raise KDLabError(
            f"{role} checkpoint {path} does not fit {type(model).__name__} ({role}.model): "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches {mismatched[:5]}. "
            f"Pick the {role} config of the architecture that wrote it."
        )
    model.load_state_dict(state)
    return model
