"""Teacher-free KD (Yuan, Tay, Li, Wang, Feng, CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing
Regularization"), https://arxiv.org/abs/1909.11723. Reference code: yuanli2333/Teacher-free-Knowledge-Distillation.

The paper reads KD as a learned label smoothing, and replaces the trained teacher in two ways.

``tf_kd_reg``, the virtual teacher. A hand-designed distribution puts ``a`` on the correct class and
(1 - a) / (K - 1) on each other class. Its logits are log p^d, so at T = 1 it is exactly p^d:

    loss = ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(log p^d / T) || softmax(s / T))

This is the shared KD term (``soft_targets.kd_loss``) with the virtual teacher's logits. No model is trained or
run as a teacher, so it runs under ``scheme=self`` (the network teaches itself; no teacher config is built).
``form="code"`` computes the reference code's term instead: KL(softmax(p^d / T) || softmax(s)), the student at
T = 1 and no T^2. There the target is softmax of the *probabilities* over T, close to uniform at T = 20.

``tf_kd_self``, the self-teacher. The teacher is the student's own architecture, trained first on the labels; the
term is plain KD. The clean way here is a born-again chain of one generation: generation 0 is the student trained
with algorithm=none, then it teaches the run (``kd-lab chain=born_again algorithm=tf_kd_self``). The build refuses
a teacher whose architecture differs from the student's, since that is ordinary KD, not Tf-KD_self.

Defaults come from the reference code's CIFAR-100 ResNet-18 configs. Its KL is ``nn.KLDivLoss()``, a mean over
batch x classes, times a ``multiplier``. On our batch mean, that is the weight alpha * multiplier / K with K = 100:
  - reg (base_resnet18): reg_alpha 0.1, reg_temperature 20, multiplier 100, correct_prob 0.99:
    kd_weight 0.1, ce_weight 0.9, T 20, a 0.99.
  - self (resnet18_self_teacher): alpha 0.95, temperature 6, multiplier 50: kd_weight 0.95 * 50 / 100 = 0.475,
    ce_weight 0.05, T 6.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.soft_targets import kd_loss, kd_term
from kd_lab.core.bounds import NonNegative, Positive
from kd_lab.errors import KDLabError

FORMS = ("paper", "code")


def virtual_teacher_probs(target: Tensor, num_classes: int, correct_prob: float, dtype=None) -> Tensor:
    """(B,) labels -> (B, K) p^d: ``correct_prob`` on the label, the rest shared evenly by the other classes."""
    rest = (1.0 - correct_prob) / (num_classes - 1)
    probs = torch.full((len(target), num_classes), rest, dtype=dtype or torch.float32, device=target.device)
    return probs.scatter_(1, target[:, None], correct_prob)


def tf_kd_reg_loss(
    student_logits: Tensor, target: Tensor, correct_prob: float, temperature: float, form: str = "paper"
) -> Tensor:
    """The virtual teacher's KD term, batch mean (see the module docstring for the two forms)."""
    probs = virtual_teacher_probs(target, student_logits.shape[-1], correct_prob, student_logits.dtype)
    if form == "paper":
        return kd_loss(student_logits, probs.log(), temperature)
    log_q = F.log_softmax(probs / temperature, dim=-1)
    return F.kl_div(F.log_softmax(student_logits, dim=-1), log_q, reduction="batchmean", log_target=True)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise KDLabError(
            f"algorithm.form={form!r} is not a Tf-KD_reg form; pick 'paper' (the KD term against log p^d at "
            "temperature T) or 'code' (the reference code's softmax(p^d / T) target), e.g. algorithm.form=paper."
        )


class TfKDReg(Algorithm):
    name = "tf_kd_reg"
    # No teacher model exists: under scheme=self no teacher config is built or trained (offline would train
    # and cache a teacher that the loss never reads).
    schemes = frozenset({"self"})
    needs_teacher = False

    def __init__(
        self,
        ce_weight: NonNegative = 0.9,
        kd_weight: NonNegative = 0.1,
        temperature: Positive = 20.0,
        correct_prob: Positive = 0.99,
        form: str = "paper",
    ):
        super().__init__(ce_weight)
        _check_form(form)
        if not 0 < correct_prob < 1:
            raise KDLabError(
                f"algorithm.correct_prob={correct_prob} must be in (0, 1): it is the virtual teacher's probability "
                "of the correct class, and 1 leaves log 0 on the others; set e.g. algorithm.correct_prob=0.99."
            )
        self.kd_weight, self.temperature, self.correct_prob, self.form = kd_weight, temperature, correct_prob, form

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        k = context.task.num_classes
        if self.correct_prob <= 1 / k:
            raise KDLabError(
                f"algorithm.correct_prob={self.correct_prob} is not above 1/K = {1 / k:.4g} for the data's {k} "
                "classes, so the virtual teacher does not prefer the correct class; set it above, e.g. "
                "algorithm.correct_prob=0.99."
            )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        loss = tf_kd_reg_loss(out.logits, out.target, self.correct_prob, self.temperature, self.form)
        terms["kd_reg"] = self.kd_weight * loss
        return terms


def architecture_difference(student: nn.Module, teacher: nn.Module) -> str | None:
    """Why two models are not one architecture (class, then parameter and buffer names and shapes), or None."""
    if type(student) is not type(teacher):
        return f"the student's class is {type(student).__name__} and the teacher's is {type(teacher).__name__}"
    s = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    t = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    for key in sorted(s.keys() | t.keys()):
        if s.get(key) != t.get(key):
            return f"'{key}' has shape {s.get(key)} in the student and {t.get(key)} in the teacher"
    return None


class TfKDSelf(Algorithm):
    name = "tf_kd_self"
    schemes = frozenset({"offline"})

    def __init__(self, ce_weight: NonNegative = 0.05, kd_weight: NonNegative = 0.475, temperature: Positive = 6.0):
        super().__init__(ce_weight)
        self.kd_weight, self.temperature = kd_weight, temperature

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        why = architecture_difference(student, teacher) if teacher is not None else None
        if why:
            raise KDLabError(
                f"algorithm=tf_kd_self needs a teacher of the student's own architecture, but {why}. Run it as a "
                "born-again chain, where generation 0 is the student trained on the labels: kd-lab "
                "chain=born_again algorithm=tf_kd_self; or use algorithm=kd for a different teacher."
            )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        terms["kd"] = self.kd_weight * kd_term(out, out.logits, out.teacher_logits, self.temperature)
        return terms


__all__ = ["TfKDReg", "TfKDSelf", "architecture_difference", "tf_kd_reg_loss", "virtual_teacher_probs"]
