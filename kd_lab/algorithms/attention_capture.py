"""Attention internals of GPT-2, BERT and Llama, taken by module path: per-head queries, keys, values, the
attention mask, the pre-softmax scores and the attention distributions.

The recorder (kd_lab/core/recorder.py) taps the outputs of the q/k/v projections: GPT-2's fused ``c_attn``
(split here into q | k | v), BERT's ``query``/``key``/``value``, Llama's ``q_proj``/``k_proj``/``v_proj``.
Scores and probabilities are recomputed from them. The models are not asked for ``output_attentions``:
that returns probabilities only (TinyBERT needs the scores, MiniLM the values), and the fused kernels never
materialise them.

What this file recomputes, per architecture:
  GPT-2  scores q k^T / sqrt(d) (also / (layer + 1) with ``scale_attn_by_inverse_layer_idx``); causal mask;
  BERT   scores q k^T / sqrt(d); keys masked only where the model masks padding (the sequence classifiers);
  Llama  rotary positions applied to q and k with the model's own ``rotary_emb`` (positions 0..T-1, as
         kd-lab calls a model); grouped key/value heads repeated to the query heads; causal mask.
tests/test_lm_tinybert_minilm.py checks the probabilities against each model's own ``output_attentions``.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd_lab.core.recorder import block_paths
from kd_lab.errors import KDLabError


@dataclass(frozen=True)
class Layout:
    """Where one architecture keeps its attention projections, relative to a block's path."""

    arch: str
    projections: tuple[str, ...]  # one fused q|k|v path, or the q, k, v paths
    causal: bool
    rotary: str | None = None  # path of the rotary-embedding module (from the model's root)


LAYOUTS = (
    Layout("gpt2", ("attn.c_attn",), causal=True),
    Layout("bert", ("attention.self.query", "attention.self.key", "attention.self.value"), causal=False),
    Layout(
        "llama", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), causal=True, rotary="model.rotary_emb"
    ),
)


def looked_for(blocks: str = "<block>") -> list[str]:
    """Every projection path this file knows, for error messages."""
    return [f"{blocks}.{p}" for layout in LAYOUTS for p in layout.projections]


class AttentionCapture:
    """The attention of some layers of one model. Not an ``nn.Module``: it holds no parameters, and its
    reference to the model's rotary module must not register the model inside an algorithm."""

    def __init__(self, model: nn.Module, role: str, method: str):
        self.role, self.method = role, method
        self.blocks = block_paths(model)
        self.layout = self._find_layout(model)
        config = model.config
        self.heads = int(getattr(config, "n_head", None) or config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        width = int(getattr(config, "n_embd", None) or config.hidden_size)
        self.head_dim = int(getattr(config, "head_dim", None) or width // self.heads)
        self.inverse_layer_scale = bool(getattr(config, "scale_attn_by_inverse_layer_idx", False))
        self.pad_token_id = getattr(config, "pad_token_id", None)
        self.masks_padding = _masks_padding(model)
        self.rotary = model.get_submodule(self.layout.rotary) if self.layout.rotary else None

    def _find_layout(self, model: nn.Module) -> Layout:
        config = getattr(model, "config", None)
        names = {name for name, _ in model.named_modules()}
        if self.blocks and config is not None:
            for layout in LAYOUTS:
                if all(f"{self.blocks[0]}.{p}" in names for p in layout.projections):
                    if layout.rotary and layout.rotary not in names:
                        continue
                    return layout
        where = self.blocks[0] if self.blocks else "<block>"
        raise KDLabError(
            f"algorithm={self.method} needs attention modules, but the {self.role} ({type(model).__name__}) has "
            f"none at the paths it looked for: {looked_for(where)}. Use a GPT-2, BERT or Llama model from "
            "kd_lab.models.hf (e.g. teacher=gpt2_teacher student=gpt2_student)."
        )

    @property
    def layers(self) -> int:
        return len(self.blocks)

    def layer_index(self, layer: int, key: str) -> int:
        """``layer`` (negative counts from the end) as a 0-based index, refused when out of range."""
        if not -self.layers <= layer < self.layers:
            raise KDLabError(
                f"algorithm.{key}={layer} is out of range: the {self.role} has {self.layers} layers "
                f"(0..{self.layers - 1}, or -1 for the last)."
            )
        return layer % self.layers

    def taps(self, layer: int) -> list[str]:
        """The projection paths of ``layer`` that the recorder must tap."""
        return [f"{self.blocks[layer]}.{p}" for p in self.layout.projections]

    def require_heads(self, other: "AttentionCapture", term: str, fix: str) -> None:
        """Refuse a per-head comparison of models with different head counts."""
        if self.heads != other.heads:
            raise KDLabError(
                f"algorithm={self.method}: {term} attention head by head, but the {self.role} has "
                f"{self.heads} heads and the {other.role} {other.heads}. {fix}"
            )

    def require_same_mask(self, other: "AttentionCapture") -> None:
        """Refuse comparing a causal model's attention with a bidirectional one's: their masks differ."""
        if self.layout.causal != other.layout.causal:
            kinds = {True: "causal", False: "bidirectional"}
            raise KDLabError(
                f"algorithm={self.method} compares attention position by position, but the {self.role} is "
                f"{kinds[self.layout.causal]} and the {other.role} {kinds[other.layout.causal]}: their masks "
                "differ. Pair two causal models (GPT-2, Llama) or two BERT models."
            )

    # -- per-step tensors ------------------------------------------------------------------------------
    def projections(self, features: dict[str, Tensor], layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V of ``layer`` as recorded, each (B, T, width), heads concatenated (no rotary positions)."""
        paths = self.taps(layer)
        if len(paths) == 1:  # GPT-2: one Conv1D writes q | k | v
            fused = features[paths[0]]
            return tuple(fused.split(fused.shape[-1] // 3, dim=-1))  # type: ignore[return-value]
        return features[paths[0]], features[paths[1]], features[paths[2]]

    def heads_of(self, features: dict[str, Tensor], layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V of ``layer`` per head, each (B, heads, T, head_dim), as the attention multiplies them:
        Llama's with rotary positions on Q and K and its key/value heads repeated to the query heads."""
        q, k, v = (self._split(x) for x in self.projections(features, layer))
        if self.rotary is not None:
            q, k = self._rotate(q, k)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return q, k, v

    def queries_keys(self, features: dict[str, Tensor], layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V of ``layer`` with heads concatenated again, (B, T, width): Llama's Q and K with rotary
        positions. MiniLMv2 splits them into relation heads of its own."""
        q, k, v = (self._split(x) for x in self.projections(features, layer))
        if self.rotary is not None:
            q, k = self._rotate(q, k)
        return tuple(x.transpose(1, 2).flatten(2) for x in (q, k, v))  # type: ignore[return-value]

    def mask(self, batch_input: Tensor) -> Tensor | None:
        """Where a query may attend, (B or 1, 1, T, T) bool; None when every position sees every other."""
        t = batch_input.shape[1]
        allowed = None
        if self.layout.causal:
            allowed = torch.ones(t, t, dtype=torch.bool, device=batch_input.device).tril()[None, None]
        if self.masks_padding and self.pad_token_id is not None:
            keys = (batch_input != self.pad_token_id)[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        return allowed

    def scores(self, q: Tensor, k: Tensor, layer: int) -> Tensor:
        """Pre-softmax attention scores (B, heads, T, T), without the mask."""
        scale = math.sqrt(q.shape[-1]) * (layer + 1 if self.inverse_layer_scale else 1)
        return q @ k.transpose(-1, -2) / scale

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def _rotate(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        positions = torch.arange(q.shape[2], device=q.device)[None]
        cos, sin = self.rotary(q, positions)
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)


def _masks_padding(model: nn.Module) -> bool:
    """True for kd-lab's sequence classifiers, which build an attention mask from the pad token."""
    try:
        from kd_lab.models.hf import _MaskPadding
    except KDLabError:  # transformers is missing: no model here masks padding
        return False
    return isinstance(model, _MaskPadding)


def at_least_float32(x: Tensor) -> Tensor:
    """Half-precision tensors (autocast) in float32: a softmax over many entries needs it; float64 stays."""
    return x if x.dtype == torch.float64 else x.float()


# -- losses on attention tensors (pure functions: the golden tests and gradient checks call them) -------
def masked_scores(scores: Tensor, mask: Tensor | None) -> Tensor:
    """TinyBERT's target: the scores with masked positions set to 0 (its reference code replaces the -inf
    of masked positions by 0, so they count as equal in the MSE)."""
    return scores if mask is None else scores.masked_fill(~mask, 0.0)


def relation_kl(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor | None) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) over the last axis (keys), averaged over every other axis
    (batch, heads, queries). Masked keys get no probability; a query with no visible key does not count."""
    teacher_logits, student_logits = at_least_float32(teacher_logits), at_least_float32(student_logits)
    if mask is not None:
        teacher_logits = teacher_logits.masked_fill(~mask, float("-inf"))
        student_logits = student_logits.masked_fill(~mask, float("-inf"))
    log_t = teacher_logits.log_softmax(-1)
    log_s = student_logits.log_softmax(-1)
    terms = log_t.exp() * (log_t - log_s)
    if mask is not None:  # 0 * (-inf - -inf) is NaN: masked keys contribute nothing
        terms = terms.masked_fill(~mask, 0.0)
    per_query = terms.sum(-1)
    if mask is None:
        return per_query.mean()
    rows = mask.any(-1).expand_as(per_query)
    return per_query.masked_fill(~rows, 0.0).sum() / rows.sum().clamp(min=1)


def head_relation(x: Tensor) -> Tensor:
    """Relation logits of per-head vectors ``x`` (B, heads, T, d): X X^T / sqrt(d), (B, heads, T, T); its
    softmax over the last axis is MiniLM's relation distribution."""
    return x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])


def self_relation(x: Tensor, heads: int) -> Tensor:
    """MiniLMv2's relation logits of ``x`` (B, T, width) split into ``heads`` relation heads of width / heads."""
    return head_relation(x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2))
