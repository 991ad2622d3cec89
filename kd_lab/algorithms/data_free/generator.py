"""What the data-free methods share: a generator of inputs from noise, and the base class that swaps the real
training inputs for synthetic ones.

The real training set is only a clock here: it sets how many steps an epoch has and the batch size. The
student never sees a real training input, and no real label is used: ``training_batch`` returns a batch of
synthetic inputs with no ``target`` (so a term that reached for a label would fail loudly), and
``ce_weight`` must be 0. Validation and test use the real validation and test sets, as the papers do.

The generator follows DAFL's DCGAN-style generator (Chen et al. 2019), also used by Zero-shot KT: a linear
layer to a quarter-size map, two (upsample, conv, BN, LeakyReLU) stages, a last conv to the input's
channels, then a BatchNorm without affine parameters (inputs of zero mean, unit variance per channel).
It is built for 1-D signals (C, L) with ``Conv1d`` and for images (C, H, W) with ``Conv2d``, from the data's
example input shape.
"""

import math
import time

from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext
from kd_lab.core.bounds import NonNegative
from kd_lab.errors import KDLabError

_LAYERS = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}


class Generator(nn.Module):
    """Noise (B, latent_dim) -> inputs (B, *input_shape), for 1-D (C, L) or 2-D (C, H, W) inputs."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int = 100, hidden: int = 128, bounded: bool = True):
        super().__init__()
        spatial = tuple(input_shape[1:])
        if len(spatial) not in _LAYERS:
            raise KDLabError(
                f"the data-free generator makes 1-D signals (C, L) or images (C, H, W), but one input of this data "
                f"has shape {tuple(input_shape)}. Pick data with such inputs, or a method that reads the real data."
            )
        conv, norm = _LAYERS[len(spatial)]
        channels = input_shape[0]
        self.latent_dim, self.hidden = latent_dim, hidden
        self.base = tuple(max(1, math.ceil(s / 4)) for s in spatial)  # two x2 upsamplings reach the input size
        half = tuple(max(1, math.ceil(s / 2)) for s in spatial)
        self.project = nn.Linear(latent_dim, hidden * math.prod(self.base))
        layers: list[nn.Module] = [
            norm(hidden),
            nn.Upsample(size=half),
            conv(hidden, hidden, 3, padding=1),
            norm(hidden, eps=0.8),  # DAFL's eps
            nn.LeakyReLU(0.2),
            nn.Upsample(size=spatial),
            conv(hidden, hidden // 2, 3, padding=1),
            norm(hidden // 2, eps=0.8),
            nn.LeakyReLU(0.2),
            conv(hidden // 2, channels, 3, padding=1),
        ]
        if bounded:  # DAFL squashes the output before the last normalization; Zero-shot KT does not
            layers.append(nn.Tanh())
        layers.append(norm(channels, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.project(z).view(z.shape[0], self.hidden, *self.base))


class GeneratorClock:
    """Wall time of the generator's updates: from the start of its loss to the end of its optimizer step
    (forward, backward and step), through a post-step hook on its optimizer."""

    def __init__(self):
        self.seconds = 0.0
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, *_args) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


class DataFreeAlgorithm(Algorithm):
    """An algorithm that trains the student on synthetic inputs only (``synthesizes_inputs``).

    ``bind`` keeps references to the student and the teacher without registering them (they are the
    run's models: their parameters must not appear twice, and a frozen teacher stays out of the state dict).
    """

    synthesizes_inputs = True
    schemes = frozenset({"offline"})  # a frozen teacher: the synthetic inputs are made against it

    def __init__(self, ce_weight: NonNegative = 0.0):
        super().__init__(ce_weight)  # checked at build time (``bind``): no label term is ever computed
        self.synthetic_samples = 0  # inputs made so far (results.json)
        self.synthesis_seconds = 0.0

    # -- the run's models, held but not registered ------------------------------------------------------
    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if self.ce_weight:
            raise KDLabError(
                f"algorithm.ce_weight={self.ce_weight}, but algorithm={self.name} is data-free: the student trains "
                "on synthetic inputs and never sees a real label. Set algorithm.ce_weight=0."
            )
        self.__dict__["_student"] = student
        self.__dict__["_teacher"] = teacher

    @property
    def student_model(self) -> nn.Module:
        return self.__dict__["_student"]

    @property
    def teacher_model(self) -> nn.Module:
        return self.__dict__["_teacher"]

    def check_data(self, context: BuildContext) -> None:
        """Refuse data a synthetic input cannot stand in for; called by each method's ``build``."""
        if context.paired_inputs:
            raise KDLabError(
                f"algorithm={self.name} makes one synthetic input for both models, but this data gives the teacher "
                f"'{context.teacher_input_key}' and the student '{context.input_key}' (cross-modal data). Use data "
                "with one input (e.g. data=mnist1d), or algorithm=cross_modal."
            )

    def synthetic_batch(self, batch: dict[str, Tensor], inputs: Tensor) -> dict[str, Tensor]:
        """The batch a training step sees: the synthetic inputs and the sample indices only (no label)."""
        return {"input": inputs, "index": batch["index"]}

    def report(self, student: nn.Module, example: Tensor) -> dict:
        return {
            "synthetic_samples": int(self.synthetic_samples),
            "synthesis_seconds": round(float(self.synthesis_seconds), 3),
        }
