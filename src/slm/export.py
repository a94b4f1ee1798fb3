"""Convert to and from Hugging Face `transformers`: GPT2LMHeadModel (gpt2) and LlamaForCausalLM (llama).

The architectures are the same; only names and layouts differ. GPT-2: HF keeps its blocks under
``transformer.`` and its Conv1D layers store weights as ``[in, out]`` where our nn.Linear stores ``[out, in]``.
Llama: our fused q|k|v and gate|up matrices are split into HF's separate projections (rotary positions use
HF's half-split layout already, so no permutation). An exported llama directory is what vLLM, TGI and
llama.cpp's convert_hf_to_gguf.py read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from slm.config import ModelConfig
from slm.errors import SlmError
from slm.model import GPT
from slm.tokenizer import EOT, Tokenizer


class ExportError(SlmError):
    """A model that cannot be exported, or a missing exporter package."""

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ExportError("Hugging Face export needs `transformers`: pip install 'slm[dev]' or transformers") from e
    return transformers


def hf_config(config: ModelConfig, eot_id: int | None = None):
    tf = _transformers()
    eot = config.vocab_size - 1 if eot_id is None else eot_id
    if config.arch == "llama":
        return tf.LlamaConfig(
            vocab_size=config.vocab_size, max_position_embeddings=config.context_length, hidden_size=config.d_model,
            intermediate_size=config.hidden, num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
            rms_norm_eps=config.layer_norm_eps, rope_theta=config.rope_theta, attention_bias=False, mlp_bias=False,
            attention_dropout=config.dropout, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
        )
    return tf.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_ctx=config.context_length,
        n_embd=config.d_model,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
    )


LLAMA_NAMES = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
               "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}


def gpt2_state(model: GPT) -> dict[str, torch.Tensor]:
    state = {}
    for name, value in model.state_dict().items():
        state[f"transformer.{name}"] = value.t().contiguous() if name.endswith(TRANSPOSED) else value
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def split_llama_block(block, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A llama block's fused matrices as separate ones: q, k, v (from c_attn), gate, up (from c_fc)."""
    c = config
    q, k, v = block.attn.c_attn.weight.split([c.n_head * c.head_dim, c.kv_heads * c.head_dim,
                                              c.kv_heads * c.head_dim])
    gate, up = block.mlp.c_fc.weight.chunk(2)
    return {"q": q, "k": k, "v": v, "gate": gate, "up": up}


def llama_state(model: GPT) -> dict[str, torch.Tensor]:
    state = {"model.embed_tokens.weight": model.wte.weight, "lm_head.weight": model.wte.weight,
             "model.norm.weight": model.ln_f.weight}
    for i, block in enumerate(model.h):
        prefix = f"model.layers.{i}."
        parts = split_llama_block(block, model.config)
        for proj in "qkv":
            state[f"{prefix}self_attn.{proj}_proj.weight"] = parts[proj]
        state[f"{prefix}mlp.gate_proj.weight"], state[f"{prefix}mlp.up_proj.weight"] = parts["gate"], parts["up"]
        for ours, theirs in LLAMA_NAMES.items():
            state[prefix + theirs] = block.get_parameter(ours)
    return state


def to_hf_model(model: GPT, eot_id: int | None = None):
    """A GPT2LMHeadModel or LlamaForCausalLM with exactly our weights (fp32, eval mode)."""
    tf = _transformers()
    llama = model.config.arch == "llama"
    hf = (tf.LlamaForCausalLM if llama else tf.GPT2LMHeadModel)(hf_config(model.config, eot_id))
    state = {k: v.detach().float().contiguous() for k, v in (llama_state if llama else gpt2_state)(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise ExportError(f"weight names do not match {type(hf).__name__}: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def export_hf(model: GPT, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` (and AutoTokenizer) load."""
    out = Path(out_dir)
    hf = to_hf_model(model, tokenizer.eot_id if tokenizer else None)
    hf.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        fast = _transformers().PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, bos_token=EOT, eos_token=EOT,
                                                      unk_token=EOT, model_max_length=model.config.context_length)
        fast.save_pretrained(out)
    return out


def from_hf_llama(hf) -> GPT:
    c = hf.config
    if c.hidden_act != "silu" or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ExportError("unsupported llama variant: slm's llama uses SiLU (SwiGLU) and no biases")
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"unsupported rope scaling {rope.get('rope_type')!r}: slm uses plain rotary positions")
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        raise ExportError("unsupported llama shape: head_dim must be hidden_size / num_attention_heads")
    config = ModelConfig(vocab_size=c.vocab_size, context_length=c.max_position_embeddings, n_layer=c.num_hidden_layers,
                         n_head=c.num_attention_heads, d_model=c.hidden_size, layer_norm_eps=c.rms_norm_eps,
                         arch="llama", rope_theta=float(rope["rope_theta"]), dropout=float(c.attention_dropout))
    # Settings equal to what slm derives stay 0 ("derived"), so a round trip gives back the same config.
    if c.num_key_value_heads != c.num_attention_heads:
        config = dataclasses.replace(config, n_kv_head=c.num_key_value_heads)
    if config.hidden != c.intermediate_size:
        config = dataclasses.replace(config, mlp_hidden=c.intermediate_size)
    model = GPT(config)
    hf_state = {k: v.detach().float() for k, v in hf.state_dict().items()}
    state = {"wte.weight": hf_state["model.embed_tokens.weight"], "ln_f.weight": hf_state["model.norm.weight"]}
    for i in range(config.n_layer):
        get = lambda name, i=i: hf_state[f"model.layers.{i}.{name}"]  # noqa: E731
        state[f"h.{i}.attn.c_attn.weight"] = torch.cat([get(f"self_attn.{p}_proj.weight") for p in "qkv"])
        state[f"h.{i}.mlp.c_fc.weight"] = torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")])
        for ours, theirs in LLAMA_NAMES.items():
            state[f"h.{i}.{ours}"] = get(theirs)
    model.load_state_dict(state)
    return model.eval()


def from_hf_model(hf) -> GPT:
    if hf.config.model_type == "llama":
        return from_hf_llama(hf)
    c = hf.config
    config = ModelConfig(vocab_size=c.vocab_size, context_length=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                         d_model=c.n_embd, dropout=float(c.resid_pdrop), layer_norm_eps=c.layer_norm_epsilon)
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ExportError(f"unsupported activation {c.activation_function!r}: slm uses GELU(tanh) like GPT-2")
    model = GPT(config)
    hf_state = hf.state_dict()
    state = {}
    for name in model.state_dict():
        value = hf_state[f"transformer.{name}"].detach().float()
        state[name] = value.t().contiguous() if name.endswith(TRANSPOSED) else value
    model.load_state_dict(state)
    return model.eval()


def import_hf(path: str | Path) -> tuple[GPT, Tokenizer | None]:
    """Read a GPT2LMHeadModel or LlamaForCausalLM directory back: our model, and its tokenizer if present."""
    tf = _transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path}: not a Hugging Face model directory (no config.json)")
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in ("gpt2", "llama"):
        raise ExportError(f"{path}: model_type {model_type!r} is not supported (gpt2 or llama)")
    hf = (tf.LlamaForCausalLM if model_type == "llama" else tf.GPT2LMHeadModel).from_pretrained(path,
                                                                                               dtype=torch.float32)
    tok = Tokenizer.load(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    return from_hf_model(hf), tok
