"""Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu, CVPR 2018), https://arxiv.org/abs/1706.00384, and
large-scale codistillation (Anil et al., ICLR 2018, "Large scale distributed neural network training through
online distillation"), https://arxiv.org/abs/1804.03235.

A cohort of N >= 2 peers (the student is peer 0; peers 1..N-1 are the run's learning "teachers", built fresh
from ``peer_models`` or as copies of the student's architecture, each with its own initialization) trains
together, under ``scheme=online``. Peer k minimizes

    ce_weight * CE(z_k, y) + kl_weight * T^2 * mean_{j != k} KL(softmax(z_j / T) || softmax(z_k / T))

where the targets z_j are the other peers' current predictions, detached (DML), or, with ``stale_every`` = K
> 0, the predictions of frozen copies of the peers refreshed every K steps (codistillation: the copies stand
for the stale checkpoints exchanged between workers). Recommended: T = 1 and weights 1 / 1 (DML); Anil et al.
exchange checkpoints every few hundred to thousands of steps at scale, so try K of about one epoch here.
Every peer's accuracy is reported (``peer<k>/test/acc``) with the cohort's ensemble (``ensemble/test/acc``).
"""

import copy

import torch
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import AtLeastTwo, NonNegative, NonNegativeInt, Positive
from kd_lab.errors import KDLabError


class Codistillation(Algorithm):
    name = "codistillation"
    schemes = frozenset({"online"})
    task_kinds = frozenset({"classification", "language_modeling"})
    trains_teachers = True

    def __init__(
        self,
        peers: AtLeastTwo = 2,
        ce_weight: NonNegative = 1.0,
        kl_weight: NonNegative = 1.0,
        temperature: Positive = 1.0,
        stale_every: NonNegativeInt = 0,
    ):
        super().__init__(ce_weight)
        self.peers, self.kl_weight, self.temperature, self.stale_every = peers, kl_weight, temperature, stale_every
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # checkpointed: refreshes resume in phase
        # the same count on the host, read from the buffer once (and again after a load): no device sync per step
        self._host_steps: int | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_host_steps", None))

    def teacher_name(self, index: int) -> str:
        return f"peer{index + 1}"

    def bind_teachers(self, teachers: list[nn.Module]) -> None:
        if len(teachers) != self.peers - 1:
            raise KDLabError(
                f"algorithm.peers={self.peers} but {len(teachers) + 1} models were built; run codistillation with "
                "scheme=online, which builds the peers from algorithm.peer_models (or copies of the student)."
            )
        self._cohort = teachers  # a plain attribute: the module owns the peers

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self._student = [student]  # in a list, so the student is not registered twice

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        self.input_keys = (context.input_key, context.teacher_input_key)  # the student's, the peers'
        if self.stale_every:  # frozen copies: checkpointed and moved with the module, never optimized
            models = [self._student[0], *self._cohort]
            self.stale = nn.ModuleList(copy.deepcopy(m).requires_grad_(False) for m in models)

    @torch.no_grad()
    def _stale_logits(self, out: StepOutputs) -> list[Tensor]:
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        if self._host_steps % self.stale_every == 0:
            for copy_, live in zip(self.stale, [self._student[0], *self._cohort], strict=True):
                copy_.load_state_dict(live.state_dict())
        outs = []
        for i, model in enumerate(self.stale):
            model.eval()  # a checkpoint's predictions: inference mode (BN running statistics)
            outs.append(model(out.batch[self.input_keys[min(i, 1)]]))
        return outs

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        if not out.live_teacher_logits:
            raise KDLabError("algorithm=codistillation needs scheme=online: the peers learn together.")
        live = [out.logits, *out.live_teacher_logits]
        targets = self._stale_logits(out) if self.stale_every else [z.detach() for z in live]
        if self.training:
            self.steps += 1
            if self._host_steps is not None:
                self._host_steps += 1
        terms: dict[str, Tensor] = {}
        for k, z in enumerate(live):
            name = "" if k == 0 else f"{self.teacher_name(k - 1)}_"
            terms[f"{name}ce"] = self.ce_weight * out.label_loss(z)
            others = [kd_term(out, z, targets[j], self.temperature) for j in range(len(live)) if j != k]
            terms[f"{name}kl"] = self.kl_weight * torch.stack(others).mean()
        return terms
