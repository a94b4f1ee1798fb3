"""Growing a trained model deeper without changing what it computes (``slm train --init-from M --n-layer N``).

Each new block is a copy of the block before it whose two output projections (attention's and the MLP's
``c_proj``) are zero, so it adds nothing to the residual stream: the grown model's logits are exactly the
trained model's, and training starts from its loss rather than from scratch. This is the block expansion of
Llama Pro (Wu et al., 2024); the copies are spread evenly between the trained blocks.
"""

from __future__ import annotations

import torch

# The weights whose zeroing makes a block the identity (the residual stream passes through it unchanged).
OUTPUT_PROJECTIONS = ("attn.c_proj.", "mlp.c_proj.")


def source_layers(old: int, new: int) -> list[int]:
    """For each of ``new`` blocks, the trained block it starts from: blocks 0..old-1 in order, each repeated
    about new/old times (6 -> 9: 0 0 1 2 2 3 4 4 5)."""
    if not 0 < old <= new:
        raise ValueError(f"can only grow a model deeper: {old} -> {new} layers")
    return [j * old // new for j in range(new)]


def grow_depth(weights: dict[str, torch.Tensor], old: int, new: int) -> dict[str, torch.Tensor]:
    """The state dict of the ``new``-layer model made from the ``old``-layer ``weights`` (see the module)."""
    grown = {k: v for k, v in weights.items() if not k.startswith("h.")}
    sources = source_layers(old, new)
    for j, i in enumerate(sources):
        is_copy = j > 0 and sources[j - 1] == i
        prefix = f"h.{i}."
        for key, value in weights.items():
            if not key.startswith(prefix):
                continue
            part = key[len(prefix):]
            zero = is_copy and part.startswith(OUTPUT_PROJECTIONS)
            grown[f"h.{j}.{part}"] = torch.zeros_like(value) if zero else value.clone()
    return grown
