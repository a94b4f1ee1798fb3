"""Convert to and from Hugging Face `transformers` GPT2LMHeadModel (needs the `transformers` package).

The architectures are the same; only names and one layout differ: HF keeps its blocks under
``transformer.`` and its Conv1D layers store weights as ``[in, out]`` where our nn.Linear stores ``[out, in]``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slm.config import ModelConfig
from slm.model import GPT
from slm.tokenizer import EOT, Tokenizer

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ValueError("Hugging Face export needs `transformers`: pip install 'slm[dev]' or transformers") from e
    return transformers


def hf_config(config: ModelConfig, eot_id: int | None = None):
    tf = _transformers()
    eot = config.vocab_size - 1 if eot_id is None else eot_id
    return tf.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
    )


def to_hf_model(model: GPT, eot_id: int | None = None):
    """A GPT2LMHeadModel with exactly our weights (fp32, eval mode)."""
    tf = _transformers()
    hf = tf.GPT2LMHeadModel(hf_config(model.config, eot_id))
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().float()
        state[f"transformer.{name}"] = value.t().contiguous() if name.endswith(TRANSPOSED) else value
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"weight names do not match GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
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


def from_hf_model(hf) -> GPT:
    c = hf.config
    config = ModelConfig(vocab_size=c.vocab_size, context_length=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                         d_model=c.n_embd, dropout=float(c.resid_pdrop), layer_norm_eps=c.layer_norm_epsilon)
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation {c.activation_function!r}: slm uses GELU(tanh) like GPT-2")
    model = GPT(config)
    hf_state = hf.state_dict()
    state = {}
    for name in model.state_dict():
        value = hf_state[f"transformer.{name}"].detach().float()
        state[name] = value.t().contiguous() if name.endswith(TRANSPOSED) else value
    model.load_state_dict(state)
    return model.eval()


def import_hf(path: str | Path) -> tuple[GPT, Tokenizer | None]:
    """Read a GPT2LMHeadModel directory back: our model, and its tokenizer if tokenizer.json is there."""
    tf = _transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    hf = tf.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    tok = Tokenizer.load(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
    return from_hf_model(hf), tok
