"""slm export-gguf: the file holds exactly our weights (read back with gguf's own reader), the hyperparameters
and the tokenizer that llama.cpp needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_PRESETS, slm_cli


def read(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    return fields, tensors


def our_state(tensors: dict[str, np.ndarray], config) -> dict[str, torch.Tensor]:
    """Rebuild our state dict from the GGUF tensors (undoing the split and the rotary interleave)."""
    def t(name):
        return torch.from_numpy(tensors[name].astype(np.float32))

    def halves(w, heads):  # inverse of gguf_export.interleave_rotary
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    state = {"wte.weight": t("token_embd.weight"), "ln_f.weight": t("output_norm.weight")}
    if config.arch == "gpt2":
        state.update({"wpe.weight": t("position_embd.weight"), "ln_f.bias": t("output_norm.bias")})
    names = ({"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"} if config.arch == "gpt2" else
             {"ln_1": "attn_norm", "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_proj": "ffn_down"})
    for i in range(config.n_layer):
        for ours, theirs in names.items():
            state[f"h.{i}.{ours}.weight"] = t(f"blk.{i}.{theirs}.weight")
            if config.arch == "gpt2":
                state[f"h.{i}.{ours}.bias"] = t(f"blk.{i}.{theirs}.bias")
        if config.arch == "llama":
            state[f"h.{i}.attn.c_attn.weight"] = torch.cat([halves(t(f"blk.{i}.attn_q.weight"), config.n_head),
                                                            halves(t(f"blk.{i}.attn_k.weight"), config.kv_heads),
                                                            t(f"blk.{i}.attn_v.weight")])
            state[f"h.{i}.mlp.c_fc.weight"] = torch.cat([t(f"blk.{i}.ffn_gate.weight"), t(f"blk.{i}.ffn_up.weight")])
    return state


@pytest.mark.parametrize("family", list(TINY_PRESETS))
def test_gguf_round_trip_is_exact(family, prepared, tmp_path):
    from slm.checkpoint import load, save
    from slm.config import get_preset
    from slm.model import GPT
    from slm.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = get_preset(TINY_PRESETS[family]).config
    tokenizer = Tokenizer.load(prepared / "tokenizer.json")
    save(GPT(config), tokenizer, tmp_path / "model")
    out = slm_cli("export-gguf", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "model.gguf"))
    assert out.returncode == 0, out.stderr
    model, _ = load(tmp_path / "model")
    fields, tensors = read(tmp_path / "model.gguf")

    arch = fields["general.architecture"]
    assert arch == family
    assert fields[f"{arch}.context_length"] == config.context_length
    assert fields[f"{arch}.block_count"] == config.n_layer
    assert fields[f"{arch}.embedding_length"] == config.d_model
    assert fields[f"{arch}.feed_forward_length"] == config.hidden
    assert fields[f"{arch}.attention.head_count"] == config.n_head
    if family == "llama":
        assert fields["llama.attention.head_count_kv"] == config.kv_heads
        assert fields["llama.rope.dimension_count"] == config.head_dim
        assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_theta)

    rebuilt = our_state(tensors, config)
    expected = model.state_dict()
    expected = {k: v for k, v in expected.items() if not k.startswith("rope_")}
    assert set(rebuilt) == set(expected)
    for name, value in expected.items():
        assert torch.equal(rebuilt[name], value), name  # f32: bit-exact
    assert np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])  # tied

    vocab = json.loads(tokenizer.hf.to_str())["model"]["vocab"]
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eot_id == fields["tokenizer.ggml.bos_token_id"]
    assert tokens[tokenizer.eot_id] == "<|endoftext|>"
    assert len(fields["tokenizer.ggml.merges"]) > 0

    # f16: matrices halve in size and stay within f16 rounding; norms stay f32.
    slm_cli("export-gguf", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "f16.gguf"), "--dtype", "f16")
    _, half = read(tmp_path / "f16.gguf")
    assert half["token_embd.weight"].dtype == np.float16 and half["output_norm.weight"].dtype == np.float32
    assert np.allclose(half["token_embd.weight"], tensors["token_embd.weight"], rtol=1e-3, atol=1e-4)


LLAMA_CPP_PROMPTS = ["Once upon a time there was a little", "One day Tom found", "The fox said"]


def our_greedy_text(model_dir, prompt: str, n: int) -> bytes:
    from slm.checkpoint import load
    from slm.generation import SamplingParams, generate

    model, tokenizer = load(model_dir)
    greedy = SamplingParams(max_new_tokens=n, temperature=0)
    out = generate(model, [tokenizer.encode(prompt)], greedy, tokenizer=tokenizer)
    return tokenizer.decode(out[0]).encode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["trained", "trained_llama", "bundled"])
def test_llama_cpp_runs_the_export_with_our_greedy_tokens(which, request, tmp_path):
    """llama.cpp itself loads the f32 GGUF and continues each prompt with exactly our greedy text."""
    from slm import llama_cpp
    from slm.checkpoint import resolve

    model_dir = resolve("default") if which == "bundled" else request.getfixturevalue(which)
    n = 60 if which == "bundled" else 40  # the tiny models' context is 64 tokens
    gguf = tmp_path / "model.gguf"
    out = slm_cli("export-gguf", "--model", str(model_dir), "--out", str(gguf))
    assert out.returncode == 0, out.stderr
    for prompt in LLAMA_CPP_PROMPTS:
        ours = our_greedy_text(model_dir, prompt, n)
        theirs = llama_cpp.greedy_text(gguf, prompt, n)
        assert len(ours) > len(prompt) + 20  # the comparison covers a real continuation
        assert theirs == ours, (prompt, theirs, ours)
