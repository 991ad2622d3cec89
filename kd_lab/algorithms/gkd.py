"""On-policy distillation: generalized knowledge distillation, GKD (Agarwal et al., ICLR 2024, arXiv:2306.13649).

With probability ``lam`` a training batch is replaced by the student's own samples: the student continues the
first ``prompt_length`` tokens of each block (KV-cache sampling at ``student_temperature``, no gradient through
the sampling). Then the token-level divergence between teacher and student is taken on that batch:

    loss = sum over continuation tokens of D(p_T, p_S) / continuation tokens

``divergence``: any of kd_lab/losses/divergences.py (forward_kl, reverse_kl, jsd with ``beta``, tvd, ...).
``lam=1`` with reverse_kl is the fully on-policy recipe; ``lam=0`` is supervised KD on the real continuations.
Both kinds of batch score the same positions (the continuation), so only the data changes with ``lam``.

Reproducible draws: the coin and the samples come from one generator seeded by (seed, epoch, batch of the
epoch), so a run repeats exactly and does not depend on what else drew random numbers.
"""

import hashlib

import torch
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.seq_kd import check_causal, check_prompt_length, continuation_targets
from kd_lab.core.bounds import AtLeastOne, BelowOne, Positive, UnitInterval
from kd_lab.core.tasks.language_modeling import IGNORE_INDEX, global_count
from kd_lab.lm.generation import sample
from kd_lab.losses.divergences import check_divergence, token_divergence

ON_POLICY = "gkd_on_policy"  # batch key: True on a batch of the student's own samples


def draw_seed(seed: int, epoch: int, batch: int) -> int:
    """A 63-bit seed from (seed, epoch, batch): nearby triples give unrelated streams."""
    digest = hashlib.sha256(f"gkd|{seed}|{epoch}|{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class GKD(Algorithm):
    name = "gkd"
    schemes = frozenset({"offline"})
    task_kinds = frozenset({"language_modeling"})
    # batches of student samples: stored teacher outputs of the real blocks do not apply
    synthesizes_inputs = True

    def __init__(
        self,
        lam: UnitInterval = 1.0,
        divergence: str = "jsd",
        beta: UnitInterval = 0.5,
        alpha: BelowOne = 0.1,
        temperature: Positive = 1.0,
        student_temperature: Positive = 1.0,
        top_k: AtLeastOne | None = None,
        prompt_length: AtLeastOne = 16,
        kd_weight: Positive = 1.0,
        seed: int = 0,
    ):
        super().__init__(ce_weight=0.0)  # GKD trains on the divergence alone
        check_divergence(divergence)
        self.lam, self.divergence, self.beta, self.alpha = lam, divergence, beta, alpha
        self.temperature, self.student_temperature, self.top_k = temperature, student_temperature, top_k
        self.prompt_length, self.kd_weight, self.seed = prompt_length, kd_weight, seed
        self.epoch, self.batch_in_epoch = 0, 0
        self.on_policy_batches, self.batches = 0, 0

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        check_causal(teacher, "teacher", self.name)
        check_causal(student, "student", self.name)
        # not an attribute: nn.Module would register the student as a submodule (its parameters twice)
        self.__dict__["_student"] = student

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        self.length = check_prompt_length(self.prompt_length, context, self.name)

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:
        self.epoch, self.batch_in_epoch = epoch, 0

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["input"]
        generator = torch.Generator(x.device).manual_seed(draw_seed(self.seed, self.epoch, self.batch_in_epoch))
        self.batch_in_epoch += 1
        self.batches += 1
        on_policy = bool(torch.rand((), generator=generator, device=x.device) < self.lam)
        if not on_policy:
            target = batch["target"].clone()
            target[:, : self.prompt_length - 1] = IGNORE_INDEX  # the same positions as an on-policy batch
            return {**batch, "target": target, ON_POLICY: torch.zeros((), dtype=torch.bool, device=x.device)}
        self.on_policy_batches += 1
        new_tokens = x.shape[1] - self.prompt_length
        student, prompts = self.__dict__["_student"], x[:, : self.prompt_length]
        ids = sample(student, prompts, new_tokens, self.student_temperature, self.top_k, generator)
        ids = ids.clone()  # out of inference mode: the student's forward on it needs autograd
        target = continuation_targets(ids, self.prompt_length)
        return {**batch, "input": ids, "target": target, ON_POLICY: torch.ones((), dtype=torch.bool, device=x.device)}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        mask = out.batch["target"] != IGNORE_INDEX
        total = token_divergence(
            out.logits.flatten(0, -2),
            out.teacher_logits.flatten(0, -2),
            self.divergence,
            mask=mask.flatten(),
            temperature=self.temperature,
            beta=self.beta,
            alpha=self.alpha,
        )
        return {self.divergence: self.kd_weight * total / global_count(mask.sum()).clamp(min=1)}

    def report(self, student: nn.Module, example: Tensor) -> dict:
        """How many training batches were the student's own samples (about lam of them)."""
        return {"on_policy_batches": self.on_policy_batches, "batches": self.batches}
