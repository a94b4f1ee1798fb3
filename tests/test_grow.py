"""Growing a trained model deeper (`slm train --init-from MODEL --n-layer N`): new blocks start as the identity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slm import checkpoint
from slm.grow import grow_depth, source_layers
from slm.model import GPT
from slm.train import train
from slm.train_config import TrainConfig


def test_source_layers_spread_the_copies_evenly():
    assert source_layers(6, 9) == [0, 0, 1, 2, 2, 3, 4, 4, 5]
    assert source_layers(3, 6) == [0, 0, 1, 1, 2, 2]
    assert source_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="deeper: 4 -> 3"):
        source_layers(4, 3)


def test_grown_model_computes_exactly_what_the_trained_one_did(trained_any):
    model, _ = checkpoint.load(trained_any)
    grown = GPT(dataclasses.replace(model.config, n_layer=5))
    grown.load_state_dict(grow_depth(model.state_dict(), model.config.n_layer, 5))
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(grown(tokens), model(tokens))
    # ...but not because the new blocks are empty: only their output projections are zero.
    copy = grown.h[1]
    assert torch.equal(copy.attn.c_attn.weight, model.h[0].attn.c_attn.weight)
    assert not copy.attn.c_proj.weight.any() and not copy.mlp.c_proj.weight.any()


def test_training_a_grown_model_starts_from_the_trained_loss(trained_llama, prepared, tmp_path):
    base = dict(preset="tiny-llama", batch_size=8, max_steps=2, warmup_steps=1, eval_interval=1, eval_windows=8,
                log_interval=1, seed=1, device="cpu", dtype="fp32", init_from=str(trained_llama))
    same = train(prepared, tmp_path / "same", TrainConfig(**{**base, "max_steps": 1, "lr": 1e-12, "muon_lr": 1e-12}),
                 progress=False)
    grown = train(prepared, tmp_path / "grown", TrainConfig(**{**base, "max_steps": 1, "lr": 1e-12,
                                                             "muon_lr": 1e-12}), {"n_layer": 5}, progress=False)
    assert grown["val_loss"] == pytest.approx(same["val_loss"], abs=1e-5)
    assert checkpoint.read_config(tmp_path / "grown" / "last")["model"]["n_layer"] == 5
    assert grown["init_from"]["n_layer"] == 3 and grown["parameters"] > same["parameters"]
    trained_on = train(prepared, tmp_path / "trained", TrainConfig(**base), {"n_layer": 5}, progress=False)
    assert trained_on["steps"] == 2 and trained_on["val_loss"] < same["val_loss"] + 0.5
