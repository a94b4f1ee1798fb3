"""Training: it learns, resumes exactly (also after SIGTERM), matches under DDP, refuses bad settings, reads TOML."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_STEPS
from helpers import quick_cfg
from slm.data import DataError, load_meta
from slm.run_dir import RunDirError
from slm.train import train
from slm.train_config import TrainError


def unigram_entropy(prepared: Path) -> float:
    tokens = np.memmap(prepared / "train.bin", dtype=np.uint16, mode="r")
    counts = np.array(list(Counter(tokens.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_training_learns_far_below_unigram_entropy(trained_any, prepared):
    """Both families learn: GPT-2 with AdamW (`trained`), llama with Muon (`trained_llama`)."""
    trained = trained_any
    summary = json.loads((trained / "config.json").read_text())["training"]
    entropy = unigram_entropy(prepared)
    assert summary["best_val_loss"] < 0.5 * entropy, (summary["best_val_loss"], entropy)
    run = trained.parent
    assert (run / "last" / "train_state.json").is_file() and (run / "loss.png").stat().st_size > 1000
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [TINY_STEPS // 3, 2 * TINY_STEPS // 3, TINY_STEPS]
    assert summary["best_val_bpb"] == pytest.approx(summary["best_val_loss"] / math.log(2) /
                                                    load_meta(prepared)["val"]["bytes_per_token"])
    assert summary["tokens_seen"] == TINY_STEPS * 16 * 64 and summary["hardware"]


def train_losses(run: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if m["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("preset, optimizer", [("tiny", "adamw"), ("tiny-llama", "muon")])
def test_resume_reproduces_an_uninterrupted_run(prepared, tmp_path, preset, optimizer):
    overrides = {"dropout": 0.1}  # dropout makes the RNG state part of what must be restored
    cfg = {"preset": preset, "optimizer": optimizer}
    train(prepared, tmp_path / "full", quick_cfg(**cfg), overrides, progress=False)
    train(prepared, tmp_path / "split", quick_cfg(max_steps=20, max_minutes=1e-9, **cfg), overrides, progress=False)
    assert len(train_losses(tmp_path / "split")) == 1  # stopped by the time limit after one step, saved
    saved = json.loads((tmp_path / "split" / "last" / "config.json").read_text())["training"]["train_config"]
    assert (saved["optimizer"], saved["muon_lr"], saved["lr"]) == (optimizer, 0.02, 2e-3)
    train(prepared, tmp_path / "split", quick_cfg(**cfg), overrides, resume=True, progress=False)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")
    other = "adamw" if optimizer == "muon" else "muon"
    with pytest.raises(TrainError, match=f"used optimizer\\(s\\) .*{optimizer}.*pass the same --optimizer"):
        train(prepared, tmp_path / "split", quick_cfg(max_steps=30, preset=preset, optimizer=other), overrides,
              resume=True, progress=False)


@pytest.mark.slow
def test_sigterm_saves_and_resumes(prepared, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "slm.cli", "train", "--data", str(prepared), "--out", str(run), "--preset", "tiny",
           "--max-steps", "100000", "--eval-interval", "100000", "--log-interval", "1", "--quiet", "--dtype", "fp32",
           "--no-compile"]  # 100,000 steps would compile unasked: seconds this test does not need
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and
                                          len(train_losses(run)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "interrupted" in out and "Traceback" not in out
    state = json.loads((run / "last" / "train_state.json").read_text())
    assert state["step"] >= 3
    result = train(prepared, run, quick_cfg(max_steps=state["step"] + 2), resume=True, progress=False)
    assert result["steps"] == state["step"] + 2


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(prepared, tmp_path):
    """torchrun --nproc_per_node 2 with batch 4 each = one process with batch 4 and 2 micro-batches."""
    single = tmp_path / "single"
    train(prepared, single, quick_cfg(batch_size=4, grad_accum=2, max_steps=6, eval_interval=3), progress=False)
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "slm.cli", "train", "--data", str(prepared), "--out", str(ddp), "--preset", "tiny",
           "--batch-size", "4", "--max-steps", "6", "--eval-interval", "3", "--eval-windows", "8", "--lr", "2e-3",
           "--warmup-steps", "5", "--log-interval", "1", "--seed", "1", "--dtype", "fp32", "--device", "cpu",
           "--threads", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("done:") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in ddp.iterdir()) == ["best", "last", "loss.png", "metrics.jsonl", "summary.json"]
    a, b = train_losses(single), train_losses(ddp)
    assert len(a) == len(b) == 6
    assert np.allclose(a, b, rtol=1e-4), (a, b)
    assert a[-1] < a[0]
    lines = (ddp / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 9  # 1 leg + 6 train + 2 eval lines: no rank wrote twice


@pytest.mark.parametrize("kwargs, overrides, message", [
    ({"preset": "huge"}, {}, "unknown preset 'huge'"),
    ({"batch_size": 0}, {}, "--batch-size must be positive"),
    ({"device": "cuda"}, {}, "no CUDA GPU"),
    ({"dtype": "fp8"}, {}, "--dtype 'fp8'"),
    ({}, {"n_layers": 2}, "unknown model config key"),
])
def test_train_bad_settings(prepared, tmp_path, kwargs, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(prepared, tmp_path / "r", quick_cfg(**kwargs), overrides, progress=False)


def test_train_unprepared_data_and_resume_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="not a prepared data directory"):
        train(tmp_path, tmp_path / "r", quick_cfg(), progress=False)
    with pytest.raises(TrainError, match="no resumable run"):
        train(prepared, tmp_path / "r", quick_cfg(), resume=True, progress=False)
    train(prepared, tmp_path / "r", quick_cfg(max_steps=2), progress=False)
    with pytest.raises(RunDirError, match="already holds a run"):
        train(prepared, tmp_path / "r", quick_cfg(max_steps=2), progress=False)
    with pytest.raises(TrainError, match="different model shape"):
        train(prepared, tmp_path / "r", quick_cfg(max_steps=4), {"n_layer": 2}, resume=True, progress=False)


def test_config_file(tmp_path):
    from slm.config import ConfigError
    from slm.train_config import load_config_file

    (tmp_path / "ok.toml").write_text('lr = 0.01\nmax_steps = 5\n[model]\nn_layer = 2\n')
    assert load_config_file(tmp_path / "ok.toml") == ({"lr": 0.01, "max_steps": 5}, {"n_layer": 2})
    (tmp_path / "bad.toml").write_text("learning_rate = 0.01\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        load_config_file(tmp_path / "bad.toml")


# ---- eval -------------------------------------------------------------------------------------------------


def test_a_run_resumes_on_another_kind_of_cpu_and_precision_follows_it(prepared, tmp_path, monkeypatch):
    """--dtype auto is decided again on every leg: a run begun where bf16 is slow (fp32) continues in bf16 on a
    machine where it pays, from the same saved state, and the other way round."""
    import slm.machine

    run = tmp_path / "r"
    legs = []
    for steps, bf16_fast in [(4, False), (8, True), (12, False)]:
        monkeypatch.setattr(slm.machine, "bf16_pays", lambda fast=bf16_fast: fast)
        result = train(prepared, run, quick_cfg(max_steps=steps, dtype="auto", eval_interval=4), resume=steps > 4,
                       progress=False)
        legs.append((result["steps"], result["precision"]))
    assert legs == [(4, "fp32"), (8, "bf16"), (12, "fp32")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in records if m["kind"] == "train"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    starts = [m for m in records if m["kind"] == "leg"]  # each leg's start says what it ran on
    assert [(m["step"], m["precision"]) for m in starts] == [(0, "fp32"), (4, "bf16"), (8, "fp32")]
    assert all(m["hardware"].endswith("threads") and m["started"].endswith("Z") for m in starts)
    step_4 = next(m for m in records if m["kind"] == "train" and m["step"] == 4)
    assert starts[1]["tokens"] == step_4["tokens"] and starts[1]["elapsed"] >= step_4["elapsed"] > 0


def test_compile_unasked_follows_the_run_length_and_the_machine(monkeypatch):
    """--compile unset: eager for a short run (without probing), compiled for a long one where compiling works
    and eager where it does not; --compile and --no-compile as given whatever the run."""
    import torch

    import slm.machine
    from slm.machine import COMPILE_MIN_STEPS, compile_wanted

    cpu, probed = torch.device("cpu"), []
    for works in (True, False):
        monkeypatch.setattr(slm.machine, "compile_works", lambda kind, w=works: probed.append(kind) or w)
        assert compile_wanted(None, COMPILE_MIN_STEPS, cpu) is works
        assert not compile_wanted(None, COMPILE_MIN_STEPS - 1, cpu)
        assert not compile_wanted(None, COMPILE_MIN_STEPS, torch.device("mps"))
        assert compile_wanted(True, 10, cpu)
        assert not compile_wanted(False, 10**6, cpu)
    assert probed == ["cpu", "cpu"]  # only the long runs, on a device inductor builds for, asked the probe


def test_without_a_cpp_compiler_compiling_does_not_work(tmp_path):
    """The probe really builds a kernel: with no C++ compiler (and an empty kernel cache) it answers no, so an
    unasked long run trains eager instead of failing at its first step."""
    code = "from slm.machine import compile_works; print(compile_works('cpu'))"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "False", done.stdout + done.stderr


@pytest.mark.slow
def test_a_compiled_run_learns_as_the_eager_one_and_saves_plain_weights(prepared, tmp_path):
    from slm import checkpoint

    eager = train(prepared, tmp_path / "eager", quick_cfg(compile=False), progress=False)
    compiled = train(prepared, tmp_path / "compiled", quick_cfg(compile=True), progress=False)
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    first_eager, first_compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert first_compiled[0] == pytest.approx(first_eager[0], rel=1e-4)  # the same weights and batch
    assert compiled["best_val_loss"] == pytest.approx(eager["best_val_loss"], rel=0.02)
    model, _ = checkpoint.load(tmp_path / "compiled" / "last")  # torch.compile's wrapper is not what was saved
    assert not any("_orig_mod" in name for name in model.state_dict())
