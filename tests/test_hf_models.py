"""Hugging Face builders: shapes, eager attention, save/load round trip, clear errors, block paths."""

import pytest
import torch

pytest.importorskip("transformers")

from hydra.utils import instantiate

from kd_lab.errors import KDLabError
from kd_lab.models import hf

TINY = {"vocab_size": 100, "max_positions": 32, "hidden_size": 32, "num_layers": 2, "num_heads": 2}
BUILDERS = {
    "gpt2": lambda **kw: hf.causal_lm("gpt2", **kw),
    "llama": lambda **kw: hf.causal_lm("llama", **kw),
    "bert": hf.masked_lm,
}
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers", "bert": "bert.encoder.layer"}


def tokens(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_forward_shapes_and_eager_attention(arch):
    model = BUILDERS[arch](**TINY).eval()
    out = model(tokens(), output_attentions=True)
    assert out.logits.shape == (2, 7, 100)
    assert model.config._attn_implementation == "eager"
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 7, 7)
    assert hf.vocab_size(model) == 100 and hf.max_positions(model) == 32


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_transformer_layers_are_the_blocks(arch):
    model = BUILDERS[arch](**TINY).eval()
    paths = hf.transformer_layers(model)
    assert paths == [f"{BLOCKS[arch]}.0", f"{BLOCKS[arch]}.1"]
    seen = []
    model.get_submodule(paths[-1]).register_forward_hook(lambda m, i, o: seen.append(o))
    model(tokens())
    # transformers 5.x blocks return the hidden state itself; block_hidden also reads 4.x tuples.
    assert hf.block_hidden(seen[0]).shape == (2, 7, 32)
    assert hf.block_hidden((seen[0], None)) is hf.block_hidden(seen[0])


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_pretrained_round_trip(arch, tmp_path):
    model = BUILDERS[arch](**TINY).eval()
    model.save_pretrained(tmp_path)
    loaded = BUILDERS[arch](pretrained=str(tmp_path), vocab_size=100).eval()
    assert loaded.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, model(tokens()).logits)


def test_missing_path_names_the_fix(tmp_path):
    missing = str(tmp_path / "no_model")
    with pytest.raises(KDLabError, match="no such directory") as info:
        hf.causal_lm(pretrained=missing)
    assert missing in str(info.value) and "save_pretrained" in str(info.value)


def test_unreachable_hub_name_names_the_fix(monkeypatch):
    # Offline mode fails at once instead of retrying the network.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KDLabError, match="HF_HUB_OFFLINE") as info:
        hf.masked_lm(pretrained="kd-lab-test/not-a-model")
    assert "kd-lab-test/not-a-model" in str(info.value)


def test_vocab_mismatch_with_pretrained(tmp_path):
    hf.causal_lm("gpt2", **TINY).save_pretrained(tmp_path)
    with pytest.raises(KDLabError, match=r"vocab_size=100.*vocab_size=50"):
        hf.causal_lm(pretrained=str(tmp_path), vocab_size=50)


def test_size_errors():
    with pytest.raises(KDLabError, match="missing max_positions"):
        hf.causal_lm("gpt2", vocab_size=10, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(KDLabError, match="not divisible"):
        hf.masked_lm(**{**TINY, "num_heads": 3})
    with pytest.raises(KDLabError, match="unknown arch"):
        hf.causal_lm("t5", **TINY)


def test_hydra_target_and_size_mapping():
    cfg = {"_target_": "kd_lab.models.hf.causal_lm", "arch": "llama", **TINY, "intermediate_size": 48, "dropout": 0.1}
    model = instantiate(cfg)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 48
    assert model.config.attention_dropout == 0.1
    gpt2 = hf.causal_lm("gpt2", **TINY, tie_word_embeddings=False)
    assert gpt2.config.n_inner == 128 and gpt2.lm_head.weight is not gpt2.transformer.wte.weight
    assert gpt2.config.eos_token_id is None  # no tokenizer, so no special tokens
