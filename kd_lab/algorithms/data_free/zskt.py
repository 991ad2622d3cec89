"""Zero-shot Knowledge Transfer via Adversarial Belief Matching (Micaelli & Storkey, NeurIPS 2019),
https://arxiv.org/abs/1905.09768. Reference code: polo5/ZeroShotKnowledgeTransfer (solver.py).

A generator G and the student S play a game on x = G(z) against the frozen teacher T:
    generator: maximize KL(T(x) || S(x))                   (inputs where the student disagrees)
    student:   kd_weight * KL(T(x) || S(x)) + at_weight * sum_pairs mean((A(f_S) - A(f_T))^2)
with A the attention map of kd_lab/algorithms/attention.py (L2-normalized mean over channels of f^2), on
the stages of both networks paired by depth. One noise batch z serves a cycle of ``student_steps`` steps:
at its first step G takes ``generator_steps`` updates on x = G(z) (``Adversary`` steps / every), then the
student trains on G(z) for ``student_steps`` steps.

Against the code: there a cycle is 1 generator step then n_s student steps on G(z) made after that update.
Here the step's inputs are made before the generator's update (the module steps the adversary inside the
training step), so the cycle's first student step sees G(z) from before the update; the next
``student_steps - 1`` see G(z) remade after it, as the code. The code clips G's gradient norm at 5;
here the run's trainer.gradient_clip_val applies to both players.

Paper and code: n_g = 1, n_s = 10, latent 100, Adam lr 1e-3 for G and 2e-3 for the student (the run's
optimizer here), KL at T = 1, beta 250. The code's KL is an element-wise mean (KL / K, K classes), ours the
true KL, so the paper's beta is 250 K = 2500 in our units (K = 10). Its attention maps have 1024/256/64
positions (CIFAR), MNIST-1D's 40/20/10, and the per-pair term goes as 1 / positions: about 25x larger here.
The default at_weight 100 = 2500 / 25.
"""

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.attention import _stage_paths, at_loss, pair_by_depth
from kd_lab.algorithms.base import Adversary, BuildContext, StepOutputs
from kd_lab.algorithms.data_free.generator import DataFreeAlgorithm, Generator, GeneratorClock
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import AtLeastOne, NonNegative, Positive
from kd_lab.core.outputs import logits_of
from kd_lab.errors import KDLabError


def disagreement(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)), batch mean (the generator maximizes it)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


class ZSKT(DataFreeAlgorithm):
    name = "zskt"

    def __init__(
        self,
        ce_weight: NonNegative = 0.0,
        kd_weight: NonNegative = 1.0,
        temperature: Positive = 1.0,
        at_weight: NonNegative = 100.0,
        latent_dim: AtLeastOne = 100,
        hidden: AtLeastOne = 128,
        lr: Positive = 1e-3,
        generator_steps: AtLeastOne = 1,
        student_steps: AtLeastOne = 10,
    ):
        super().__init__(ce_weight)
        self.kd_weight, self.temperature, self.at_weight = kd_weight, temperature, at_weight
        self.latent_dim, self.hidden, self.lr = latent_dim, hidden, lr
        self.generator_steps, self.student_steps = generator_steps, student_steps
        self.pairs: list[tuple[str, str]] = []
        self.clock = GeneratorClock()
        self._position = 0  # the step's place in its cycle of student_steps steps (reset every epoch)
        self._z: Tensor | None = None
        self._made: Tensor | None = None  # G(z) with its graph, at the first step of a cycle
        self._served: Tensor | None = None  # what the cycle's steps train on

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().bind(student, teacher)
        if self.at_weight:
            s_paths, t_paths = _stage_paths(student, None, "student"), _stage_paths(teacher, None, "teacher")
            self.pairs = [(s_paths[i], t_paths[j]) for i, j in pair_by_depth(len(s_paths), len(t_paths))]

    @property
    def student_taps(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.pairs))

    @property
    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(t for _, t in self.pairs))

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        self.check_data(context)
        for s_path, t_path in self.pairs:
            sides = (("student", s_path, student_shapes[s_path]), ("teacher", t_path, teacher_shapes[t_path]))
            for role, path, shape in sides:
                if len(shape) < 3:
                    raise KDLabError(
                        f"algorithm=zskt: its attention terms need feature maps (B, C, L) or (B, C, H, W) on both "
                        f"sides, but the {role} stage '{path}' gives {tuple(shape)} (vectors, as an MLP's). Set "
                        "algorithm.at_weight=0 (the KL term alone), or use a convolutional student."
                    )
            if len(student_shapes[s_path]) != len(teacher_shapes[t_path]):
                raise KDLabError(
                    f"algorithm=zskt cannot compare the student's map '{s_path}' {tuple(student_shapes[s_path])} "
                    f"with the teacher's '{t_path}' {tuple(teacher_shapes[t_path])} (other spatial ranks); set "
                    "algorithm.at_weight=0."
                )
        self.generator = Generator(context.input_shape, self.latent_dim, self.hidden, bounded=False)

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:
        self._position = 0  # the module counts its adversary's cycles by the batch index of the epoch

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["input"]
        start = time.perf_counter()
        position, self._position = self._position % self.student_steps, self._position + 1
        if position == 0 or self._served is None or self._served.shape[0] != x.shape[0]:
            self._z = torch.randn(x.shape[0], self.latent_dim, device=x.device)
            self._made = self.generator(self._z)  # the generator's loss backpropagates through this graph
            self._served = self._made.detach()
            self.synthetic_samples += x.shape[0]
        elif position == 1:  # the generator has been updated: the rest of the cycle trains on its new output
            self._made = None
            with torch.no_grad():
                self._served = self.generator(self._z)
            self.synthetic_samples += x.shape[0]
        self.clock.seconds += time.perf_counter() - start
        return self.synthetic_batch(batch, self._served)

    def adversary(self) -> Adversary:
        def make_optimizer(params):
            optimizer = torch.optim.Adam(params, lr=self.lr)
            optimizer.register_step_post_hook(self.clock.stop)
            return optimizer

        return Adversary(self.generator, make_optimizer, self.generator_loss, self.generator_steps, self.student_steps)

    def generator_loss(self, out: StepOutputs) -> dict[str, Tensor]:
        """-KL(T || S) on x = G(z): the teacher is frozen and the student's gradients are cleared before its own
        step, so only the generator learns from it. A second update in one cycle remakes x with the new G."""
        self.clock.start()
        x = self._made if self._made is not None else self.generator(self._z)
        self._made = None  # a graph serves one backward
        teacher = logits_of(self.teacher_model(x), "teacher")
        student = logits_of(self.student_model(x), "student")
        return {"generator_kl": -disagreement(student, teacher, self.temperature)}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = {"kd": self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)}
        if self.pairs:
            losses = [at_loss(out.features[s], out.teacher_features[t].detach()) for s, t in self.pairs]
            terms["at"] = self.at_weight * torch.stack(losses).sum()
        return terms

    def report(self, student: nn.Module, example: Tensor) -> dict:
        self.synthesis_seconds = self.clock.seconds
        return super().report(student, example)
