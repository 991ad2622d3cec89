"""``trainer.accelerator`` and ``trainer.devices`` against this machine, before the data is generated or a
teacher lock is taken: Lightning finds a missing GPU only when the Trainer is built, after the teacher store
has trained (or waited for) the teacher."""

from typing import Any

import torch

from kd_lab.errors import KDLabError

GPU_NAMES = ("gpu", "cuda")
AUTO = ("auto", None, -1, "-1")


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _indices(devices: Any) -> list[int] | None:
    """The GPU indices that ``devices`` names (a list, or a string "0,1"), or None for a count."""
    if isinstance(devices, list | tuple):
        return [int(d) for d in devices]
    if isinstance(devices, str) and "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return None


def _count(devices: Any) -> int | None:
    if devices in AUTO or isinstance(devices, bool):
        return None
    if isinstance(devices, int) or (isinstance(devices, str) and devices.strip().isdigit()):
        return int(devices)
    return None


def check_devices(trainer: dict[str, Any]) -> None:
    """Raise when the trainer asks for GPUs this machine does not have."""
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    devices = trainer.get("devices", "auto")
    available = gpu_count()
    if accelerator in GPU_NAMES and available == 0:
        raise KDLabError(
            f"trainer.accelerator={accelerator} asks for a GPU, but this machine has none (torch.cuda.is_available() "
            "is False): set trainer.accelerator=cpu, or trainer.accelerator=auto to use a GPU where there is one."
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise KDLabError(
            "trainer.accelerator=mps asks for Apple's GPU, but torch.backends.mps.is_available() is False here: set "
            "trainer.accelerator=cpu, or trainer.accelerator=auto to use a GPU where there is one."
        )
    if accelerator not in (*GPU_NAMES, "auto") or available == 0:
        return  # CPU processes (trainer.devices=2 on CPU is trainer=ddp_cpu), or auto falling back to the CPU
    shown = (
        f"trainer.devices={devices}" if not isinstance(devices, list | tuple) else f"trainer.devices={list(devices)}"
    )
    indices, count = _indices(devices), _count(devices)
    if indices is not None and max(indices, default=0) >= available:
        numbers = "GPU 0 only" if available == 1 else f"GPUs 0 to {available - 1}"
        raise KDLabError(
            f"{shown} names GPU {max(indices)}, but this machine has {numbers}: pick among them, or set "
            "trainer.devices=-1 for all of them."
        )
    if count is not None and count > available:
        raise KDLabError(
            f"{shown} asks for {count} GPUs, but this machine has {available}: set trainer.devices={available} "
            "(or -1 for all of them), or trainer.accelerator=cpu."
        )
