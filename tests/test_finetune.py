"""Fine-tuning: `slm train --init-from MODEL` starts a new run from a trained model's weights and shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import slm_cli
from slm import checkpoint
from slm.prepare import prepare, tokenizer_path
from slm.tokenizer import Tokenizer
from slm.train import train
from slm.train_config import FINETUNE_RECIPE, TrainConfig, TrainError


def finetune_cfg(model: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny", batch_size=8, max_steps=2, warmup_steps=1, eval_interval=1, eval_windows=8,
                log_interval=1, seed=1, device="cpu", dtype="fp32", init_from=str(model))
    return TrainConfig(**{**base, **kw})


def test_init_from_starts_from_the_models_weights(trained, prepared, tmp_path):
    start = load_file(str(trained / "model.safetensors"))
    summary = train(prepared, tmp_path / "ft", finetune_cfg(trained, lr=1e-12, muon_lr=1e-12), progress=False)
    assert summary["init_from"]["model"] == str(trained)
    assert summary["init_from"]["steps"] == checkpoint.read_config(trained)["training"]["steps"]
    assert summary["steps"] == 2  # a new schedule: counted from 0, not from the model's steps
    after = load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    assert all(torch.allclose(start[k].float(), after[k], atol=1e-6) for k in start)
    # From scratch the same two steps leave the loss near ln(512); the fine-tune starts where the model was.
    scratch = train(prepared, tmp_path / "scratch", finetune_cfg(trained, init_from=""), progress=False)
    trained_loss = checkpoint.read_config(trained)["training"]["best_val_loss"]
    assert summary["best_val_loss"] < trained_loss + 0.3 < scratch["best_val_loss"] - 1.0


def test_cli_init_from_uses_the_fine_tuning_recipe(trained, prepared, tmp_path):
    out = tmp_path / "run"
    r = slm_cli("train", "--data", str(prepared), "--out", str(out), "--init-from", str(trained), "--max-steps", "2",
                "--eval-interval", "1", "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "summary.json").read_text())
    assert {k: saved["train_config"][k] for k in FINETUNE_RECIPE} == FINETUNE_RECIPE
    assert saved["preset"] == "tiny"  # the starting model's
    # --resume continues the fine-tuning run (its weights, not the starting model's again).
    r = slm_cli("train", "--data", str(prepared), "--out", str(out), "--resume", "--max-steps", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_init_from_refuses_another_tokenizer(trained, corpus, tmp_path):
    other = tmp_path / "other"
    prepare([corpus], other, vocab_size=300, val_fraction=0.1, progress=False)
    with pytest.raises(TrainError) as e:
        train(other, tmp_path / "ft", finetune_cfg(trained), progress=False)
    message = str(e.value)
    ours, theirs = Tokenizer.load(other).describe(), Tokenizer.load(trained).describe()
    assert ours != theirs and f"another tokenizer ({ours}) than --init-from {trained} ({theirs}" in message
    assert f"--tokenizer {trained}" in message


def test_init_from_keeps_the_shape(trained, prepared, tmp_path):
    with pytest.raises(TrainError, match=r"asked for d_model 128 \(the model has 96\)"):
        train(prepared, tmp_path / "ft", finetune_cfg(trained), {"d_model": 128}, progress=False)
    with pytest.raises(TrainError, match=r"grow deeper: --n-layer above 3\); asked for n_layer 2 \(the model has 3\)"):
        train(prepared, tmp_path / "ft", finetune_cfg(trained), {"n_layer": 2}, progress=False)
    summary = train(prepared, tmp_path / "ok", finetune_cfg(trained), {"n_layer": 3, "dropout": 0.1}, progress=False)
    assert checkpoint.read_config(tmp_path / "ok" / "last")["model"]["dropout"] == 0.1 and summary["steps"] == 2


def test_cli_init_from_with_preset_is_one_line(trained, prepared, tmp_path):
    r = slm_cli("train", "--data", str(prepared), "--out", str(tmp_path), "--init-from", str(trained),
                "--preset", "tiny")
    assert r.returncode == 2 and "keeps that model's shape; drop --preset tiny" in r.stderr
    assert "Traceback" not in r.stderr


def test_prepare_takes_a_models_tokenizer(trained, corpus, tmp_path):
    assert tokenizer_path("default") == checkpoint.resolve("default")
    meta = prepare([corpus], tmp_path, tokenizer=str(trained.parent), val_fraction=0.1, progress=False)
    assert meta["vocab_size"] == Tokenizer.load(trained).vocab_size  # a run directory stands for its best/


def test_fine_tuning_keeps_the_models_template(trained, prepared, tmp_path):
    model, tokenizer = checkpoint.load(trained)
    story = checkpoint.save(model, tokenizer, tmp_path / "story", template="words-v1")
    train(prepared, tmp_path / "ft", finetune_cfg(story), progress=False)
    assert checkpoint.template(tmp_path / "ft" / "last") == "words-v1"
    assert checkpoint.template(trained) is None


def test_loss_on_story_needs_instruct_data(prepared, tmp_path):
    cfg = finetune_cfg(Path(), init_from="", loss_on="story")
    with pytest.raises(TrainError, match="--loss-on story: .* has no instruct documents"):
        train(prepared, tmp_path / "x", cfg, progress=False)
