"""Layer mapping: golden pairs computed by hand from the papers' formulas, and every refusal."""

import pytest

from kd_lab.algorithms.layer_map import block_path, count_layers, layer_pairs
from kd_lab.errors import KDLabError

# (student M, teacher N) -> 0-based pairs. uniform: TinyBERT g(m) = m N / M; skip / last: PKD (Sun et al.
# 2019, 12 -> 6: PKD-skip teacher layers {2,4,6,8,10}, PKD-last {7,8,9,10,11}, 1-based).
GOLDEN = {
    (6, 12): {
        "uniform": [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)],
        "skip": [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9)],
        "last": [(0, 6), (1, 7), (2, 8), (3, 9), (4, 10)],
    },
    (4, 12): {
        "uniform": [(0, 2), (1, 5), (2, 8), (3, 11)],
        "skip": [(0, 2), (1, 5), (2, 8)],
        "last": [(0, 8), (1, 9), (2, 10)],
    },
    (3, 6): {"uniform": [(0, 1), (1, 3), (2, 5)], "skip": [(0, 1), (1, 3)], "last": [(0, 3), (1, 4)]},
    (2, 4): {"uniform": [(0, 1), (1, 3)], "skip": [(0, 1)], "last": [(0, 2)]},
}


@pytest.mark.parametrize("sizes", list(GOLDEN))
@pytest.mark.parametrize("mapping", ["uniform", "skip", "last"])
def test_named_mappings_match_hand_computed_pairs(sizes, mapping):
    assert layer_pairs(*sizes, mapping) == GOLDEN[sizes][mapping]


def test_uniform_without_divisibility_still_ends_on_the_last_teacher_layer():
    assert layer_pairs(4, 6, "uniform") == [(0, 0), (1, 2), (2, 3), (3, 5)]


def test_explicit_pairs_are_validated_and_sorted():
    assert layer_pairs(2, 4, [[1, 3], [0, 0]]) == [(0, 0), (1, 3)]


@pytest.mark.parametrize(
    "args, words",
    [
        ((2, 4, "middle"), "unknown"),
        ((4, 2, "uniform"), "at least as deep"),
        ((4, 2, "skip"), "at least as deep"),
        ((4, 10, "skip"), "multiple"),
        ((2, 4, [[2, 0]]), "student layer 2"),
        ((2, 4, [[0, 4]]), "teacher layer 4"),
        ((2, 4, [[0, 1], [0, 2]]), "more than one pair"),
        ((2, 4, [[0, 1, 2]]), "not a [student_layer, teacher_layer] pair"),
        ((2, 4, [["0", 1]]), "two integers"),
        ((2, 4, []), "empty"),
        ((0, 4, "uniform"), "at least 1"),
    ],
)
def test_invalid_mappings_are_refused_with_what_is_valid(args, words):
    with pytest.raises(KDLabError, match=words.replace("[", r"\[").replace("]", r"\]")):
        layer_pairs(*args)


def test_count_layers_and_block_path_on_gpt2_bert_llama():
    from kd_lab.models.hf import causal_lm, masked_lm

    sizes = dict(vocab_size=32, max_positions=8, hidden_size=8, num_layers=3, num_heads=2)
    expected = {"gpt2": "transformer.h.2", "bert": "bert.encoder.layer.2", "llama": "model.layers.2"}
    models = {
        "gpt2": causal_lm(arch="gpt2", **sizes),
        "bert": masked_lm(**sizes),
        "llama": causal_lm(arch="llama", **sizes),
    }
    for name, model in models.items():
        assert count_layers(model) == 3
        assert block_path(model, 2) == expected[name]
        assert dict(model.named_modules())[block_path(model, 0)] is not None
        with pytest.raises(KDLabError, match="out of range"):
            block_path(model, 3)
