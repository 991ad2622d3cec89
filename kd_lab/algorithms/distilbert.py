"""DistilBERT's triple loss (Sanh, Debut, Chaumond, Wolf 2019, arXiv:1910.01108), and its causal form
(DistilGPT2) on a causal task. On ``task=sequence_classification`` it is the paper's task-specific
distillation: the soft targets are the class logits, the label loss is CE, the cosine term the last hidden
states of the real (non-pad) tokens.

    loss = alpha_ce * T^2 * KL(p_T^T || p_S^T)       soft targets, summed over tokens / tokens counted
         + alpha_mlm * CE(s, y)                      the task's label loss: MLM CE, or CLM CE on a causal task
         + alpha_cos * mean_tokens (1 - cos(h_S, h_T))  the last hidden states, which need the same width

The reference (huggingface/transformers, examples/research_projects/distillation/distiller.py) computes the
soft-target KL on every real token by default, not only the masked ones (``--restrict_ce_to_mask`` is off):
``kd_positions: all``. ``valid`` keeps only the positions the task predicts (masked ones for MLM).
The last hidden state is what the model returns as ``hidden_states[-1]``: after the final norm for GPT-2
(``transformer.ln_f``) and Llama (``model.norm``), the last block's output for BERT.
DistilBERT's student starts from every other teacher layer: set ``student.init_from_teacher=every_other``.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.core.bounds import NonNegative, Positive
from kd_lab.core.recorder import block_paths
from kd_lab.errors import KDLabError
from kd_lab.losses.divergences import token_divergence

POSITIONS = ("all", "valid")
# The module whose output is the model's hidden_states[-1], where it is not the last block.
FINAL_NORMS = ("transformer.ln_f", "model.norm")


def last_hidden_path(model: nn.Module, role: str = "model") -> str:
    """The module path whose output is the model's last hidden state (``hidden_states[-1]``)."""
    names = dict(model.named_modules())
    for path in FINAL_NORMS:
        if path in names:
            return path
    blocks = block_paths(model)
    if not blocks:
        raise KDLabError(
            f"algorithm=distilbert: the {role} ({type(model).__name__}) has no transformer blocks to take the last "
            "hidden state from; use a GPT-2, BERT or Llama model (kd_lab.models.hf)."
        )
    return blocks[-1]


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the tokens where ``mask`` is true of 1 - cos(h_S, h_T) (CosineEmbeddingLoss with target 1)."""
    s, t = student_hidden.flatten(0, -2), teacher_hidden.flatten(0, -2)
    if mask is not None:
        s, t = s[mask.flatten()], t[mask.flatten()]
    if s.shape[0] == 0:
        return s.sum() * 0.0  # no token counted: a zero that keeps the graph
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


class DistilBERT(Algorithm):
    name = "distilbert"
    schemes = frozenset({"offline"})
    task_kinds = frozenset({"language_modeling", "sequence_classification"})

    def __init__(
        self,
        alpha_ce: NonNegative = 5.0,
        alpha_mlm: NonNegative = 2.0,
        alpha_cos: NonNegative = 1.0,
        temperature: Positive = 2.0,
        kd_positions: str = "all",
    ):
        super().__init__(ce_weight=alpha_mlm)  # the label loss is the base class's ce term
        if kd_positions not in POSITIONS:
            raise KDLabError(
                f"algorithm.kd_positions={kd_positions!r} is not one of {list(POSITIONS)}: 'all' is every token "
                "(the reference's default), 'valid' only the positions the task predicts."
            )
        self.alpha_ce, self.alpha_cos, self.temperature = alpha_ce, alpha_cos, temperature
        self.kd_positions = kd_positions
        self.paths = ("", "")
        self.pad_token_id: int | None = None

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.paths = (last_hidden_path(student, "student"), last_hidden_path(teacher, "teacher"))
        self.pad_token_id = getattr(getattr(student, "config", None), "pad_token_id", None)

    @property
    def student_taps(self) -> list[str]:
        return [self.paths[0]] if self.alpha_cos else []

    @property
    def teacher_taps(self) -> list[str]:
        return [self.paths[1]] if self.alpha_cos else []

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        if not self.alpha_cos:
            return
        s, t = student_shapes[self.paths[0]], teacher_shapes[self.paths[1]]
        if s[-1] != t[-1]:
            raise KDLabError(
                f"algorithm=distilbert's cosine term compares the last hidden states, but the student's is "
                f"{s[-1]} wide and the teacher's {t[-1]}. Give the student the teacher's hidden size, set "
                "algorithm.alpha_cos=0, or use algorithm=fitnet or tinybert, which learn a projection."
            )

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        terms = self.ce_term(out)
        if self.kd_positions == "valid":
            mask, count = out.positions()
        else:
            mask, count = None, out.logits[..., 0].numel()  # every output position: tokens, or samples
        if self.alpha_ce:
            kl = token_divergence(
                out.logits.flatten(0, -2),
                out.teacher_logits.flatten(0, -2),
                "forward_kl",
                mask=None if mask is None else mask.flatten(),
                temperature=self.temperature,
            )
            terms["kd"] = self.alpha_ce * kl / count
        if self.alpha_cos:
            student_hidden = out.features[self.paths[0]]
            teacher_hidden = out.teacher_features[self.paths[1]].detach()
            terms["cos"] = self.alpha_cos * cosine_loss(student_hidden, teacher_hidden, self._hidden_mask(out, mask))
        return terms

    def _hidden_mask(self, out: StepOutputs, mask: Tensor | None) -> Tensor | None:
        """The tokens whose hidden states count. A token task's outputs are its tokens; a classifier has one
        output per sequence, so its real tokens are the non-pad ones."""
        if out.logits.dim() == 3 or self.pad_token_id is None:
            return mask
        return out.batch["input"] != self.pad_token_id
