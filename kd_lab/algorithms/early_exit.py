"""Early exits on a transformer, distilled from its last layer: the transformer analogue of BYOT. Runs under
``scheme=self`` on ``task=language_modeling`` and ``task=sequence_classification``.

FastBERT (Liu, Zhou, Wang, Zhao, Deng, Ju, ACL 2020, https://arxiv.org/abs/2004.02178) puts a classifier after
every transformer block. The last block's classifier teaches the others by KL on their outputs, and the
backbone stays as it is: the paper freezes it and its own classifier while the exits learn. DeeBERT (Xin et
al. 2020) trains the exits on the labels instead; BYOT (Zhang et al. 2019) does both and lets the exits train
the backbone too. One loss covers the three:

    loss = ce_weight * CE(z_deep, y)
         + exit_ce_weight * sum_i CE(z_i, y)
         + kd_weight * T^2 * sum_i KL(softmax(z_deep / T) || softmax(z_i / T))     (z_deep detached)

Defaults are FastBERT's self-distillation: KD only (kd_weight 1, exit_ce_weight 0), T = 1, and
``detach_backbone: true``. The exits then train only their own parameters, so the deepest output learns from
the labels alone, as in the plain student. ``detach_backbone: false`` lets the exits' losses reach the
backbone (BYOT's joint training).

An exit of a language model is a copy of the model's final norm (GPT-2's ``ln_f``, Llama's ``norm``; for
BERT its MLM transform: dense, GELU, norm). The model's own output projection follows, shared with the
deepest exit as in CALM (Schuster et al. 2022): an exit adds one norm, not one vocabulary projection. With
``detach_backbone`` the shared projection is applied with detached weights, so only the exits' own copies
learn. An exit of a sequence classifier is a copy of the model's pooler and classifier (BERT: the [CLS]
state, dense + tanh, then linear). An exit cannot find GPT-2's last non-pad token from a hidden state, so
a GPT-2 classifier is refused. Each exit's perplexity or accuracy is reported (``exit1/test/ppl``, ...)
with its cost (``results.json`` -> ``algorithm.exits``: the parameters it runs and FLOPs for one example).
"""

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.algorithms.distilbert import FINAL_NORMS
from kd_lab.algorithms.soft_targets import kd_term
from kd_lab.core.bounds import NonNegative, Positive
from kd_lab.core.outputs import first_tensor
from kd_lab.core.recorder import block_paths, resolve_module
from kd_lab.errors import KDLabError


class SharedHead(nn.Module):
    """Applies a module of the backbone without registering it here: its parameters stay the backbone's
    (one copy in the optimizer and the checkpoint). ``detach``: use its weights without training them."""

    def __init__(self, module: nn.Module, detach: bool):
        super().__init__()
        self.__dict__["shared"] = module  # not an attribute nn.Module registers: its parameters stay once
        self.detach = detach

    def forward(self, x: Tensor) -> Tensor:
        module = self.shared
        if not self.detach:
            return module(x)
        frozen = {name: p.detach() for name, p in module.named_parameters()}
        return functional_call(module, frozen, (x,))


class ExitHead(nn.Module):
    """A block's output (a tensor, or a tuple that starts with one) -> the exit's logits."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, block_output) -> Tensor:
        return self.layers(first_tensor(block_output))


def lm_exit_head(model: nn.Module, detach: bool) -> ExitHead:
    """The final norm's copy (if the model has one) and the model's LM head, shared."""
    names = dict(model.named_modules())
    norm = next((names[p] for p in FINAL_NORMS if p in names), None)
    if norm is not None and model.get_output_embeddings() is not None:
        return ExitHead(copy.deepcopy(norm), SharedHead(model.get_output_embeddings(), detach))
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None:  # BERT's MLM head: its transform (dense, GELU, norm) copied, the decoder shared
        return ExitHead(copy.deepcopy(predictions.transform), SharedHead(predictions.decoder, detach))
    raise KDLabError(
        f"algorithm=early_exit found no LM head on the student ({type(model).__name__}): it needs GPT-2's "
        "transformer.ln_f + lm_head, Llama's model.norm + lm_head or BERT's cls (kd_lab.models.hf)."
    )


def classifier_exit_head(model: nn.Module) -> ExitHead:
    """Copies of the model's pooler ([CLS]: dense + tanh) and classifier."""
    pooler = getattr(getattr(model, "bert", None), "pooler", None)
    classifier = getattr(model, "classifier", None)
    if pooler is None or classifier is None:
        raise KDLabError(
            f"algorithm=early_exit on sequence classification needs a BERT classifier, whose pooler reads the "
            f"[CLS] state; the student is {type(model).__name__}. A GPT-2 classifier reads the last non-pad "
            "token, which an exit cannot find from a hidden state: use student.model.arch=bert."
        )
    return ExitHead(copy.deepcopy(pooler), copy.deepcopy(classifier))


class EarlyExit(Algorithm):
    name = "early_exit"
    schemes = frozenset({"self"})
    task_kinds = frozenset({"language_modeling", "sequence_classification"})
    needs_teacher = False

    def __init__(
        self,
        exits: str | list[str | int] = "all",
        ce_weight: NonNegative = 1.0,
        exit_ce_weight: NonNegative = 0.0,
        kd_weight: NonNegative = 1.0,
        temperature: Positive = 1.0,
        detach_backbone: bool = True,
    ):
        super().__init__(ce_weight)
        self.exit_specs, self.exit_ce_weight, self.kd_weight = exits, exit_ce_weight, kd_weight
        self.temperature, self.detach_backbone = temperature, detach_backbone
        self.exit_paths: list[str] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        blocks = block_paths(student) if hasattr(getattr(student, "config", None), "model_type") else []
        if len(blocks) < 2:
            raise KDLabError(
                f"algorithm=early_exit needs a transformer student with at least 2 blocks "
                f"(kd_lab.models.hf); {type(student).__name__} has {len(blocks)}. For a CNN or MLP student "
                "use algorithm=byot."
            )
        specs = list(range(len(blocks) - 1)) if self.exit_specs == "all" else list(self.exit_specs)
        if not specs:
            raise KDLabError("algorithm.exits is empty: give block indices (0-based) or module paths, or 'all'.")
        paths = []
        for spec in specs:
            if isinstance(spec, int):
                if not 0 <= spec < len(blocks) - 1:
                    raise KDLabError(
                        f"algorithm.exits has block {spec}, but the student's blocks that can take an exit are "
                        f"0..{len(blocks) - 2} (the last block's exit is the model's own output)."
                    )
                spec = blocks[spec]
            resolve_module(student, spec, "student")
            if spec == blocks[-1]:
                raise KDLabError(
                    f"algorithm.exits has '{spec}', the last block: its exit is the model's own output. "
                    "Choose earlier blocks."
                )
            paths.append(spec)
        self.exit_paths = paths
        # not an attribute: nn.Module would register the student as a submodule (its parameters twice)
        self.__dict__["_student"] = student

    @property
    def student_taps(self) -> list[str]:
        return list(self.exit_paths)

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        student = self._student
        if context.task.kind == "language_modeling":
            self.heads = nn.ModuleList(lm_exit_head(student, self.detach_backbone) for _ in self.exit_paths)
        else:
            self.heads = nn.ModuleList(classifier_exit_head(student) for _ in self.exit_paths)

    def exit_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        pairs = zip(self.exit_paths, self.heads, strict=True)
        return {f"exit{i + 1}": head(features[path]) for i, (path, head) in enumerate(pairs)}

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        deep = out.logits.detach()
        ce, kd = [], []
        for path, head in zip(self.exit_paths, self.heads, strict=True):
            feature = out.features[path]
            logits = head(feature.detach() if self.detach_backbone else feature)
            if self.exit_ce_weight:  # each term costs a pass over the vocabulary: only the weighted ones
                ce.append(out.label_loss(logits))
            if self.kd_weight:
                kd.append(kd_term(out, logits, deep, self.temperature))
        terms = self.ce_term(out)
        if ce:
            terms["exit_ce"] = self.exit_ce_weight * torch.stack(ce).sum()
        if kd:
            terms["exit_kd"] = self.kd_weight * torch.stack(kd).sum()
        return terms

    def report(self, student: nn.Module, example: Tensor) -> dict:
        from kd_lab.tools.exits import exit_costs  # a leaf module of its own; imported late to keep this file light

        return {"exits": exit_costs(student, self, example)}
