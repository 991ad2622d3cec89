"""Knowledge Distillation by On-the-Fly Native Ensemble (ONE; Lan, Zhu, Gong, NeurIPS 2018),
https://arxiv.org/abs/1806.04606. Runs under ``scheme=self``: there is no external teacher.

The student's layers up to ``tap`` are shared. Above the tap there are ``branches`` branches. Branch 1 is
the student's own upper part: it is the deployed model. The others are copies of that upper part
(``branch: copy``, re-initialized so that they differ) or heads of their own (``branch: head``). A gate reads
the shared feature and gives one weight per branch (pool, linear, batch norm, ReLU, softmax, as in the
reference code). The gated sum of the branches' logits is the ensemble, and the ensemble teaches each
branch:

    z_e  = sum_i g_i z_i
    loss = ce_weight * (sum_i CE(z_i, y) + CE(z_e, y))
         + kd_weight * w(epoch) * T^2 * sum_i KL(softmax(z_e / T) || softmax(z_i / T))   (z_e detached here)

The paper's values are 3 branches and T = 3. The reference code (Lan1991Xu/ONE_NeurIPS2018) also ramps the
KL weight up with a sigmoid over its first 80 of 300 epochs: w = exp(-5 (1 - t)^2), t = epoch / ramp length.
``rampup`` is that length as a fraction of the run's epochs (0.27 = 80 / 300; 0 turns the ramp off).

The helpers here (``upper_part``, ``wide_head``, ``part_costs``) also serve ``rocket.py``.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import AtLeastOne, AtLeastTwo, NonNegative, Positive
from kd_lab.core.outputs import feature_of, logits_of
from kd_lab.core.recorder import SELF, resolve_tap, stage_taps
from kd_lab.errors import KDLabError

BRANCH_KINDS = ("copy", "head")


def resolve_branch_tap(student: nn.Module, spec: str | int, method: str) -> str:
    """The module path the branches grow from. ``"auto"``: the stage below the deepest one, so that the
    branches are the last stage and the classifier (the paper branches ResNet's last stage); a student with a
    single stage shares it, and its branches are classifiers."""
    if spec == "auto":
        stages = stage_taps(student)
        if not stages:
            raise KDLabError(
                f"algorithm={method} with tap=auto needs a student that declares stage_taps; "
                f"{type(student).__name__} declares none. Give algorithm.tap as a module path."
            )
        spec = stages[-2] if len(stages) >= 2 else stages[0]
    path = resolve_tap(student, spec, "student")
    if path == SELF:
        raise KDLabError(
            f"algorithm={method} cannot branch at the student's output ('.'): nothing is left above it to "
            "branch. Set algorithm.tap to an inner layer, e.g. a stage index such as 0."
        )
    return path


def _batch_norm(dim: int, ndim: int) -> nn.Module:
    return nn.BatchNorm1d(dim) if ndim in (2, 3) else nn.BatchNorm2d(dim)


def wide_head(shape: torch.Size, widths: list[int], num_classes: int, method: str) -> nn.Sequential:
    """Layers of ``widths`` on a probed feature shape, then a classifier. A (B, D) feature gets Linear-ReLU
    layers; a (B, C, L) or (B, C, H, W) map gets Conv-BN-ReLU layers (kernel 3; stride 2 after the first, as
    in ``CNN1d``), global average pooling and the classifier."""
    if len(shape) == 2:
        layers: list[nn.Module] = []
        width = shape[1]
        for w in widths:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        return nn.Sequential(*layers, nn.Linear(width, num_classes))
    if len(shape) in (3, 4):
        conv, pool = (nn.Conv1d, nn.AdaptiveAvgPool1d) if len(shape) == 3 else (nn.Conv2d, nn.AdaptiveAvgPool2d)
        layers, width = [], shape[1]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [conv(width, w, 3, stride=stride, padding=1, bias=False), _batch_norm(w, len(shape)), nn.ReLU()]
            width = w
        return nn.Sequential(*layers, pool(1), nn.Flatten(), nn.Linear(width, num_classes))
    raise KDLabError(
        f"algorithm={method} cannot attach a head to a feature of shape {tuple(shape)}; tap a "
        "(B, D), (B, C, L) or (B, C, H, W) output (algorithm.tap)."
    )


def gate(shape: torch.Size, branches: int, method: str) -> nn.Sequential:
    """ONE's gate: global pooling of the shared feature, a linear layer to one score per branch, batch norm
    and ReLU (the softmax is applied by the caller)."""
    if len(shape) == 2:
        pool: list[nn.Module] = []
    elif len(shape) in (3, 4):
        pool = [nn.AdaptiveAvgPool1d(1) if len(shape) == 3 else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    else:
        raise KDLabError(
            f"algorithm={method} cannot gate on a feature of shape {tuple(shape)}; tap a "
            "(B, D), (B, C, L) or (B, C, H, W) output (algorithm.tap)."
        )
    return nn.Sequential(*pool, nn.Linear(shape[1], branches), nn.BatchNorm1d(branches), nn.ReLU())


class ForwardTrace:
    """Records the student's next forward: the order in which its modules start and end, their input and
    output shapes, the feature at ``tap`` and the logits. It removes its hooks when that forward ends. The
    step's shape probe is that forward, so ``bind`` installs a trace and ``build`` reads it."""

    def __init__(self, model: nn.Module, tap: str):
        self.tap = tap
        self.events: list[tuple[str, str]] = []
        self.in_shapes: dict[str, torch.Size | None] = {}
        self.out_shapes: dict[str, torch.Size | None] = {}
        self.calls: dict[str, int] = {}
        self.tap_feature: Tensor | None = None
        self.logits: Tensor | None = None
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._before(name)))
            self.handles.append(module.register_forward_hook(self._after(name)))

    def _before(self, name: str):
        def hook(_module, args):
            self.calls[name] = self.calls.get(name, 0) + 1
            self.events.append(("in", name))
            first = args[0] if args else None
            self.in_shapes.setdefault(name, first.shape if isinstance(first, Tensor) else None)

        return hook

    def _after(self, name: str):
        def hook(_module, _args, output):
            self.events.append(("out", name))
            feature = feature_of(output) if isinstance(output, Tensor | tuple) else None
            self.out_shapes.setdefault(name, feature.shape if feature is not None else None)
            if name == self.tap and self.tap_feature is None:
                self.tap_feature = feature_of(output).detach().clone()
            if name == "":  # the model's own forward ended: the trace is complete
                self.logits = logits_of(output).detach().clone()
                self.remove()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @property
    def complete(self) -> bool:
        return self.logits is not None and self.tap_feature is not None


def upper_part(model: nn.Module, trace: ForwardTrace, method: str) -> nn.Sequential:
    """A copy of the modules the student runs after ``trace.tap``, as one chain, checked to reproduce the
    student's logits from the tap's feature. The copy has the student's current weights."""
    tap = trace.tap
    fix = "set algorithm.branch=head (heads of algorithm.head_width on the tap) or tap another layer"
    if not trace.complete:
        raise KDLabError(
            f"algorithm={method} could not trace the student's forward through '{tap}' (it never ran there); {fix}."
        )
    events = trace.events
    start = events.index(("out", tap)) + 1
    chosen, i = [], start
    while i < len(events):  # the outermost modules that start after the tap ends, in order
        kind, name = events[i]
        if kind == "in":
            chosen.append(name)
            i = events.index(("out", name), i) + 1
        else:
            i += 1
    if not chosen:
        raise KDLabError(f"algorithm={method}: no module runs after '{tap}' in the student; {fix}.")
    layers: list[nn.Module] = []
    shape = trace.out_shapes[tap]
    for name in chosen:
        wanted = trace.in_shapes.get(name)
        if trace.calls.get(name, 0) > 1 or shape is None or wanted is None:
            raise KDLabError(
                f"algorithm={method}: the student's module '{name}' runs more than once or on non-tensor "
                f"inputs, so its upper part above '{tap}' is not a plain chain of modules; {fix}."
            )
        if wanted != shape:  # a functional flatten between two modules (pooling -> classifier)
            if len(shape) > 2 and wanted == torch.Size([shape[0], math.prod(shape[1:])]):
                layers.append(nn.Flatten())
            else:
                raise KDLabError(
                    f"algorithm={method}: in the student, '{name}' takes shape {tuple(wanted)} but the module "
                    f"before it gives {tuple(shape)}: the forward above '{tap}' is not a plain chain; {fix}."
                )
        layers.append(copy.deepcopy(model.get_submodule(name)))
        shape = trace.out_shapes[name]
    chain = nn.Sequential(*layers)
    was_training = chain.training
    chain.eval()
    with torch.no_grad():
        again = chain(trace.tap_feature)
    chain.train(was_training)
    if again.shape != trace.logits.shape or not torch.allclose(again, trace.logits, rtol=1e-4, atol=1e-5):
        raise KDLabError(
            f"algorithm={method}: the chain of the student's modules after '{tap}' ({chosen}) does not "
            f"reproduce its logits, so its forward does more than call them in order; {fix}."
        )
    return chain


def reinitialize(module: nn.Module) -> nn.Module:
    """Fresh weights for every layer that can reset itself (PyTorch's default initialization), so that
    copied branches start apart; batch-norm statistics are reset too."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return module


def _cost(model: nn.Module, x: Tensor) -> tuple[int, int]:
    from kd_lab.tools.exits import executed_parameters  # a leaf module of its own; imported late to stay light

    with FlopCounterMode(display=False) as counter:
        model(x)
    return executed_parameters(model, x), int(counter.get_total_flops())


@torch.no_grad()
def part_costs(student: nn.Module, tap: str, heads: dict[str, nn.Module], example: Tensor) -> dict[str, dict]:
    """Inference cost of the student and of each head on the shared trunk: the parameters that run and the
    FLOPs for one example (torch's flop counter). A head's cost includes the trunk up to ``tap``."""
    from kd_lab.tools.exits import ExitModel

    modules = [student, *heads.values()]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    x = example[:1]
    try:
        params, flops = _cost(student, x)
        costs = {"student": {"tap": SELF, "params": params, "flops": flops}}
        for name, head in heads.items():
            params, flops = _cost(ExitModel(student, tap, head), x)
            costs[name] = {"tap": tap, "params": params, "flops": flops}
        trunk_params, trunk_flops = _cost(ExitModel(student, tap, nn.Identity()), x)
        costs["trunk"] = {"tap": tap, "params": trunk_params, "flops": trunk_flops}
    finally:
        for m, mode in zip(modules, was_training, strict=True):
            m.train(mode)
    return costs


class ONE(Algorithm):
    name = "one"
    schemes = frozenset({"self"})
    needs_teacher = False

    def __init__(
        self,
        branches: AtLeastTwo = 3,
        tap: str | int = "auto",
        branch: str = "copy",
        head_width: Positive = 1.0,
        head_depth: AtLeastOne = 1,
        ce_weight: NonNegative = 1.0,
        kd_weight: NonNegative = 1.0,
        temperature: Positive = 3.0,
        rampup: NonNegative = 0.27,
    ):
        super().__init__(ce_weight)
        if branch not in BRANCH_KINDS:
            raise KDLabError(
                f"algorithm.branch={branch!r} is not a branch kind: pick 'copy' (copies of the student's layers "
                "above the tap) or 'head' (heads of algorithm.head_width x the tap's width)."
            )
        self.num_branches, self.tap_spec, self.branch_kind = branches, tap, branch
        self.head_width, self.head_depth = head_width, head_depth
        self.kd_weight, self.temperature, self.rampup = kd_weight, temperature, rampup
        self.ramp = 1.0  # the KL weight's ramp factor; set at each epoch's start
        self.tap_path = ""
        self._trace: ForwardTrace | None = None
        self._student: list[nn.Module] = []  # a plain list: the student must not become a submodule

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.tap_path = resolve_branch_tap(student, self.tap_spec, self.name)
        self._student = [student]
        if self.branch_kind == "copy":  # the step's shape probe runs next: trace it
            self._trace = ForwardTrace(student, self.tap_path)

    @property
    def student_taps(self) -> list[str]:
        return [self.tap_path, SELF]

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        shape = student_shapes[self.tap_path]
        extra = self.num_branches - 1
        if self.branch_kind == "copy":
            trace, self._trace = self._trace, None
            trace.remove()  # in case the probe never completed
            chain = upper_part(self._student[0], trace, self.name)
            self._student = []  # not needed any more: hold no reference to the student
            self.branches = nn.ModuleList(reinitialize(copy.deepcopy(chain)) for _ in range(extra))
        else:
            widths = [max(1, round(self.head_width * shape[1]))] * self.head_depth
            self.branches = nn.ModuleList(
                wide_head(shape, widths, context.task.num_classes, self.name) for _ in range(extra)
            )
        self.gate = gate(shape, self.num_branches, self.name)

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:
        length = self.rampup * max_epochs
        phase = 1.0 - min(epoch, length) / length if length > 0 else 0.0
        self.ramp = math.exp(-5.0 * phase * phase)

    def branch_logits(self, shared: Tensor, student_logits: Tensor) -> tuple[list[Tensor], Tensor]:
        """Every branch's logits (the student's first) and their gated ensemble."""
        logits = [student_logits, *(b(shared) for b in self.branches)]
        weights = F.softmax(self.gate(shared), dim=-1)  # (B, branches)
        ensemble = torch.einsum("bm,mbk->bk", weights, torch.stack(logits))
        return logits, ensemble

    def exit_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        logits, ensemble = self.branch_logits(features[self.tap_path], features[SELF])
        named = {f"branch{i + 1}": z for i, z in enumerate(logits) if i > 0}
        named["gated"] = ensemble
        return named

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        logits, ensemble = self.branch_logits(out.features[self.tap_path], out.logits)
        teacher = ensemble.detach()  # the ensemble teaches; the KL does not move it
        kd = torch.stack([kd_term(out, z, teacher, self.temperature) for z in logits]).sum()
        return {
            "ce": self.ce_weight * out.label_loss(),
            "branch_ce": self.ce_weight * torch.stack([out.label_loss(z) for z in logits[1:]]).sum(),
            "ensemble_ce": self.ce_weight * out.label_loss(ensemble),
            "branch_kd": self.kd_weight * self.ramp * kd,
        }

    def report(self, student: nn.Module, example: Tensor) -> dict:
        heads = {f"branch{i + 2}": b for i, b in enumerate(self.branches)}
        costs = part_costs(student, self.tap_path, heads, example)
        trunk = costs["trunk"]
        extra_params = sum(c["params"] - trunk["params"] for n, c in costs.items() if n.startswith("branch"))
        extra_flops = sum(c["flops"] - trunk["flops"] for n, c in costs.items() if n.startswith("branch"))
        gate_costs = part_costs(student, self.tap_path, {"gate": self.gate}, example)["gate"]
        costs["gated"] = {
            "tap": self.tap_path,
            "params": costs["student"]["params"] + extra_params + gate_costs["params"] - trunk["params"],
            "flops": costs["student"]["flops"] + extra_flops + gate_costs["flops"] - trunk["flops"],
        }
        return {"deployed": "student", "tap": self.tap_path, "branch": self.branch_kind, "costs": costs}
