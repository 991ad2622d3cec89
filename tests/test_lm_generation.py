"""Generation speed, seeded sampling and speculative decoding with tiny Hugging Face causal LMs."""

import pytest
import torch

pytest.importorskip("transformers")

from kd_lab.errors import KDLabError
from kd_lab.lm.generation import generation_speed, sample
from kd_lab.lm.speculative import acceptance_rate, speculative_decode, verify_sampled
from kd_lab.models import hf

VOCAB = 50
# A wide init makes the next-token distributions peaked, so two random models clearly disagree.
TINY = {"vocab_size": VOCAB, "max_positions": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 2}


def lm(arch: str = "gpt2", seed: int = 0, **sizes):
    torch.manual_seed(seed)
    return hf.causal_lm(arch, **{**TINY, **sizes}, initializer_range=0.5).eval()


def prompts(batch: int = 2, length: int = 5, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def greedy(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0)


def test_generation_speed_counts_every_token_and_keeps_train_mode():
    model = lm().train()
    stats = generation_speed(model, prompts(3), max_new_tokens=6, repeats=2)
    assert stats["new_tokens"] == 3 * 6 * 2
    assert stats["seconds"] > 0 and stats["tokens_per_second"] > 0
    assert model.training


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sample_is_seeded_and_top1_is_greedy(arch):
    model, ids = lm(arch), prompts()
    a = sample(model, ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample(model, ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 13) and torch.equal(a, b) and torch.equal(a[:, :5], ids)
    # top_k=1 leaves one token per step: the KV-cache loop must then reproduce generate's greedy output.
    assert torch.equal(sample(model, ids, 8, temperature=0.7, top_k=1), greedy(model, ids, 8))


def test_generation_input_errors():
    with pytest.raises(KDLabError, match="exceeds the model's 64 positions"):
        generation_speed(lm(), prompts(length=60), max_new_tokens=8)
    with pytest.raises(KDLabError, match="cannot generate"):
        sample(hf.masked_lm(**TINY), prompts(), 4)
    with pytest.raises(KDLabError, match="temperature"):
        sample(lm(), prompts(), 4, temperature=0.0)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_draft_equal_to_target_accepts_everything(mode):
    model = lm()
    stats = acceptance_rate(model, model, prompts(), gamma=3, max_new_tokens=10, mode=mode)
    assert stats["acceptance_rate"] == 1.0
    assert stats["proposed"] == stats["accepted"] > 0
    # Each full round makes gamma + 1 tokens: 10 tokens = 3 rounds (3 + 1, 3 + 1, then 2 proposed).
    assert stats["rounds"] == 2 * 3 and stats["mean_accepted_per_round"] == pytest.approx(8 / 3)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_a_different_draft_is_accepted_less(mode):
    stats = acceptance_rate(lm(seed=1), lm(seed=0), prompts(), gamma=3, max_new_tokens=10, mode=mode)
    assert stats["acceptance_rate"] < 0.5
    assert stats["acceptance_rate"] == stats["accepted"] / stats["proposed"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_speculation_is_the_targets_greedy_decoding(arch):
    draft, target, ids = lm(arch, seed=1, num_layers=1), lm(arch, seed=0), prompts()
    run = speculative_decode(draft, target, ids, gamma=3, max_new_tokens=12, mode="greedy")
    assert torch.equal(run.sequences, greedy(target, ids, 12))


def test_sampled_speculation_is_seeded():
    draft, target, ids = lm(seed=1), lm(seed=0), prompts()
    a = speculative_decode(draft, target, ids, 2, 8, "sampled", temperature=0.8, seed=5)
    b = speculative_decode(draft, target, ids, 2, 8, "sampled", temperature=0.8, seed=5)
    assert torch.equal(a.sequences, b.sequences) and a.accepted == b.accepted


def test_rejection_sampling_follows_the_target_exactly():
    # The draft puts most mass where the target puts little, so most proposals are rejected and resampled.
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.05, 0.1, 0.25, 0.6]])
    generator = torch.Generator().manual_seed(0)
    draws = 8000
    produced = torch.empty(draws, dtype=torch.long)
    for i in range(draws):
        x = torch.multinomial(q[0], 1, generator=generator)
        accepted, token = verify_sampled(x, q, p, generator)
        produced[i] = x if accepted else token  # the first token produced: the draft's, or its replacement
    freq = torch.bincount(produced, minlength=4) / draws
    torch.testing.assert_close(freq, p[0], atol=0.02, rtol=0)  # 3.6 standard errors at most


def test_one_step_speculation_samples_the_target_distribution():
    draft, target = lm(seed=5, vocab_size=6), lm(seed=0, vocab_size=6)
    ids = prompts(1, 3, vocab=6)
    with torch.no_grad():
        p, q = (m(ids).logits[0, -1].softmax(-1) for m in (target, draft))
    assert (p - q).abs().max() > 0.3  # the draft alone would fail the check below
    rows = 400
    run = speculative_decode(draft, target, ids.repeat(rows, 1), gamma=1, max_new_tokens=1, mode="sampled")
    freq = torch.bincount(run.sequences[:, -1], minlength=6) / rows
    torch.testing.assert_close(freq, p, atol=0.08, rtol=0)


def test_speculation_input_errors():
    with pytest.raises(KDLabError, match="mode="):
        acceptance_rate(lm(), lm(), prompts(), mode="beam")


def test_padded_vocabularies_share_their_first_rows():
    """A draft whose embedding is padded beyond the target's is cut to the target's vocabulary: with the padding
    rows unused by the prompts, it proposes exactly what the unpadded draft proposes."""
    draft = lm()
    padded = lm(vocab_size=draft.config.vocab_size + 8)
    with torch.no_grad():
        padded.transformer.wte.weight[: draft.config.vocab_size] = draft.transformer.wte.weight
        for (name, a), (_, b) in zip(draft.named_parameters(), padded.named_parameters(), strict=True):
            if "wte" not in name and a.shape == b.shape:
                b.copy_(a)
    target = lm(seed=1)
    same = acceptance_rate(draft, target, prompts(), mode="greedy")
    cut = acceptance_rate(padded, target, prompts(), mode="greedy")
    assert same == cut
