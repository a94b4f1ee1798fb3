"""slm: a small GPT-2-style language model, from corpus to container."""

from __future__ import annotations

__version__ = "0.1.0"


def load(name_or_path: str = "default", device: str = "cpu"):
    """Load a checkpoint directory, or ``"default"`` for the bundled model: returns ``(model, tokenizer)``."""
    from slm.checkpoint import load as _load

    return _load(name_or_path, device=device)


__all__ = ["load", "__version__"]

