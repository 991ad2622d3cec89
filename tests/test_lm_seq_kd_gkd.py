"""Sequence-level KD (Kim & Rush 2016) and on-policy distillation (GKD, Agarwal et al. 2024) on causal LMs:
golden values, gradient checks, beam search against brute force, the sequence store and its key, the
reproducible on-policy draws, and the refusals at build time (docs/lm-sequence-and-on-policy.md)."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from test_lm import FDR, MASKED, assert_lm_metrics, lm_cfg

from kd_lab.algorithms.base import BuildContext, StepOutputs
from kd_lab.algorithms.gkd import GKD, ON_POLICY, draw_seed
from kd_lab.algorithms.seq_kd import SOURCE, SeqKD, continuation_targets
from kd_lab.core.tasks.language_modeling import IGNORE_INDEX, LanguageModeling
from kd_lab.errors import KDLabError
from kd_lab.lm.sequence_store import GenerationSettings, SequenceStore, beam_search, load_or_generate
from kd_lab.models.hf import causal_lm
from kd_lab.run.train import train

X = IGNORE_INDEX


def tiny_lm(seed: int = 0, vocab: int = 7):
    torch.manual_seed(seed)
    return causal_lm(vocab_size=vocab, max_positions=16, hidden_size=16, num_layers=1, num_heads=2).eval()


def context(length: int = 6, objective: str = "causal") -> BuildContext:
    return BuildContext(LanguageModeling(vocab_size=7, objective=objective), num_train=4, input_shape=(length,))


# -- targets and golden losses ---------------------------------------------------------------------------
def test_continuation_targets_keep_only_the_generated_tokens():
    seq = torch.tensor([[10, 11, 12, 13, 14]])
    # prompt of 2: position 1 predicts the first generated token (12); the last position predicts nothing
    assert continuation_targets(seq, 2).tolist() == [[X, 12, 13, 14, X]]
    assert continuation_targets(seq, 1).tolist() == [[11, 12, 13, 14, X]]


def step_outputs(logits, teacher, batch) -> StepOutputs:
    return StepOutputs(logits=logits, batch=batch, teacher_logits=teacher, task=LanguageModeling(vocab_size=3))


def test_seq_kd_golden_seq_ce_and_word_kd_on_real_rows():
    """Row 0 is a teacher sequence, row 1 a real block; seq_weight 0.7, word_weight 0.3 (forward KL)."""
    alg = SeqKD(prompt_length=2, seq_weight=0.7, word_weight=0.3, word_data="real")
    s = torch.tensor(
        [[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [[0.5, 0.0, 0.0], [0.0, 0.0, 1.0], [1, 1, 1]]]
    )
    t = torch.tensor(
        [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [1, 1, 1]]]
    )
    batch = {
        "input": torch.zeros(2, 3, dtype=torch.long),
        "target": torch.tensor([[X, 1, X], [2, 0, X]]),
        SOURCE: torch.tensor([True, False]),
    }
    terms = alg(step_outputs(s, t, batch))
    # Seq-KD: one token, row 0 position 1, target 1, logits [0, 2, 0]
    ce = -(2.0 - torch.tensor([0.0, 2.0, 0.0]).exp().sum().log())
    # Word-KD: row 1 positions 0 and 1, KL(p_T || p_S), divided by the 2 real tokens
    kl = sum((F.softmax(t[1, j], -1) * (F.log_softmax(t[1, j], -1) - F.log_softmax(s[1, j], -1))).sum() for j in (0, 1))
    assert set(terms) == {"seq_ce", "word_forward_kl"}
    torch.testing.assert_close(terms["seq_ce"], 0.7 * ce)
    torch.testing.assert_close(terms["word_forward_kl"], 0.3 * kl / 2)


def test_seq_kd_word_kd_on_generated_rows_uses_their_tokens_only():
    alg = SeqKD(prompt_length=2, seq_weight=0.0, word_weight=1.0, word_data="generated")
    s, t = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    batch = {"input": torch.zeros(2, 3, dtype=torch.long), "target": torch.tensor([[X, 1, X], [2, 0, X]])}
    batch[SOURCE] = torch.tensor([True, False])
    terms = alg(step_outputs(s, t, batch))
    expected = (F.softmax(t[0, 1], -1) * (F.log_softmax(t[0, 1], -1) - F.log_softmax(s[0, 1], -1))).sum()
    assert set(terms) == {"word_forward_kl"}
    torch.testing.assert_close(terms["word_forward_kl"], expected)


def test_gkd_golden_reverse_kl_on_the_continuation():
    alg = GKD(divergence="reverse_kl", kd_weight=2.0, prompt_length=2)
    s = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]])
    t = torch.tensor([[[5.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    batch = {"input": torch.zeros(1, 3, dtype=torch.long), "target": torch.tensor([[X, 1, 0]])}
    terms = alg(step_outputs(s, t, batch))

    def rkl(a, b):  # KL(softmax a || softmax b) of two 2-token distributions, by hand
        p, q = a.softmax(-1), b.softmax(-1)
        return (p * (p / q).log()).sum()

    torch.testing.assert_close(terms["reverse_kl"], 2.0 * (rkl(s[0, 1], t[0, 1]) + rkl(s[0, 2], t[0, 2])) / 2)


def test_gradcheck_of_both_losses_in_float64():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 5, dtype=torch.float64)
    target = torch.tensor([[X, 1, 3, X], [0, 2, 4, 1]])
    seq = SeqKD(prompt_length=2, seq_weight=0.6, word_weight=0.4, word_data="real")
    gkd = GKD(divergence="jsd", beta=0.9, prompt_length=2)
    batch = {"input": torch.zeros(2, 4, dtype=torch.long), "target": target, SOURCE: torch.tensor([True, False])}

    def seq_loss(s):
        return sum(seq(step_outputs(s, t, batch)).values())

    def gkd_loss(s):
        return sum(gkd(step_outputs(s, t, batch)).values())

    for loss in (seq_loss, gkd_loss):
        s = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(loss, (s,))


# -- beam search and the sequence store ------------------------------------------------------------------
def test_beam_as_wide_as_the_vocabulary_finds_the_most_likely_two_token_continuation():
    """With beam = V and 2 new tokens, every 2-token continuation is kept or dominated: beam search is exact."""
    model, prompts = tiny_lm(), torch.tensor([[1, 2, 3], [4, 0, 6]])
    found = beam_search(model, prompts, 2, beam_size=7)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            best = max(
                itertools.product(range(7), repeat=2),
                key=lambda pair: (
                    model(torch.tensor([[*prompt.tolist(), *pair]]))
                    .logits[0, 2:4]
                    .log_softmax(-1)
                    .gather(-1, torch.tensor(pair)[:, None])
                    .sum()
                    .item()
                ),
            )
            assert found[row, 3:].tolist() == list(best)
            assert found[row, :3].tolist() == prompt.tolist()


def test_beam_of_one_is_greedy_decoding():
    model, prompts = tiny_lm(), torch.tensor([[1, 2, 3]])
    found = beam_search(model, prompts, 3, beam_size=1)
    ids = prompts
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert found.tolist() == ids.tolist()


def test_store_generates_once_then_reuses_and_its_key_follows_weights_data_and_settings(tmp_path):
    store, teacher = SequenceStore(tmp_path), tiny_lm()
    train_inputs = torch.randint(0, 7, (5, 8))
    prompts = train_inputs[:, :3]
    beam = GenerationSettings("beam", prompt_length=3, beam_size=2)
    first, info = load_or_generate(store, teacher, prompts, 8, beam, train_inputs)
    again, info2 = load_or_generate(store, teacher, prompts, 8, beam, train_inputs)
    assert not info["reused"] and info2["reused"] and info["key"] == info2["key"]
    assert info["bytes"] == 5 * 8 * 4 and info2["generation_seconds"] == 0.0
    assert torch.equal(first, again) and torch.equal(first[:, :3], prompts)
    assert [p.name for p in tmp_path.iterdir()] == [info["key"]]  # no staging directory left behind
    assert json.loads((tmp_path / info["key"] / "key.json").read_text())["key"]["generation"]["beam_size"] == 2
    other = {
        "settings": load_or_generate(store, teacher, prompts, 8, GenerationSettings("greedy", 3), train_inputs),
        "weights": load_or_generate(store, tiny_lm(seed=1), prompts, 8, beam, train_inputs),
        "data": load_or_generate(store, teacher, prompts, 8, beam, train_inputs.flip(0)),
    }
    for name, (_, other_info) in other.items():
        assert other_info["key"] != info["key"] and not other_info["reused"], name


def test_sampled_sequences_are_a_function_of_the_generation_seed():
    teacher, prompts = tiny_lm(), torch.randint(0, 7, (4, 2))
    runs = [
        load_or_generate(None, teacher, prompts, 10, GenerationSettings("sample", 2, seed=s), prompts)[0]
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_seq_kd_serves_the_rows_of_the_batch_indices_and_appends_real_rows():
    alg = SeqKD(prompt_length=2, word_weight=1.0, word_data="real")
    alg.sequences = torch.arange(24).reshape(4, 6)  # as if generated: row i serves training block i
    batch = {"input": torch.full((2, 6), 99), "target": torch.full((2, 6), 98), "index": torch.tensor([3, 1])}
    served = alg.training_batch(batch)
    assert served["input"][:2].tolist() == [list(range(18, 24)), list(range(6, 12))]
    assert served["target"][0].tolist() == [X, 20, 21, 22, 23, X]
    assert served["input"][2:].eq(99).all() and served[SOURCE].tolist() == [True, True, False, False]
    alone = SeqKD(prompt_length=2)  # word_weight 0: no real rows
    alone.sequences = alg.sequences
    assert alone.training_batch(batch)["input"].shape == (2, 6)


# -- GKD's draws -------------------------------------------------------------------------------------------
def gkd_for(lam: float, seed: int = 0) -> GKD:
    alg = GKD(lam=lam, prompt_length=3, seed=seed)
    alg.bind(tiny_lm(1), tiny_lm(0))
    alg.build({}, {}, context(length=8))
    return alg


def test_gkd_draws_are_a_function_of_seed_epoch_and_batch():
    batch = {"input": torch.randint(0, 7, (4, 8)), "index": torch.arange(4)}
    batch["target"] = torch.randint(0, 7, (4, 8))

    def served(seed: int, epoch: int, batches: int) -> torch.Tensor:
        alg = gkd_for(1.0, seed)
        alg.on_epoch_start(epoch, 5)
        for _ in range(batches):
            out = alg.training_batch(batch)
        return out["input"]

    first = served(0, 2, 3)
    assert torch.equal(first, served(0, 2, 3))
    assert torch.equal(first[:, :3], batch["input"][:, :3])  # the prompt is the block's
    assert not torch.equal(first, served(0, 1, 3)) and not torch.equal(first, served(1, 2, 3))
    assert draw_seed(0, 1, 2) != draw_seed(0, 2, 1)


def test_gkd_lambda_picks_the_data():
    batch = {"input": torch.randint(0, 7, (2, 8)), "target": torch.randint(0, 7, (2, 8)), "index": torch.arange(2)}
    supervised, on_policy, mixed = gkd_for(0.0), gkd_for(1.0), gkd_for(0.5)
    for _ in range(20):
        real = supervised.training_batch(batch)
        assert not real[ON_POLICY] and torch.equal(real["input"], batch["input"])
        assert real["target"][:, :2].eq(X).all() and torch.equal(real["target"][:, 2:], batch["target"][:, 2:])
        sampled = on_policy.training_batch(batch)
        assert sampled[ON_POLICY] and sampled["target"][:, -1].eq(X).all()
        mixed.training_batch(batch)
    assert 0 < mixed.on_policy_batches < 20  # about half: 20 fair coins all equal has odds 2 in a million
    assert on_policy.report(None, None) == {"on_policy_batches": 20, "batches": 20}


# -- refusals before compute -------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["seq_kd", "gkd"])
def test_a_masked_lm_is_refused_at_build_time(make_cfg, tmp_path, algorithm):
    with pytest.raises(KDLabError, match="not a causal LM"):
        train(lm_cfg(make_cfg, *MASKED, f"algorithm={algorithm}"))
    assert not (tmp_path / "teachers").exists()  # refused before the teacher store trained anything


@pytest.mark.parametrize("algorithm", ["seq_kd", "gkd"])
def test_a_prompt_as_long_as_the_block_is_refused_at_build_time(algorithm):
    alg = SeqKD(prompt_length=6) if algorithm == "seq_kd" else GKD(prompt_length=6)
    alg.train_inputs = torch.zeros(4, 6, dtype=torch.long)
    with pytest.raises(KDLabError, match=r"prompt_length=6 leaves nothing to generate.*below 6"):
        alg.build({}, {}, context(length=6))
    with pytest.raises(KDLabError, match="needs causal language modeling"):
        alg.build({}, {}, context(length=8, objective="masked"))


def test_the_bound_models_are_not_the_algorithms_parameters():
    """The algorithm holds teacher and student by reference: no copy is trained or saved with it."""
    seq, gkd = SeqKD(), GKD()
    seq.bind(tiny_lm(1), tiny_lm(0))
    gkd.bind(tiny_lm(1), tiny_lm(0))
    for alg in (seq, gkd):
        assert list(alg.parameters()) == [] and alg.state_dict() == {}


def test_bad_options_are_refused_with_the_valid_ones():
    with pytest.raises(KDLabError, match=r"decoding='top_p' is not one of \['greedy', 'sample', 'beam'\]"):
        SeqKD(decoding="top_p")
    with pytest.raises(KDLabError, match="word_data='both'"):
        SeqKD(word_data="both")
    with pytest.raises(KDLabError, match="divergence='kl'"):
        GKD(divergence="kl")
    with pytest.raises(KDLabError, match="needs a teacher"):
        GKD().bind(tiny_lm(), None)


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_seq_kd_run_stores_the_sequences_and_a_second_run_reuses_them(make_cfg):
    overrides = ["algorithm=seq_kd", "algorithm.beam_size=2", "algorithm.word_weight=0.5"]
    first, _ = train(lm_cfg(make_cfg, *overrides))
    second, _ = train(make_cfg(*FDR, *overrides, fast=False, run="second"))  # lm_cfg in another run dir
    assert_lm_metrics(first)
    assert_lm_metrics(second)
    a, b = first["algorithm"]["sequence_store"], second["algorithm"]["sequence_store"]
    assert not a["reused"] and b["reused"] and a["key"] == b["key"] and a["generation_seconds"] > 0
    assert a["sequences"] > 0 and a["bytes"] == a["sequences"] * a["tokens_per_sequence"] * 4
