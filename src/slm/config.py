"""Model configuration and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration the user gave cannot be used."""


@dataclass
class ModelConfig:
    """Shape of a GPT-2-style decoder. Everything the model needs, nothing about data or files."""

    vocab_size: int = 8192
    context_length: int = 512
    n_layer: int = 7
    n_head: int = 6
    d_model: int = 384
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model config: d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)

    def num_parameters(self) -> int:
        """Parameter count of this shape (tied embeddings counted once)."""
        d, v, t, n = self.d_model, self.vocab_size, self.context_length, self.n_layer
        per_block = 12 * d * d + 13 * d  # qkv + proj + 2 MLP matrices, their biases, 2 LayerNorms
        return v * d + t * d + n * per_block + 2 * d


GPT2_VOCAB_SIZE = 50257


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    tokenizer: str  # "gpt2" or "trained"
    description: str
    why: str = field(default="")


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
    "tiny": Preset(
        ModelConfig(vocab_size=512, context_length=64, n_layer=3, n_head=3, d_model=96, dropout=0.0),
        tokenizer="trained",
        description="a few hundred thousand parameters, for tests and quick experiments",
    ),
}

DEFAULT_PRESET = "slm-16m"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
