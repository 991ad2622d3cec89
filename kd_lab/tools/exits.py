"""One exit of a multi-exit network as a plain model, and what each exit costs at inference.

``ExitModel(backbone, path, head)`` runs the backbone only up to the module at ``path`` (a forward hook stops
the forward there, so later sections cost nothing, for any backbone whose forward is a chain of modules) and
applies the exit's head. The other exits' heads are not part of it. The deepest exit is the backbone alone.
"""

import copy

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kd_lab.core.recorder import resolve_module


class _Stop(Exception):  # control flow (the forward stops at the exit), not an error
    def __init__(self, feature: Tensor):
        self.feature = feature


class ExitModel(nn.Module):
    def __init__(self, backbone: nn.Module, path: str, head: nn.Module):
        super().__init__()
        self.backbone, self.path, self.head = backbone, path, head
        resolve_module(backbone, path, "backbone")

    def forward(self, x: Tensor) -> Tensor:
        def stop(_module, _inputs, output):
            raise _Stop(output)

        handle = self.backbone.get_submodule(self.path).register_forward_hook(stop)
        try:
            self.backbone(x)
        except _Stop as s:
            return self.head(s.feature)
        finally:
            handle.remove()
        raise RuntimeError(f"the backbone's forward never ran the module at '{self.path}'")


def exit_models(student: nn.Module, algorithm) -> dict[str, nn.Module]:
    """Every exit of a multi-exit (BYOT) student as a model sharing its weights: ``exit1``.. and ``student``."""
    models: dict[str, nn.Module] = {
        f"exit{i + 1}": ExitModel(student, path, head)
        for i, (path, head) in enumerate(zip(algorithm.exit_paths, algorithm.heads, strict=True))
    }
    models["student"] = student
    return models


def export_exit(student: nn.Module, algorithm, name: str) -> nn.Module:
    """A standalone copy of exit ``name`` (``exit<i>`` or ``student``, the deepest), in eval mode."""
    models = exit_models(student, algorithm)
    if name not in models:
        raise KeyError(f"no exit '{name}'; the exits are {list(models)}")
    return copy.deepcopy(models[name]).eval()


def executed_parameters(model: nn.Module, x: Tensor) -> int:
    """Parameters of the modules that actually run for ``x`` (what an early exit really needs)."""
    ran: set[nn.Module] = set()
    handles = [m.register_forward_hook(lambda m, i, o: ran.add(m)) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    params = {id(p): p.numel() for m in ran for p in m.parameters(recurse=False)}
    return sum(params.values())


@torch.no_grad()
def exit_costs(student: nn.Module, algorithm, example: Tensor) -> dict[str, dict]:
    """Per exit: its tap, the parameters it runs, and FLOPs for one example (torch's flop counter)."""
    was_training = student.training
    student.eval()
    algorithm.eval()
    costs = {}
    try:
        for name, model in exit_models(student, algorithm).items():
            with FlopCounterMode(display=False) as counter:
                model(example[:1])
            costs[name] = {
                "tap": getattr(model, "path", "."),
                "params": executed_parameters(model, example[:1]),
                "flops": int(counter.get_total_flops()),
            }
    finally:
        student.train(was_training)
        algorithm.train(was_training)
    return costs
