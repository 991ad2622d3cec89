"""Hugging Face transformers as kd-lab models: GPT-2 and Llama causal LMs, BERT masked LMs, and BERT or GPT-2
sequence classifiers (``sequence_classifier``).

Each builder is a Hydra ``_target_`` and returns the ``PreTrainedModel`` itself. Its forward returns a
``ModelOutput`` whose ``.logits`` (``(B, T, vocab)``) kd-lab's output adapter reads.

Attention is always ``eager``: the fused kernels (``sdpa``, flash) never materialise the attention
probabilities, so ``output_attentions=True`` would have no maps to return for attention distillation.

Blocks are tapped by module path (``transformer_layers``). In transformers 5.x a block's forward
(``GPT2Block``, ``LlamaDecoderLayer``, ``BertLayer``) returns the hidden state as a plain ``(B, T, hidden)``
tensor. Older versions (most of 4.x) returned a tuple whose first element is that tensor; ``block_hidden``
reads both.
"""

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kd_lab.core.recorder import block_paths
from kd_lab.errors import KDLabError

try:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedModel,
    )
except ImportError as e:  # transformers is an optional dependency of kd-lab
    raise KDLabError("kd_lab.models.hf needs transformers: pip install 'transformers>=4.45'") from e

ATTENTION = "eager"
SIZE_ARGS = ("vocab_size", "max_positions", "hidden_size", "num_layers", "num_heads")


def causal_lm(
    arch: str = "gpt2",
    vocab_size: int | None = None,
    max_positions: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    dropout: float = 0.0,
    pretrained: str | None = None,
    tie_word_embeddings: bool = True,
    **extra_config: Any,
) -> PreTrainedModel:
    """A GPT-2 (``arch="gpt2"``) or Llama (``arch="llama"``) causal LM with a fresh random init.

    ``intermediate_size=None`` is ``4 * hidden_size`` for both. ``dropout`` sets every dropout the config
    has (Llama has attention dropout only). ``extra_config`` goes to the config unchanged (e.g.
    ``initializer_range``). The model has no tokenizer, so it has no special tokens unless
    ``extra_config`` names them: generation then always runs to ``max_new_tokens``.

    ``pretrained``: a local directory written by ``save_pretrained`` (or a hub name, when the hub or its
    cache is reachable) loaded with ``AutoModelForCausalLM``. The size arguments are then ignored, except
    ``vocab_size``, which must match the loaded model when given.
    """
    if pretrained is not None:
        return _load(AutoModelForCausalLM, pretrained, vocab_size)
    sizes = _sizes(vocab_size, max_positions, hidden_size, num_layers, num_heads)
    inner = intermediate_size or 4 * sizes["hidden_size"]
    extra_config = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **extra_config}
    if arch == "gpt2":
        config = _gpt2_sizes(sizes, inner, dropout)
        return _build(GPT2LMHeadModel, GPT2Config, **config, tie_word_embeddings=tie_word_embeddings, **extra_config)
    if arch == "llama":
        return _build(
            LlamaForCausalLM,
            LlamaConfig,
            **_bert_sizes(sizes, inner),
            attention_dropout=dropout,
            tie_word_embeddings=tie_word_embeddings,
            **extra_config,
        )
    raise KDLabError(f"causal_lm: unknown arch {arch!r}; use 'gpt2' or 'llama'")


def masked_lm(
    vocab_size: int | None = None,
    max_positions: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    dropout: float = 0.0,
    pretrained: str | None = None,
    **extra: Any,
) -> PreTrainedModel:
    """A BERT masked LM with a fresh random init; ``intermediate_size=None`` is ``4 * hidden_size``.

    ``pretrained`` loads with ``AutoModelForMaskedLM`` and ignores the size arguments, except
    ``vocab_size``, which must match the loaded model when given.
    """
    if pretrained is not None:
        return _load(AutoModelForMaskedLM, pretrained, vocab_size)
    sizes = _sizes(vocab_size, max_positions, hidden_size, num_layers, num_heads)
    config = _bert_sizes(sizes, intermediate_size or 4 * sizes["hidden_size"], dropout)
    return _build(BertForMaskedLM, BertConfig, **config, **extra)


class _MaskPadding:
    """Builds the attention mask from the pad token: kd-lab calls a model with the token ids only."""

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs: Any):
        if attention_mask is None and input_ids is not None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class BertSequenceClassifier(_MaskPadding, BertForSequenceClassification):
    """BERT with its pooler ([CLS] state, dense + tanh) and a linear head; padding is masked out."""


class GPT2SequenceClassifier(_MaskPadding, GPT2ForSequenceClassification):
    """GPT-2 with a linear head on the last non-pad token's state; padding is masked out."""


SEQUENCE_CLASSIFIERS = {"bert": BertSequenceClassifier, "gpt2": GPT2SequenceClassifier}


def sequence_classifier(
    arch: str = "bert",
    num_labels: int = 2,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    dropout: float = 0.1,
    pad_token_id: int = 0,
    pretrained: str | None = None,
    **extra: Any,
) -> PreTrainedModel:
    """A BERT (``arch="bert"``) or GPT-2 (``arch="gpt2"``) sequence classifier of ``num_labels`` classes.

    Module paths are those of the LMs (``bert.encoder.layer.<i>``, ``transformer.h.<i>``), so block taps
    work unchanged. ``pad_token_id`` must be the data's pad id (the BPE's is 0): the attention mask is built
    from it. ``pretrained``: a local ``save_pretrained`` directory of the same architecture (a masked or
    causal LM too: its encoder is loaded and a fresh head added); the size arguments are then ignored.
    """
    if arch not in SEQUENCE_CLASSIFIERS:
        raise KDLabError(f"sequence_classifier: unknown arch {arch!r}; use one of {sorted(SEQUENCE_CLASSIFIERS)}")
    cls = SEQUENCE_CLASSIFIERS[arch]
    if pretrained is not None:
        return _load(cls, pretrained, vocab_size, num_labels=num_labels, pad_token_id=pad_token_id)
    sizes = _sizes(vocab_size, max_positions, hidden_size, num_layers, num_heads)
    inner = intermediate_size or 4 * sizes["hidden_size"]
    if arch == "gpt2":
        config = _gpt2_sizes(sizes, inner, dropout) | {"bos_token_id": None, "eos_token_id": None}
        return _build(cls, GPT2Config, **config, num_labels=num_labels, pad_token_id=pad_token_id, **extra)
    config = _bert_sizes(sizes, inner, dropout)
    return _build(cls, BertConfig, **config, num_labels=num_labels, pad_token_id=pad_token_id, **extra)


def max_positions(model: PreTrainedModel) -> int:
    """The longest sequence the model accepts (GPT-2 calls it ``n_positions``, the others
    ``max_position_embeddings``)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    raise KDLabError(f"{type(model).__name__}: its config names no maximum sequence length")


def vocab_size(model: PreTrainedModel) -> int:
    """The number of logits per position."""
    return int(model.config.vocab_size)


def transformer_layers(model: nn.Module) -> list[str]:
    """Module paths of the transformer blocks, shallow to deep (``transformer.h.0`` for GPT-2,
    ``model.layers.0`` for Llama, ``bert.encoder.layer.0`` for BERT).

    Found without per-architecture names: the ``nn.ModuleList`` holding the most parameters is the stack of
    blocks in every Hugging Face LM.
    """
    paths = block_paths(model)
    if not paths:
        raise KDLabError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks")
    return paths


def block_hidden(output: Tensor | tuple) -> Tensor:
    """The hidden state in what a block's forward (or a forward hook on it) returns."""
    return output if isinstance(output, Tensor) else output[0]


def _sizes(vocab: int | None, positions: int | None, hidden: int | None, layers: int | None, heads: int | None):
    sizes = dict(zip(SIZE_ARGS, (vocab, positions, hidden, layers, heads), strict=True))
    missing = [k for k, v in sizes.items() if v is None]
    if missing:
        raise KDLabError(f"missing {', '.join(missing)}: give every size, or pretrained=<dir> to load a model")
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise KDLabError(f"hidden_size={hidden} is not divisible by num_heads={heads}")
    return sizes


def _gpt2_sizes(sizes: dict[str, int], inner: int, dropout: float) -> dict[str, Any]:
    """GPT-2's config names for kd-lab's size arguments, every dropout set to ``dropout``."""
    return {
        "vocab_size": sizes["vocab_size"],
        "n_positions": sizes["max_positions"],
        "n_embd": sizes["hidden_size"],
        "n_layer": sizes["num_layers"],
        "n_head": sizes["num_heads"],
        "n_inner": inner,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
    }


def _bert_sizes(sizes: dict[str, int], inner: int, dropout: float | None = None) -> dict[str, Any]:
    """BERT's config names for kd-lab's size arguments; Llama shares them. ``dropout``: BERT's two dropouts
    (None: leave them out, as Llama has attention dropout only)."""
    config = {
        "vocab_size": sizes["vocab_size"],
        "max_position_embeddings": sizes["max_positions"],
        "hidden_size": sizes["hidden_size"],
        "num_hidden_layers": sizes["num_layers"],
        "num_attention_heads": sizes["num_heads"],
        "intermediate_size": inner,
    }
    if dropout is not None:
        config |= {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return config


def _build(cls: type[PreTrainedModel], config_cls: type, **config: Any) -> PreTrainedModel:
    # save_pretrained does not write the attention choice: _load passes it again on every reload.
    return cls(config_cls(**config, attn_implementation=ATTENTION))


def _load(auto, pretrained: str, vocab: int | None, **config: Any) -> PreTrainedModel:
    path = Path(pretrained).expanduser()
    if not path.exists() and _looks_local(pretrained):
        raise KDLabError(
            f"pretrained={pretrained!r}: no such directory. Write one with model.save_pretrained(dir) "
            "and pass that dir."
        )
    source = str(path) if path.exists() else pretrained
    try:
        model = auto.from_pretrained(source, attn_implementation=ATTENTION, **config)
    except OSError as e:
        raise KDLabError(
            f"pretrained={pretrained!r} could not be loaded ({str(e).splitlines()[0]}). Give a local directory "
            "written by model.save_pretrained(dir), or, for a hub name, download it once and set "
            "HF_HUB_OFFLINE=1 to read it from the cache."
        ) from e
    if vocab is not None and vocab != model.config.vocab_size:
        raise KDLabError(
            f"pretrained={pretrained!r} has vocab_size={model.config.vocab_size}, but vocab_size={vocab} was "
            "asked for. Drop vocab_size or use a tokenizer and data with the model's vocabulary."
        )
    # from_pretrained returns eval mode; a fresh build is in train mode, and Lightning keeps each module's mode,
    # so a loaded student would otherwise train without dropout.
    return model.train()


def _looks_local(name: str) -> bool:
    """Hub names are ``name`` or ``namespace/name``; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
