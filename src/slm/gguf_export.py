"""Write a GGUF file, the format llama.cpp and ollama run: tensors, hyperparameters and the tokenizer.

Names and layouts follow llama.cpp's own converter (convert_hf_to_gguf.py) for its ``gpt2`` and ``llama``
architectures. Our nn.Linear weights are ``[out, in]``, as llama.cpp expects, so nothing is transposed. Llama:
q|k|v and gate|up are split, and the query and key rows are permuted from the half-split rotary layout
(Hugging Face's and ours) to the interleaved pairs that llama.cpp's rotary uses. The tokenizer is stored as
what it is: byte-level BPE with GPT-2's pre-tokenization (``tokenizer.ggml.model = "gpt2"``, ``pre = "gpt-2"``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slm.export import ExportError, split_llama_block
from slm.model import GPT
from slm.tokenizer import Tokenizer

DTYPES = ("f32", "f16")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ExportError("GGUF export needs the `gguf` package: pip install gguf") from e
    return gguf


def interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from halves (x0..x31, y0..y31) to pairs (x0, y0, x1, y1, ...)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {"token_embd.weight": model.wte.weight, "position_embd.weight": model.wpe.weight,
           "output_norm.weight": model.ln_f.weight, "output_norm.bias": model.ln_f.bias,
           "output.weight": model.wte.weight}
    for i, block in enumerate(model.h):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{kind}"] = block.get_parameter(f"{ours}.{kind}")
    return out


def llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    c = model.config
    out = {"token_embd.weight": model.wte.weight, "output_norm.weight": model.ln_f.weight,
           "output.weight": model.wte.weight}
    for i, block in enumerate(model.h):
        parts = split_llama_block(block, c)
        out.update({
            f"blk.{i}.attn_norm.weight": block.ln_1.weight,
            f"blk.{i}.attn_q.weight": interleave_rotary(parts["q"], c.n_head),
            f"blk.{i}.attn_k.weight": interleave_rotary(parts["k"], c.kv_heads),
            f"blk.{i}.attn_v.weight": parts["v"],
            f"blk.{i}.attn_output.weight": block.attn.c_proj.weight,
            f"blk.{i}.ffn_norm.weight": block.ln_2.weight,
            f"blk.{i}.ffn_gate.weight": parts["gate"],
            f"blk.{i}.ffn_up.weight": parts["up"],
            f"blk.{i}.ffn_down.weight": block.mlp.c_proj.weight,
        })
    return out


def add_hyperparameters(writer, model: GPT, dtype: str) -> None:
    gguf, c = _gguf(), model.config
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.hidden)
    writer.add_head_count(c.n_head)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    if c.arch == "llama":
        writer.add_head_count_kv(c.kv_heads)
        writer.add_rope_dimension_count(c.head_dim)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.layer_norm_eps)
    else:
        writer.add_layer_norm_eps(c.layer_norm_eps)


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Tokens (in the byte-to-unicode alphabet of the vocabulary), their types, and the merges."""
    gguf = _gguf()
    model = json.loads(tokenizer.hf.to_str())["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    for added in tokenizer.hf.get_added_tokens_decoder().items():
        by_id[added[0]] = added[1].content
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]  # a model may have a larger vocabulary
    special = {tokenizer.eot_id} if tokenizer.eot_id is not None else set()
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eot_id is not None:
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)  # prompts are not prefixed: the model was trained without it


def export_gguf(model: GPT, tokenizer: Tokenizer, path: str | Path, dtype: str = "f32", name: str = "slm") -> Path:
    """Write ``path``: matrices in ``dtype`` (f32 or f16), norms and biases in f32 (as llama.cpp's converter)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose {' or '.join(DTYPES)}")
    gguf, path = _gguf(), Path(path)
    arch = "llama" if model.config.arch == "llama" else "gpt2"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    add_hyperparameters(writer, model, dtype)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    tensors = llama_tensors(model) if arch == "llama" else gpt2_tensors(model)
    for tensor_name, value in tensors.items():
        array = value.detach().float().cpu().numpy()
        writer.add_tensor(tensor_name, array.astype(np.float16) if dtype == "f16" and array.ndim == 2 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
