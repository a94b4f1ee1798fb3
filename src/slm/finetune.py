"""Fine-tuning's starting point (``slm train --init-from``): a trained model's weights, shape and tokenizer,
the shape a fine-tune may take (the same, or deeper), and the check that the data uses the model's tokenizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from slm import checkpoint
from slm.config import ModelConfig
from slm.grow import grow_depth
from slm.tokenizer import Tokenizer
from slm.train_config import TrainError

# Settings fine-tuning can change; everything else about the shape is the model's.
FINETUNE_MAY_CHANGE = ("dropout",)


@dataclass(frozen=True)
class StartingPoint:
    """A trained model that a new run starts from (``--init-from``): its weights, shape and tokenizer."""

    name: str
    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    record: dict  # where it came from: its path and the training it had
    template: str | None  # the request format it learned (slm.instruct), if any


def load_starting_point(name: str) -> StartingPoint:
    model, tokenizer = checkpoint.load(name)
    path = checkpoint.resolve(name)
    saved = checkpoint.read_config(path)
    training = saved.get("training", {})
    record = {"model": str(path), "steps": training.get("steps"), "tokens_seen": training.get("tokens_seen"),
              "n_layer": model.config.n_layer}
    return StartingPoint(name, path, model.config, model.state_dict(), tokenizer, record, saved.get("template"))


def fine_tune_shape(start: StartingPoint, overrides: dict) -> ModelConfig:
    """The starting model's shape; shape flags may only repeat it, except that dropout may change and
    ``n_layer`` may grow (slm.grow: new blocks that start as the identity)."""
    def allowed(k: str, v) -> bool:
        grows = k == "n_layer" and v > start.config.n_layer
        return k in FINETUNE_MAY_CHANGE or k == "vocab_size" or grows or getattr(start.config, k) == v

    conflicts = {k: v for k, v in overrides.items() if not allowed(k, v)}
    if conflicts:
        asked = ", ".join(f"{k} {v} (the model has {getattr(start.config, k)})" for k, v in conflicts.items())
        raise TrainError(f"--init-from {start.name}: the model's shape cannot change when fine-tuning (it may only "
                         f"grow deeper: --n-layer above {start.config.n_layer}); asked for {asked}. Drop those "
                         "flags, or train a new shape from scratch")
    changes = {k: v for k, v in overrides.items() if k in (*FINETUNE_MAY_CHANGE, "n_layer")}
    return dataclasses.replace(start.config, **changes)


def starting_weights(start: StartingPoint, shape: ModelConfig) -> dict[str, torch.Tensor]:
    """The starting model's weights for ``shape``: as they are, or grown deeper (slm.grow)."""
    if shape.n_layer == start.config.n_layer:
        return start.weights
    return grow_depth(start.weights, start.config.n_layer, shape.n_layer)


def check_same_tokenizer(start: StartingPoint, data_dir: str | Path, data_tokenizer: Tokenizer) -> None:
    if data_tokenizer.same_as(start.tokenizer):
        return
    raise TrainError(f"--data {data_dir} was tokenized with another tokenizer ({data_tokenizer.describe()}) than "
                     f"--init-from {start.name} ({start.tokenizer.describe()}, {start.path}); prepare the text with "
                     f"the model's own: slm prepare INPUT --out DIR --tokenizer {start.name}")
