"""Sequence-level knowledge distillation (Kim & Rush, EMNLP 2016, arXiv:1606.07947) for causal LMs.

The teacher continues the first ``prompt_length`` tokens of every training block (beam search, greedy, or
sampling), once; the sequences are stored on disk and reused (kd_lab/lm/sequence_store.py). The student
then trains with cross-entropy on the teacher's continuations instead of the real ones:

    loss = seq_weight * CE(student, teacher continuation)                       (Seq-KD)
         + word_weight * sum_tokens D(p_T, p_S) / tokens   on word_data rows    (Word-KD)

``word_data=real``: the word-level term is on the real blocks, appended to the batch (this is one batch of
2B rows). ``word_data=generated``: it is on the teacher's sequences, as Kim & Rush's "Seq-KD + Word-KD".
The Seq-KD term counts only continuation tokens: the prompt is the source, as a sentence is in translation.
Word-KD on real blocks counts every real token (token_kd's term).

A generated row serves its block's sample index, so batch order and shuffling stay the data's own.
"""

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.core.bounds import AtLeastOne, BelowOne, NonNegative, Positive, UnitInterval
from kd_lab.core.tasks.language_modeling import IGNORE_INDEX, global_count
from kd_lab.errors import KDLabError
from kd_lab.lm.sequence_store import DECODINGS, GenerationSettings, SequenceStore, load_or_generate
from kd_lab.losses.divergences import check_divergence, token_divergence

log = logging.getLogger(__name__)

WORD_DATA = ("real", "generated")
SOURCE = "seq_kd_generated"  # batch key: True on rows of teacher sequences, False on real rows


def check_causal(model: nn.Module | None, role: str, algorithm: str) -> None:
    """Refuse what cannot generate (a masked LM, a classifier), before any compute."""
    if model is None:
        raise KDLabError(f"algorithm={algorithm} needs a teacher; configure one (teacher=gpt2_teacher).")
    can = getattr(model, "can_generate", None)
    if not callable(can) or not can():
        raise KDLabError(
            f"algorithm={algorithm} generates text with the {role}, but the {role} ({type(model).__name__}) is not a "
            f"causal LM; use a causal {role} ({role}=gpt2_{role} with data=text), not a masked LM (BERT)."
        )


def continuation_targets(sequences: Tensor, prompt_length: int) -> Tensor:
    """Next-token targets of ``sequences`` (B, L) read as inputs: position j predicts token j + 1. Only the
    continuation counts (j >= prompt_length - 1); the last position has no next token."""
    target = torch.full_like(sequences, IGNORE_INDEX)
    target[:, :-1] = sequences[:, 1:]
    target[:, : prompt_length - 1] = IGNORE_INDEX
    return target


def check_prompt_length(prompt_length: int, context: BuildContext, algorithm: str) -> int:
    """The input length L of a block; the prompt must leave at least one token to generate."""
    if context.task.objective != "causal":
        raise KDLabError(
            f"algorithm={algorithm} needs causal language modeling (data.objective=causal), not "
            f"{context.task.objective}: a masked LM does not generate. Use data=text with gpt2 models."
        )
    length = context.input_shape[0]
    if prompt_length >= length:
        raise KDLabError(
            f"algorithm.prompt_length={prompt_length} leaves nothing to generate in blocks of {length} input tokens; "
            f"set algorithm.prompt_length below {length} (e.g. {max(1, length // 4)})."
        )
    return length


class SeqKD(Algorithm):
    name = "seq_kd"
    schemes = frozenset({"offline"})
    task_kinds = frozenset({"language_modeling"})
    # the student trains on the teacher's sequences: stored teacher outputs of the real blocks do not apply
    synthesizes_inputs = True

    def __init__(
        self,
        decoding: str = "beam",
        prompt_length: AtLeastOne = 16,
        beam_size: AtLeastOne = 5,
        temperature: Positive = 1.0,
        top_k: AtLeastOne | None = None,
        generation_seed: int = 0,
        seq_weight: NonNegative = 1.0,
        word_weight: NonNegative = 0.0,
        word_data: str = "real",
        divergence: str = "forward_kl",
        kd_temperature: Positive = 1.0,
        beta: UnitInterval = 0.5,
        alpha: BelowOne = 0.1,
        generation_batch_size: AtLeastOne = 256,
        store_dir: str | None = None,
    ):
        super().__init__(ce_weight=0.0)
        if decoding not in DECODINGS:
            raise KDLabError(f"algorithm.decoding={decoding!r} is not one of {list(DECODINGS)}.")
        if word_data not in WORD_DATA:
            raise KDLabError(f"algorithm.word_data={word_data!r} is not one of {list(WORD_DATA)}.")
        check_divergence(divergence)
        self.settings = GenerationSettings(decoding, prompt_length, temperature, top_k, beam_size, generation_seed)
        self.prompt_length, self.word_data = prompt_length, word_data
        self.seq_weight, self.word_weight = seq_weight, word_weight
        self.divergence, self.kd_temperature, self.beta, self.alpha = divergence, kd_temperature, beta, alpha
        self.generation_batch_size = generation_batch_size
        self.store = SequenceStore(Path(store_dir) / "sequences") if store_dir else None
        # the teacher's forward is needed only for the word-level term (it still generates, and is evaluated)
        self.needs_teacher = word_weight > 0
        self.train_inputs: Tensor | None = None
        self.sequences: Tensor | None = None  # (N, L), filled at the first training batch
        self.store_info: dict = {}

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        check_causal(teacher, "teacher", self.name)
        # not an attribute: nn.Module would register the teacher as a submodule, and train and save it
        self.__dict__["_teacher"] = teacher

    def bind_data(self, datamodule) -> None:
        """The training blocks: their prefixes are the prompts (called by build_step)."""
        self.train_inputs = datamodule.splits["train"]["input"]

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        self.length = check_prompt_length(self.prompt_length, context, self.name)
        if self.train_inputs is None:
            raise KDLabError(
                "algorithm=seq_kd was built without the training data (bind_data was not called); build it "
                "through kd_lab.run.assemble.build_step, or call algorithm.bind_data(datamodule) first."
            )

    def prepare(self) -> Tensor:
        """The teacher's sequences, generated or read from the store once. Called at the first training batch:
        only then does the teacher have its trained weights (the teacher store fills them after the build)."""
        if self.sequences is None:
            prompts = self.train_inputs[:, : self.prompt_length]
            self.sequences, self.store_info = load_or_generate(
                self.store,
                self.__dict__["_teacher"],
                prompts,
                self.length,
                self.settings,
                self.train_inputs,
                self.generation_batch_size,
            )
            log.info(
                "seq_kd: %d teacher sequences %s (%.1f s)",
                len(self.sequences),
                "reused from the store" if self.store_info["reused"] else "generated",
                self.store_info["generation_seconds"],
            )
        return self.sequences

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        sequences = self.prepare()
        index = batch["index"]
        generated = sequences[index.cpu()].to(batch["input"].device)
        rows = {"input": generated, "target": continuation_targets(generated, self.prompt_length), "index": index}
        rows[SOURCE] = torch.ones(len(index), dtype=torch.bool, device=generated.device)
        if self.word_weight > 0 and self.word_data == "real":  # the real blocks too, for the word-level term
            real = {"input": batch["input"], "target": batch["target"], "index": index}
            real[SOURCE] = torch.zeros_like(rows[SOURCE])
            rows = {k: torch.cat([rows[k], real[k]]) for k in rows}
        return rows

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        batch = out.batch
        generated = batch[SOURCE][:, None].expand_as(batch["target"])
        valid = batch["target"] != IGNORE_INDEX
        terms = {}
        if self.seq_weight > 0:
            seq_mask = valid & generated
            logits = out.logits[seq_mask]
            logits = logits if logits.dtype == torch.float64 else logits.float()  # half precision: sum in float32
            ce = F.cross_entropy(logits, batch["target"][seq_mask], reduction="sum")
            ce = ce / global_count(seq_mask.sum()).clamp(min=1)
            terms["seq_ce"] = self.seq_weight * ce
        if self.word_weight > 0:
            word_mask = valid & (generated if self.word_data == "generated" else ~generated)
            total = token_divergence(
                out.logits.flatten(0, -2),
                out.teacher_logits.flatten(0, -2),
                self.divergence,
                mask=word_mask.flatten(),
                temperature=self.kd_temperature,
                beta=self.beta,
                alpha=self.alpha,
            )
            terms[f"word_{self.divergence}"] = self.word_weight * total / global_count(word_mask.sum()).clamp(min=1)
        return terms

    def report(self, student: nn.Module, example: Tensor) -> dict:
        return {"sequence_store": self.store_info} if self.store_info else {}
