"""Which student layer learns from which teacher layer: one concept for every layer-wise LM method.

``layer_pairs(M, N, mapping)`` returns 0-based pairs ``(student_layer, teacher_layer)`` for a student of M
blocks and a teacher of N blocks. ``mapping`` is
  "uniform"  TinyBERT's g(m) = m * N / M (1-based): student j -> teacher (j + 1) * N // M - 1, every j;
  "skip"     PKD-skip (Sun et al. 2019): every (N // M)-th teacher layer; the last student layer is left
             out, because PKD distils it through the prediction: j -> (j + 1) * N // M - 1 for j < M - 1;
  "last"     PKD-last: the last teacher layers before the top one: j -> N - M + j for j < M - 1;
  a list     explicit ``[student, teacher]`` pairs, each student layer at most once.
``count_layers`` and ``block_path`` find a model's blocks (GPT-2, BERT, Llama, or any model whose blocks
live in an ``nn.ModuleList``).
"""

from collections.abc import Sequence

from torch import nn

from kd_lab.core.recorder import block_paths
from kd_lab.errors import KDLabError

NAMED = ("uniform", "skip", "last")
# The config keys that hold a model's number of blocks: BERT and Llama, then GPT-2.
LAYER_KEYS = ("num_hidden_layers", "n_layer")


def layer_pairs(student_layers: int, teacher_layers: int, mapping: str | Sequence) -> list[tuple[int, int]]:
    """The (student_layer, teacher_layer) pairs of ``mapping``, 0-based, ordered by student layer."""
    m, n = int(student_layers), int(teacher_layers)
    if m < 1 or n < 1:
        raise KDLabError(f"layer mapping: student_layers={m} and teacher_layers={n} must both be at least 1.")
    if isinstance(mapping, str):
        return _named(m, n, mapping)
    return _explicit(m, n, mapping)


def _named(m: int, n: int, mapping: str) -> list[tuple[int, int]]:
    if mapping not in NAMED:
        raise KDLabError(
            f"layer mapping {mapping!r} is unknown; use one of {list(NAMED)} or a list of "
            "[student_layer, teacher_layer] pairs (0-based)."
        )
    if n < m:
        raise KDLabError(
            f"layer mapping {mapping!r} needs a teacher at least as deep as the student, but the teacher has "
            f"{n} layers and the student {m}. Give explicit [student_layer, teacher_layer] pairs instead."
        )
    if mapping == "uniform":
        # Floor division keeps the pairs distinct and ends on the teacher's last layer even when M does not
        # divide N.
        return [(j, (j + 1) * n // m - 1) for j in range(m)]
    if mapping == "skip":
        # PKD-skip takes every k-th teacher layer; with a remainder the stride is not one number.
        if n % m:
            raise KDLabError(
                f"layer mapping 'skip' (PKD-skip) needs the teacher's layers ({n}) to be a multiple of the "
                f"student's ({m}). Use 'uniform', 'last', or explicit [student_layer, teacher_layer] pairs."
            )
        return [(j, (j + 1) * n // m - 1) for j in range(m - 1)]
    return [(j, n - m + j) for j in range(m - 1)]  # "last"


def _explicit(m: int, n: int, mapping: Sequence) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    for item in mapping:
        if isinstance(item, str) or not hasattr(item, "__len__") or len(item) != 2:
            raise KDLabError(
                f"layer mapping: {item!r} is not a [student_layer, teacher_layer] pair; give a list of pairs "
                "such as [[0, 1], [1, 3]], or one of " + str(list(NAMED)) + "."
            )
        s, t = item
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (s, t)):
            raise KDLabError(f"layer mapping: pair {list(item)} must hold two integers (0-based layer indices).")
        if not 0 <= s < m:
            raise KDLabError(f"layer mapping: student layer {s} in pair {[s, t]} is out of range 0..{m - 1}.")
        if not 0 <= t < n:
            raise KDLabError(f"layer mapping: teacher layer {t} in pair {[s, t]} is out of range 0..{n - 1}.")
        if any(s == p for p, _ in pairs):
            raise KDLabError(f"layer mapping: student layer {s} appears in more than one pair; give it one teacher.")
        pairs.append((s, t))
    if not pairs:
        raise KDLabError("layer mapping: the list of pairs is empty; give at least one [student_layer, teacher_layer].")
    return sorted(pairs)


def count_layers(model: nn.Module) -> int:
    """The number of transformer blocks: from the model's config when it has one, else its block list."""
    config = getattr(model, "config", None)
    for key in LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    paths = block_paths(model)
    if not paths:
        raise KDLabError(
            f"{type(model).__name__} has no config with num_hidden_layers or n_layer and no nn.ModuleList of "
            "blocks, so its layers cannot be counted. Use a GPT-2, BERT or Llama model."
        )
    return len(paths)


def block_path(model: nn.Module, i: int) -> str:
    """The module path of block ``i`` (0-based): ``transformer.h.<i>``, ``bert.encoder.layer.<i>``,
    ``model.layers.<i>``."""
    paths = block_paths(model)
    if not paths:
        raise KDLabError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks.")
    if not 0 <= i < len(paths):
        raise KDLabError(
            f"{type(model).__name__} has {len(paths)} blocks; block {i} is out of range 0..{len(paths) - 1}."
        )
    return paths[i]
