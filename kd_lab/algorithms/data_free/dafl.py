"""DAFL: Data-Free Learning of Student Networks (Chen et al., ICCV 2019), https://arxiv.org/abs/1904.01186
Reference code: huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL/DAFL-train.py.

A generator G turns noise z into inputs that the frozen teacher T finds typical of its training data, and the
student learns from T on them. Every step, on one batch x = G(z):
    generator: onehot_weight * CE(T(x), argmax T(x))                 (confident teacher outputs)
             + entropy_weight * sum_k pbar_k log10 pbar_k            (pbar = batch mean of softmax T(x):
                                                                      balanced classes; log10 as the code)
             - activation_weight * mean |f_T(x)|                     (f_T: the teacher's penultimate features)
    student:   kd_weight * T^2 * KL(softmax(T(x) / T) || softmax(S(x) / T)) on x detached
Both players take one step per training step (``Adversary`` steps=1, every=1), on the same x, as the code.

Paper and code (MNIST): weights 1 / 5 / 0.1, KL at T = 1, latent 100, Adam for G at lr 0.2 and for the
student at 2e-3, batch 512. Here: the same weights and latent size; the student uses the run's optimizer
(AdamW 2e-3: the paper's MNIST rate); the batch is data.batch_size. G's lr: see conf/algorithm/dafl.yaml.
The paper writes the information entropy with log; its code uses log10 (5 x log10 = 2.17 x ln), kept here.
"""

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Adversary, BuildContext, StepOutputs
from kd_lab.algorithms.data_free.generator import DataFreeAlgorithm, Generator, GeneratorClock
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import AtLeastOne, NonNegative, Positive
from kd_lab.core.outputs import logits_of
from kd_lab.core.recorder import FeatureRecorder, resolve_tap


def onehot_loss(teacher_logits: Tensor) -> Tensor:
    """CE of the teacher's logits to its own argmax: small when the teacher is confident."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(1).detach())


def info_entropy_loss(teacher_logits: Tensor) -> Tensor:
    """sum_k pbar_k log10 pbar_k, pbar the batch mean of the teacher's softmax: lowest for balanced classes."""
    pbar = F.softmax(teacher_logits, dim=1).mean(0)
    return (pbar * torch.log10(pbar)).sum()


def activation_loss(teacher_features: Tensor) -> Tensor:
    """-mean |f|: large activations of the teacher's penultimate features (real inputs excite them)."""
    return -teacher_features.abs().mean()


class DAFL(DataFreeAlgorithm):
    name = "dafl"

    def __init__(
        self,
        ce_weight: NonNegative = 0.0,
        kd_weight: NonNegative = 1.0,
        temperature: Positive = 1.0,
        onehot_weight: NonNegative = 1.0,
        entropy_weight: NonNegative = 5.0,
        activation_weight: NonNegative = 0.1,
        latent_dim: AtLeastOne = 100,
        hidden: AtLeastOne = 128,
        lr: Positive = 0.2,
    ):
        super().__init__(ce_weight)
        self.kd_weight, self.temperature = kd_weight, temperature
        self.weights = (onehot_weight, entropy_weight, activation_weight)
        self.latent_dim, self.hidden, self.lr = latent_dim, hidden, lr
        self.clock = GeneratorClock()
        self._made: Tensor | None = None  # this step's G(z), with its graph, for the generator's loss

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().bind(student, teacher)
        self.embedding_path = resolve_tap(teacher, "embedding", "teacher")
        self.embedding = FeatureRecorder(teacher, [self.embedding_path], "teacher")

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        self.check_data(context)
        self.generator = Generator(context.input_shape, self.latent_dim, self.hidden, bounded=True)

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["input"]
        start = time.perf_counter()
        z = torch.randn(x.shape[0], self.latent_dim, device=x.device)
        self._made = self.generator(z)
        self.clock.seconds += time.perf_counter() - start
        self.synthetic_samples += x.shape[0]
        return self.synthetic_batch(batch, self._made.detach())

    def adversary(self) -> Adversary:
        def make_optimizer(params):
            optimizer = torch.optim.Adam(params, lr=self.lr)
            optimizer.register_step_post_hook(self.clock.stop)
            return optimizer

        return Adversary(self.generator, make_optimizer, self.generator_loss, steps=1, every=1)

    def generator_loss(self, out: StepOutputs) -> dict[str, Tensor]:
        """The generator's terms on this step's x = G(z), through the frozen teacher (gradients reach G only)."""
        self.clock.start()
        with self.embedding:
            logits = logits_of(self.teacher_model(self._made), "teacher")
        features = self.embedding.features[self.embedding_path]
        w_oh, w_ie, w_a = self.weights
        return {
            "onehot": w_oh * onehot_loss(logits),
            "info_entropy": w_ie * info_entropy_loss(logits),
            "activation": w_a * activation_loss(features),
        }

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        return {"kd": self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)}

    def report(self, student: nn.Module, example: Tensor) -> dict:
        self.synthesis_seconds = self.clock.seconds
        return super().report(student, example)
