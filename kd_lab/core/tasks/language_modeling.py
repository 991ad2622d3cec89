"""Language modeling: a token id per position, logits of shape (B, T, V); causal (next token) or masked.

The batch's ``target`` holds the id each position must predict, or ``ignore_index`` (-100) where nothing is
predicted (masked LM: the unmasked positions). Every token-level loss is a sum over valid tokens divided by
the number of valid tokens of the *global* batch (``token_normalizer``): under DDP each rank divides by the
global count over the world size, so averaged gradients equal those of one process on the whole batch.
Causal LM on packed blocks has the same count in every batch, so gradient accumulation over k batches of b
equals one batch of k * b exactly; masked LM counts vary a little from batch to batch (docs/language-models.md).

Metrics: perplexity of each model (``val/ppl``, monitored, lower is better; ``test/ppl``), and on the test set
the teacher's perplexity, top-1 token agreement with the teacher and the mean per-token KL(teacher || student).
After testing, ``report`` measures generation speed of student and teacher and the speculative-decoding
acceptance rate of the student as a draft for the teacher (causal LM only).
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import Perplexity

from kd_lab.core.tasks.base import Task
from kd_lab.errors import KDLabError

IGNORE_INDEX = -100


def global_count(local: Tensor) -> Tensor:
    """The sum of ``local`` over DDP ranks divided by the world size (itself in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = local.detach().clone()
        dist.all_reduce(total)
        return total / dist.get_world_size()
    return local.detach()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


def check_tokenizer(model: nn.Module, datamodule, role: str) -> None:
    """Refuse a model loaded from a directory that holds a tokenizer other than the data's: token ids would
    mean other strings, and no slicing of logits can fix that."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    data_tokenizer = getattr(datamodule, "tokenizer", None)
    if not source or data_tokenizer is None or not Path(source).is_dir():
        return
    if not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return
    from kd_lab.data.text.tokenizer import load_pretrained

    theirs = load_pretrained(source)
    if theirs.fingerprint != data_tokenizer.fingerprint:
        raise KDLabError(
            f"the {role} was saved with its own tokenizer ({source}), which differs from the data's "
            f"({data_tokenizer.source}): the same ids mean other tokens. Use it for the data too "
            f"(data.tokenizer={source}); teachers and students with different tokenizers need cross-tokenizer "
            "methods (ULD, MinED), which kd-lab does not have."
        )


class LanguageModeling(Task):
    name = kind = "language_modeling"

    def __init__(
        self,
        vocab_size: int,
        objective: str = "causal",
        monitor: str = "ppl",
        mode: str = "min",
        headline: str = "ppl",
        prompts: int = 8,
        prompt_length: int = 16,
        new_tokens: int = 32,
        draft_tokens: int = 4,
    ):
        """``vocab_size``: the tokenizer's. A model whose vocabulary is padded beyond it is sliced to it
        (exact: no token id reaches the padding rows). ``prompts``, ``prompt_length``, ``new_tokens``,
        ``draft_tokens``: the generation report (test prompts, tokens generated, the draft's lookahead)."""
        super().__init__(monitor, mode, headline)
        if objective not in ("causal", "masked"):
            raise KDLabError(f"task.objective={objective!r} must be 'causal' or 'masked' (as data.objective).")
        self.vocab_size, self.objective = vocab_size, objective
        self._normalized: tuple[Tensor, Tensor] | None = None  # (the batch's targets, their normalizer)
        self.prompts, self.prompt_length, self.new_tokens, self.draft_tokens = (
            prompts,
            prompt_length,
            new_tokens,
            draft_tokens,
        )

    # -- training --------------------------------------------------------------------------------------
    def valid_positions(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["target"] != IGNORE_INDEX

    def token_normalizer(self, batch: dict[str, Tensor]) -> Tensor:
        """What a sum over this batch's valid tokens is divided by: the global batch's valid tokens per rank.
        Computed once per batch (one all_reduce under DDP), however many terms divide by it."""
        target = batch["target"]
        if self._normalized is None or self._normalized[0] is not target:
            self._normalized = (target, global_count(self.valid_positions(batch).sum()).clamp(min=1))
        return self._normalized[1]

    def label_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        ce = F.cross_entropy(logits.flatten(0, -2).float(), batch["target"].flatten(), reduction="sum")
        return ce / self.token_normalizer(batch)

    def batch_weight(self, batch: dict[str, Tensor]) -> int:
        return int(self.valid_positions(batch).sum())

    def output_view(self, logits: Tensor) -> Tensor:
        return logits[..., : self.vocab_size] if logits.shape[-1] > self.vocab_size else logits

    # -- checks before compute -------------------------------------------------------------------------
    def check_model(self, model: nn.Module, datamodule, role: str) -> None:
        config = getattr(model, "config", None)
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        check_positions = getattr(datamodule, "check_model_positions", None)
        if positions and check_positions:
            check_positions(int(positions))
        if positions and self.objective == "causal" and self.prompt_length + self.new_tokens > positions:
            raise KDLabError(
                f"task.prompt_length={self.prompt_length} + task.new_tokens={self.new_tokens} exceed the {role}'s "
                f"{positions} positions, so the generation report after training could not run; lower them "
                f"(e.g. task.new_tokens={max(1, int(positions) - self.prompt_length)})."
            )
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and vocab < self.vocab_size:  # before any forward: its embedding would fail first
            raise self.vocabulary_error(role, vocab)
        check_tokenizer(model, datamodule, role)

    def check_output(self, logits: Tensor, role: str) -> None:
        if logits.dim() != 3:
            raise KDLabError(
                f"the {role} outputs shape {tuple(logits.shape)}, but language modeling needs logits of shape "
                "(batch, tokens, vocabulary): use a language model (kd_lab.models.hf.causal_lm or masked_lm)."
            )
        if logits.shape[-1] < self.vocab_size:
            raise self.vocabulary_error(role, logits.shape[-1])

    def vocabulary_error(self, role: str, vocab: int) -> KDLabError:
        return KDLabError(
            f"the {role} predicts {vocab} tokens but the tokenizer has {self.vocab_size}: the model "
            "was made for another tokenizer. Build it with vocab_size=${data.vocab_size}, or load its own "
            "tokenizer (data.tokenizer=<its directory>); teachers and students with different tokenizers "
            "need cross-tokenizer methods (ULD, MinED), which kd-lab does not have."
        )

    # -- evaluation ------------------------------------------------------------------------------------
    def student_metrics(self) -> dict[str, Metric]:
        return {"ppl": Perplexity(ignore_index=IGNORE_INDEX)}

    def update_student(self, metrics: nn.ModuleDict, logits: Tensor, batch: dict[str, Tensor]) -> None:
        metrics["ppl"].update(logits.float(), batch["target"])

    def teacher_metrics(self) -> dict[str, Metric]:
        return {
            "teacher_ppl": Perplexity(ignore_index=IGNORE_INDEX),
            "agreement": MeanMetric(),
            "kl_to_teacher": MeanMetric(),
        }

    def update_teacher(
        self, metrics: nn.ModuleDict, logits: Tensor, teacher_logits: Tensor, batch: dict[str, Tensor]
    ) -> None:
        metrics["teacher_ppl"].update(teacher_logits.float(), batch["target"])
        keep = self.valid_positions(batch)
        s, t = logits[keep].float(), teacher_logits[keep].float()
        metrics["agreement"].update((s.argmax(-1) == t.argmax(-1)).float())
        log_p_s, log_p_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        metrics["kl_to_teacher"].update(F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1))

    def ensemble(self, logits: list[Tensor]) -> Tensor:
        """Log of the mean probabilities: logits whose softmax is the ensemble's distribution."""
        return torch.stack([z.float().softmax(-1) for z in logits]).mean(0).clamp_min(1e-12).log()

    # -- after testing ---------------------------------------------------------------------------------
    def report(self, student: nn.Module, teacher: nn.Module | None, datamodule) -> dict:
        """Generation speed of student and teacher on the same test prompts (KV cache), and the student's
        speculative-decoding acceptance rate as a draft for the teacher, greedy and sampled (DistillSpec)."""
        if self.objective != "causal" or not hasattr(student, "generate"):
            return {}
        from kd_lab.lm.generation import generation_speed
        from kd_lab.lm.speculative import acceptance_rate

        test = datamodule.splits["test"]["input"]
        prompts = test[: self.prompts, : self.prompt_length].to(next(student.parameters()).device)
        out = {"generation": {"student": generation_speed(student, prompts, self.new_tokens)}}
        if teacher is not None and hasattr(teacher, "generate"):
            out["generation"]["teacher"] = generation_speed(teacher, prompts, self.new_tokens)
            out["speculative"] = {
                mode: acceptance_rate(
                    student, teacher, prompts, gamma=self.draft_tokens, max_new_tokens=self.new_tokens, mode=mode
                )
                for mode in ("greedy", "sampled")
            }
        return out
