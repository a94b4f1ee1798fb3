"""The model: presets, shapes, initialisation, and exact parity with transformers' GPT2LMHeadModel and
LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from slm.config import PRESETS, ConfigError, ModelConfig, get_preset
from slm.export import export_hf, import_hf, to_hf_model
from slm.generation import SamplingParams, generate
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


def test_loss_with_targets_is_the_cross_entropy_of_the_logits(tiny_model):
    """``targets=`` returns the training loss (computed inside forward, so torch.compile fuses it): the mean
    cross-entropy of the logits over the targets, the ignored ones (-100, instruct headers) left out."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 512, (3, 20)), torch.randint(0, 512, (3, 20))
    y[0, :7] = -100
    loss = tiny_model(x, targets=y)
    expected = torch.nn.functional.cross_entropy(tiny_model(x).flatten(0, 1), y.flatten())
    assert loss.shape == () and torch.allclose(loss, expected)
    assert not torch.allclose(loss, torch.nn.functional.cross_entropy(tiny_model(x).flatten(0, 1),
                                                                     y.clamp(min=0).flatten()))


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


def test_a_model_made_inside_inference_mode_runs(tiny_model):
    """Weights created under torch.inference_mode() (loading a model there) have no version counter: the
    inference head must not need one, and must give the same logits."""
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        expected = tiny_model(tokens)
        inside = GPT(tiny_model.config).eval()
        inside.load_state_dict(tiny_model.state_dict())
        assert inside.wte.weight.is_inference()
        assert torch.allclose(inside(tokens), expected, atol=1e-5)


def test_llama_block_shapes_and_grouped_query_cache():
    from slm.kv_cache import KVCache

    config = get_preset("tiny-llama").config
    model = GPT(config)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") or n.startswith("wpe") for n in names)  # no biases, rotary positions
    assert isinstance(model.ln_f, torch.nn.RMSNorm)
    assert model.h[0].attn.c_attn.weight.shape == ((4 + 2 * 2) * 24, 96)  # q: 4 heads, k and v: 2 heads each
    # llama-16m: SwiGLU hidden 1024 keeps a block within 1% of a GPT-2 block of the same width.
    llama, gpt2 = get_preset("llama-16m").config, get_preset("slm-16m").config
    assert llama.hidden == 1024 and llama.hidden % 32 == 0
    per_block = [(c.num_parameters() - ModelConfig(**{**c.to_dict(), "n_layer": 1}).num_parameters())
                 for c in (llama, gpt2)]
    assert abs(per_block[0] / per_block[1] - 1) < 0.01, per_block
    cache = KVCache.for_model(model, batch_size=2)
    assert cache.k.shape == (3, 2, 2, 64, 24)  # the cache holds only the 2 key/value heads
    with pytest.raises(ConfigError, match="llama settings"):
        ModelConfig(n_kv_head=2)
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        ModelConfig(arch="llama", n_head=6, n_kv_head=4)
    with pytest.raises(ConfigError, match="arch must be one of"):
        ModelConfig(arch="mamba")


def test_rotary_positions_are_relative():
    """Rotary attention scores depend only on the distance between positions."""
    from slm.model import apply_rotary, rotary_tables

    cos, sin = rotary_tables(get_preset("tiny-llama").config)
    q, k = torch.randn(1, 1, 1, 24), torch.randn(1, 1, 1, 24)

    def score(i, j):
        return float((apply_rotary(q, cos[i], sin[i]) * apply_rotary(k, cos[j], sin[j])).sum())

    assert score(7, 3) == pytest.approx(score(40, 36), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


@pytest.fixture(params=["gpt2", "llama"])
def random_hf_pair(request):
    torch.manual_seed(1)
    llama = {"arch": "llama", "n_kv_head": 2} if request.param == "llama" else {}
    model = GPT(ModelConfig(vocab_size=1000, context_length=128, n_layer=3, n_head=4, d_model=64, **llama)).eval()
    # Non-trivial norm gains and biases, so a transposed or misnamed tensor cannot go unnoticed.
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
    ours = generate(model, prompt, SamplingParams(max_new_tokens=50, temperature=0))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=50, min_new_tokens=50,
                         do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_export_import_round_trip(random_hf_pair, tmp_path):
    import transformers

    model, hf = random_hf_pair
    export_hf(model, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded) is type(hf)  # GPT2LMHeadModel or LlamaForCausalLM
    if model.config.arch == "gpt2":
        assert loaded.config.n_ctx == model.config.context_length  # llama.cpp's converter reads n_ctx
    back, _ = import_hf(tmp_path / "hf")
    assert back.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
