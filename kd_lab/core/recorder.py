"""Record intermediate outputs of any ``nn.Module`` by dotted module path, with forward hooks.

A module's output is recorded as ``kd_lab.core.outputs.feature_of`` reads it: a Tensor as is, a tuple by
its first element (a transformer block's hidden state), a ``ModelOutput`` by its logits or last hidden state.

Models never change their ``forward`` to expose features: a method names the paths it needs
(``"blocks.2"``, ``"layers.0"``; ``"."`` is the model's own output), the recorder validates them when the run
is built, and hooks exist only inside a ``with`` block (torchdistill's io-dict by module path; mmrazor's
recorder). Shapes are probed with one forward on an example batch, so connectors are built from them and a
user never types a channel count.
"""

import difflib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kd_lab.core.outputs import feature_of, logits_of
from kd_lab.errors import KDLabError

SELF = "."


def resolve_module(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the nearest valid paths."""
    if path == SELF:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        near = difflib.get_close_matches(path, names, n=5, cutoff=0.4) or names[:8]
        raise KDLabError(
            f"{role} ({type(model).__name__}) has no module at path '{path}'. "
            f"Nearest valid paths: {near}. Use one of them (or '.' for the model output)."
        ) from None


TapSpec = str | int


def stage_taps(model: nn.Module) -> list[str]:
    """The model's stages, shallow to deep: its ``stage_taps``, or for a transformer its blocks (the
    ``nn.ModuleList`` holding the most parameters: ``transformer.h.0``, ``model.layers.0``, ...)."""
    declared = getattr(model, "stage_taps", None)
    if declared:
        return list(declared)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):  # not a Hugging Face model
        return []
    return block_paths(model)


def block_paths(model: nn.Module) -> list[str]:
    """The paths of the blocks of the ``nn.ModuleList`` holding the most parameters (the stack of blocks in
    every Hugging Face LM), or [] when the model has none."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return [f"{name}.{i}" for i in range(len(blocks))]


def resolve_tap(model: nn.Module, spec: TapSpec, role: str = "model") -> str:
    """A tap given in config -> a module path.

    ``"blocks.2"``: that path. ``-1`` / ``0`` (an int): the model's ``stage_taps`` by index (deepest = -1).
    ``"middle"``: the stage ``len(stage_taps) // 2`` (FitNets' hint layer).
    ``"embedding"``: the model's ``embedding_tap`` (the classifier's input). ``"."``: the output.
    Models of other libraries have no ``stage_taps``: give paths for them.
    """
    if spec == "middle":
        stages = stage_taps(model)
        spec = len(stages) // 2 if stages else -1  # no stages: the index below raises the clear error
    if isinstance(spec, int):
        stages = stage_taps(model)
        if not stages:
            raise KDLabError(
                f"{role} ({type(model).__name__}) declares no stage_taps, so tap index {spec} means nothing; "
                f"give module paths instead, e.g. one of {[n for n, _ in model.named_modules() if n][:8]}."
            )
        if not -len(stages) <= spec < len(stages):
            raise KDLabError(f"{role} has {len(stages)} stages {stages}; tap index {spec} is out of range.")
        return stages[spec]
    if spec == "embedding":
        path = getattr(model, "embedding_tap", None)
        if path is None:
            raise KDLabError(
                f"{role} ({type(model).__name__}) declares no embedding_tap; give the module path of its "
                "penultimate features instead."
            )
        return path
    resolve_module(model, spec, role)
    return spec


class FeatureRecorder:
    """``with recorder: model(x)`` fills ``recorder.features[path]``; hooks are removed on exit."""

    def __init__(self, model: nn.Module, paths: Iterable[str], role: str = "model"):
        self.paths = list(dict.fromkeys(paths))  # unique, in order
        self.modules = {path: resolve_module(model, path, role) for path in self.paths}
        self.features: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, path: str):
        def record(_module: nn.Module, _inputs, output) -> None:
            self.features[path] = logits_of(output) if path == SELF else feature_of(output)

        return record

    def __enter__(self) -> "FeatureRecorder":
        self.features = {}
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)


def record(model: nn.Module, paths: Iterable[str], x: Tensor, role: str = "model") -> tuple[Tensor, dict[str, Tensor]]:
    """One forward that returns ``(output, {path: feature})``."""
    recorder = FeatureRecorder(model, paths, role)
    with recorder:
        out = logits_of(model(x), role)
    return out, recorder.features


@torch.no_grad()
def probe_shapes(model: nn.Module, paths: Iterable[str], example: Tensor, role: str = "model") -> dict[str, torch.Size]:
    """Shapes (batch axis included) of the outputs at ``paths`` for ``example``, in eval mode so that
    normalization statistics are left untouched; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        _, feats = record(model, paths, example, role)
    finally:
        model.train(was_training)
    return {path: f.shape for path, f in feats.items()}
