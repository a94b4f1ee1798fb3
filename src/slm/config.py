"""Model configuration and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from slm.errors import SlmError


class ConfigError(SlmError):
    """A configuration the user gave cannot be used."""


ARCHS = ("gpt2", "llama")
IGNORE_INDEX = -100  # a target the training loss leaves out (F.cross_entropy's default; data's masked targets)


def setting(default: object, help: str, **cli: object) -> dataclasses.Field:
    """A dataclass field with its help text beside its default: the CLI makes a flag of it (cli.add_settings).
    ``cli`` holds extra argparse keywords (choices, metavar)."""
    return field(default=default, metadata={"help": help, **cli})


TYPES = {"int": (int, "a whole number"), "float": (float, "a number"), "str": (str, "a string"),
         "bool": (bool, "true or false")}


def fits(value: object, wanted: type) -> bool:
    """Whether a value read from a file fits a field: a whole number fits a float field; true is not a number."""
    if isinstance(value, bool):
        return wanted is bool
    return isinstance(value, wanted) or (wanted is float and isinstance(value, int))


def check_types(values: dict, settings: type, where: str) -> None:
    """Refuse a value of the wrong type for a settings dataclass's field (from a TOML or JSON file), naming it."""
    for f in dataclasses.fields(settings):
        if f.name not in values:
            continue
        names = [t.strip() for t in str(f.type).split("|") if t.strip() != "None"]
        if not any(fits(values[f.name], TYPES[n][0]) for n in names):
            wanted = " or ".join(TYPES[n][1] for n in names)
            raise ConfigError(f"{where}{f.name} = {values[f.name]!r} is not {wanted}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer. Everything the model needs, nothing about data or files.

    ``arch`` picks the family: "gpt2" (learned positions, LayerNorm, GELU MLP, biases) or "llama" (rotary
    positions, RMSNorm, SwiGLU MLP, no biases, optional grouped-query attention). ``n_kv_head``,
    ``rope_theta`` and ``mlp_hidden`` only apply to llama; 0 means "derive it" (see the properties below).
    """

    vocab_size: int = 8192  # no flag: it is the tokenizer's
    context_length: int = setting(512, "tokens of context")
    n_layer: int = setting(7, "transformer blocks")
    n_head: int = setting(6, "attention heads")
    d_model: int = setting(384, "model width")
    dropout: float = setting(0.0, "dropout")
    layer_norm_eps: float = 1e-5
    arch: str = setting("gpt2", "model family", choices=ARCHS)
    n_kv_head: int = setting(0, "llama: key/value heads (grouped-query attention); 0 = n_head")
    rope_theta: float = setting(10000.0, "llama: base of the rotary frequencies")
    mlp_hidden: int = setting(0, "llama: SwiGLU hidden size; 0 = the size that matches a GPT-2 block's parameters")

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"model config: arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model config: d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.n_kv_head < 0 or self.mlp_hidden < 0:
            raise ConfigError("model config: n_kv_head and mlp_hidden must be >= 0 (0 = derived)")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"model config: n_head ({self.n_head}) must be a multiple of n_kv_head "
                              f"({self.n_kv_head})")
        if self.arch == "gpt2" and (self.kv_heads != self.n_head or self.mlp_hidden):
            raise ConfigError("model config: n_kv_head and mlp_hidden are llama settings (arch = 'llama')")
        if self.arch == "llama" and (self.head_dim % 2 or self.rope_theta <= 0):
            raise ConfigError("model config: rotary positions need an even head_dim and rope_theta > 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        """Width of the MLP: 4 d_model for GPT-2; for SwiGLU, a multiple of 32 that gives a llama block
        (with its grouped-query attention) the parameter count of a GPT-2 block of the same width."""
        d = self.d_model
        if self.arch == "gpt2":
            return 4 * d
        if self.mlp_hidden:
            return self.mlp_hidden
        gpt2_block = 12 * d * d + 13 * d
        attn_and_norms = 2 * d * d + 2 * d * self.kv_heads * self.head_dim + 2 * d
        return max(32, round((gpt2_block - attn_and_norms) / (3 * d) / 32) * 32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        check_types(values, cls, "model config: ")
        return cls(**values)

    def num_parameters(self) -> int:
        """Parameter count of this shape (tied embeddings counted once)."""
        d, v, t, n = self.d_model, self.vocab_size, self.context_length, self.n_layer
        if self.arch == "llama":  # q, k, v, o; gate, up, down; 2 RMSNorm gains; no biases, no positions
            per_block = 2 * d * d + 2 * d * self.kv_heads * self.head_dim + 3 * d * self.hidden + 2 * d
            return v * d + n * per_block + d
        per_block = 12 * d * d + 13 * d  # qkv + proj + 2 MLP matrices, their biases, 2 LayerNorms
        return v * d + t * d + n * per_block + 2 * d


GPT2_VOCAB_SIZE = 50257


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    tokenizer: str  # "gpt2" or "trained"
    description: str
    why: str = field(default="")
    training: dict = field(default_factory=dict)  # training settings this shape was measured with (flags override)


PRESETS: dict[str, Preset] = {
    "seed-16m": Preset(
        ModelConfig(vocab_size=GPT2_VOCAB_SIZE, context_length=128, n_layer=4, n_head=4, d_model=256, dropout=0.2),
        tokenizer="gpt2",
        description="the original design: 4 layers, 4 heads, d_model 256, context 128, GPT-2 vocabulary",
    ),
    "slm-16m": Preset(
        ModelConfig(vocab_size=8192, context_length=512, n_layer=7, n_head=6, d_model=384, dropout=0.0),
        tokenizer="trained",
        description="default: 7 layers, 6 heads of 64, d_model 384, context 512, 8,192-token BPE trained on the corpus",
        why=(
            "With an 8,192 vocabulary only 3.1M parameters sit in the embedding (the seed spends 12.9M of its 16M "
            "there), so 12.4M go to transformer blocks. Width 384 keeps the matrix products big enough to run "
            "efficiently on a CPU, heads of 64 suit scaled_dot_product_attention, and 7 layers bring the total "
            "to 15.8M. A CPU budget shows the model far less than one epoch of the corpus, so dropout is 0."
        ),
    ),
    "llama-16m": Preset(
        ModelConfig(vocab_size=8192, context_length=512, n_layer=7, n_head=6, d_model=384, arch="llama"),
        tokenizer="trained",
        description="slm-16m's shape in the llama family: rotary positions, RMSNorm, SwiGLU (hidden 1024), no biases",
        why="The same width, depth and heads as slm-16m, with a SwiGLU width that keeps each block's parameters.",
    ),
    "cpu-7m": Preset(
        ModelConfig(vocab_size=8192, context_length=512, n_layer=6, n_head=4, d_model=256, arch="llama"),
        tokenizer="trained",
        description="for CPU training: llama, 6 layers, 4 heads of 64, d_model 256, trained with Muon",
        why=(
            "Measured on a 2-core CPU (docs/training-on-cpu.md): in 30 CPU minutes it reaches 1.712 validation "
            "bits/byte where slm-16m (GPT-2, AdamW) reaches 1.940. It runs 1.6x more tokens per second and "
            "learns more per token with Muon. `slm train --preset cpu-7m` uses the recipe it was measured with."
        ),
        training={"optimizer": "muon", "muon_lr": 0.02, "lr": 1.5e-3, "batch_size": 8, "warmup_steps": 40},
    ),
    "tiny": Preset(
        ModelConfig(vocab_size=512, context_length=64, n_layer=3, n_head=3, d_model=96, dropout=0.0),
        tokenizer="trained",
        description="a few hundred thousand parameters, for tests and quick experiments",
    ),
    "tiny-llama": Preset(
        ModelConfig(vocab_size=512, context_length=64, n_layer=3, n_head=4, d_model=96, arch="llama", n_kv_head=2),
        tokenizer="trained",
        description="tiny in the llama family, 4 query heads sharing 2 key/value heads; for tests",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
