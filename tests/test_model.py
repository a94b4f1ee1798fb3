"""The model: presets, shapes, initialisation, and exact parity with Hugging Face's GPT2LMHeadModel."""

from __future__ import annotations

import pytest
import torch

from slm.config import PRESETS, ConfigError, ModelConfig, get_preset
from slm.export import export_hf, import_hf, to_hf_model
from slm.generation import generate
from slm.model import GPT


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_matches_the_model(name):
    config = get_preset(name).config
    assert GPT(config).num_parameters() == config.num_parameters()


def test_preset_sizes():
    assert 15e6 < get_preset("slm-16m").config.num_parameters() < 17e6
    assert 16e6 < get_preset("seed-16m").config.num_parameters() < 17e6
    assert 1e5 < get_preset("tiny").config.num_parameters() < 1e6
    seed = get_preset("seed-16m").config
    assert (seed.n_layer, seed.n_head, seed.d_model, seed.context_length, seed.vocab_size, seed.dropout) == (
        4, 4, 256, 128, 50257, 0.2)


def test_unknown_preset_and_bad_config():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(ConfigError, match="unknown model config key"):
        ModelConfig.from_dict({"n_layers": 3})


def test_forward_shapes_and_tied_head(tiny_model):
    x = torch.randint(0, 512, (3, 20))
    assert tiny_model(x).shape == (3, 20, 512)
    assert tiny_model(x, logits_at=torch.tensor([0, 5, 19])).shape == (3, 512)
    names = [n for n, _ in tiny_model.named_parameters()]
    assert not any("lm_head" in n for n in names)  # the output layer is the input embedding


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=4000, context_length=64, n_layer=8, n_head=4, d_model=256))
    assert abs(model.wte.weight.std().item() - 0.02) < 0.001
    assert abs(model.h[0].mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005  # 0.02 / sqrt(2 * 8)
    assert model.h[0].attn.c_attn.bias.abs().max() == 0


def test_inference_head_follows_weight_updates(tiny_model):
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        before = tiny_model(x)
        tiny_model.wte.weight.mul_(2)
        after = tiny_model(x)
        tiny_model.wte.weight.div_(2)
    assert not torch.allclose(before, after)  # the cached transposed head copy was rebuilt


@pytest.fixture()
def random_hf_pair():
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=1000, context_length=128, n_layer=3, n_head=4, d_model=64)).eval()
    # Non-trivial LayerNorm and bias values, so a transposed or misnamed tensor cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model, to_hf_model(model)


def test_logits_match_transformers(random_hf_pair):
    model, hf = random_hf_pair
    x = torch.randint(0, 1000, (2, 100))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_generation_matches_transformers(random_hf_pair):
    model, hf = random_hf_pair
    prompt = torch.randint(0, 1000, (1, 7))
    ours = generate(model, prompt, max_new_tokens=50, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=50, min_new_tokens=50,
                         do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_export_import_round_trip(random_hf_pair, tmp_path):
    import transformers

    model, _ = random_hf_pair
    export_hf(model, tmp_path / "hf")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert isinstance(loaded, transformers.GPT2LMHeadModel)
    back, _ = import_hf(tmp_path / "hf")
    assert back.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
