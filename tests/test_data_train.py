"""Data preparation and training: readers, splits, learning, exact resume, DDP, evaluation, bad input."""

from __future__ import annotations

import gzip
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

from slm.data import DataError, list_files, load_meta, prepare, read_documents, token_dtype
from slm.train import TrainConfig, TrainError, train


# ---- prepare ----------------------------------------------------------------------------------------------
def test_prepare_writes_token_files_and_meta(prepared, corpus):
    meta = load_meta(prepared)
    assert 300 < meta["vocab_size"] <= 512 and meta["dtype"] == "uint16"  # BPE stops when no pair repeats
    assert meta["train"]["documents"] + meta["val"]["documents"] == 400
    assert 20 <= meta["val"]["documents"] <= 70  # ~10% by document
    for split in ("train", "val"):
        tokens = np.memmap(prepared / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(tokens) == meta[split]["tokens"]
        assert (tokens == meta["eot_id"]).sum() == meta[split]["documents"]  # one separator per document
        assert meta[split]["bytes_per_token"] > 2
    total_chars = sum(len(d) for d in read_documents(corpus))
    assert meta["train"]["characters"] + meta["val"]["characters"] == total_chars


def test_split_is_deterministic_by_document(corpus, tmp_path):
    a = prepare([corpus], tmp_path / "a", vocab_size=300, val_fraction=0.2, seed=3, progress=False)
    b = prepare([corpus], tmp_path / "b", vocab_size=300, val_fraction=0.2, seed=3, progress=False)
    c = prepare([corpus], tmp_path / "c", vocab_size=300, val_fraction=0.2, seed=4, progress=False)
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert a["val"] == b["val"] and a["val"] != c["val"]


def test_readers_for_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first text file")
    (d / "sub" / "b.md").write_text("# markdown file")
    (d / "c.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    with gzip.open(d / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gz text", "text": "gz one"}) + "\n")
    pq.write_table(pa.table({"text": ["pq one", "pq two"]}), d / "e.parquet")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    files = list_files([d])
    assert [f.name for f in files] == ["a.txt", "c.jsonl", "d.jsonl.gz", "e.parquet", "b.md"]
    docs = [doc for f in files for doc in read_documents(f)]
    assert docs == ["first text file", "json one", "json two", "gz one", "pq one", "pq two", "# markdown file"]
    assert list(read_documents(d / "d.jsonl.gz", text_field="body")) == ["gz text"]
    meta = prepare([d], tmp_path / "out", vocab_size=300, val_fraction=0.0, progress=False)
    assert meta["train"]["documents"] == 7


def test_prepare_reuses_gpt2_tokenizer(corpus, tmp_path):
    meta = prepare([corpus], tmp_path / "g", tokenizer="gpt2", val_fraction=0.05, progress=False)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"


def test_token_dtype_widens_for_big_vocabularies():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("setup, message", [
    (lambda d: [d / "missing.txt"], "input not found"),
    (lambda d: [(d / "empty").mkdir() or d / "empty"], "no readable text"),
    (lambda d: [(d / "e.txt").write_text("  \n") and d / "e.txt"], "corpus is empty"),
    (lambda d: [(d / "x.csv").write_text("a,b") and d / "x.csv"], "unsupported file type"),
    (lambda d: [(d / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n') and d / "bad.jsonl"],
     r"bad.jsonl:2: no 'text' field"),
    (lambda d: [(d / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n') and d / "broken.jsonl"],
     r"broken.jsonl:2: not valid JSON"),
])
def test_prepare_bad_input(tmp_path, setup, message):
    with pytest.raises(DataError, match=message):
        prepare(setup(tmp_path), tmp_path / "out", vocab_size=300, progress=False)


# ---- train ------------------------------------------------------------------------------------------------
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
    assert [e["step"] for e in evals] == [100, 200, 300]
    assert summary["best_val_bpb"] == pytest.approx(summary["best_val_loss"] / math.log(2) /
                                                    load_meta(prepared)["val"]["bytes_per_token"])
    assert summary["tokens_seen"] == 300 * 16 * 64 and summary["hardware"]


def quick_cfg(**kw) -> TrainConfig:
    base = dict(preset="tiny", batch_size=8, max_steps=20, lr=2e-3, warmup_steps=5, eval_interval=10,
                eval_windows=8, log_interval=1, seed=1, device="cpu", dtype="fp32")
    return TrainConfig(**{**base, **kw})


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


def test_muon_groups_and_schedule():
    """Muon takes the blocks' matrices; AdamW the embeddings, gains and biases; one schedule scales both."""
    import torch

    from slm.config import get_preset
    from slm.model import GPT
    from slm.optim import make_optimizers

    model = GPT(get_preset("tiny").config)
    opts = make_optimizers(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=0.02,
                           muon_momentum=0.95, device=torch.device("cpu"), cpu_bf16_fast=False)
    muon_params = {id(p) for g in opts.named["muon"].param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_params) == (name.startswith("h.") and p.dim() == 2), name
    opts.set_lr_scale(0.5)
    assert sorted(g["lr"] for g in opts.param_groups) == [5e-4, 0.01]
    with pytest.raises(ValueError, match="--optimizer 'sgd'"):
        make_optimizers(model, "sgd", 1e-3, 0.1, (0.9, 0.95), 0.02, 0.95, torch.device("cpu"), False)


def test_muon_newton_schulz_runs_in_fp32_on_a_cpu_without_bf16():
    import torch

    from slm.optim import Muon, newton_schulz, ns_dtype_for

    assert ns_dtype_for(torch.device("cpu"), cpu_bf16_fast=False) == torch.float32
    assert ns_dtype_for(torch.device("cpu"), cpu_bf16_fast=True) == torch.bfloat16
    assert ns_dtype_for(torch.device("cuda"), cpu_bf16_fast=False) == torch.bfloat16
    from slm.config import get_preset
    from slm.cpu import bf16_pays
    from slm.model import GPT
    from slm.train import make_optimizer

    chosen = make_optimizer(GPT(get_preset("tiny").config), quick_cfg(optimizer="muon"), torch.device("cpu"))
    assert chosen.named["muon"].ns_dtype == (torch.bfloat16 if bf16_pays() else torch.float32)

    def one_step(optimizer_cls, **kw):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(48, 32))
        w.grad = torch.randn(48, 32)
        optimizer_cls([w], lr=0.02, momentum=0.95, weight_decay=0.0, **kw).step()
        return w.detach().clone(), w.grad

    stock, grad = one_step(torch.optim.Muon)  # torch's own, Newton-Schulz in bf16
    ours_bf16, _ = one_step(Muon, ns_dtype=torch.bfloat16)
    ours_fp32, _ = one_step(Muon, ns_dtype=torch.float32)
    assert torch.equal(ours_bf16, stock)  # the same algorithm as torch.optim.Muon
    assert not torch.equal(ours_fp32, stock)
    torch.manual_seed(0)
    start = torch.randn(48, 32)
    update = newton_schulz(0.05 * grad + 0.95 * (0.05 * grad), 5, (3.4445, -4.7750, 2.0315), 1e-7, torch.float64)
    expected = start - 0.02 * math.sqrt(48 / 32) * update.float()  # nesterov: g.lerp(buf, 0.95), buf = 0.05 g
    assert (ours_fp32 - expected).abs().max() < 1e-5 < (stock - expected).abs().max()


@pytest.mark.slow
def test_sigterm_saves_and_resumes(prepared, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "slm.cli", "train", "--data", str(prepared), "--out", str(run), "--preset", "tiny",
           "--max-steps", "100000", "--eval-interval", "100000", "--log-interval", "1", "--quiet", "--dtype", "fp32"]
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
    assert len(lines) == len(set(lines)) == 8  # 6 train + 2 eval lines: no rank wrote twice


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
    with pytest.raises(TrainError, match="already holds a run"):
        train(prepared, tmp_path / "r", quick_cfg(max_steps=2), progress=False)
    with pytest.raises(TrainError, match="different model shape"):
        train(prepared, tmp_path / "r", quick_cfg(max_steps=4), {"n_layer": 2}, resume=True, progress=False)


def test_config_file(tmp_path):
    from slm.config import ConfigError
    from slm.train import load_config_file

    (tmp_path / "ok.toml").write_text('lr = 0.01\nmax_steps = 5\n[model]\nn_layer = 2\n')
    assert load_config_file(tmp_path / "ok.toml") == ({"lr": 0.01, "max_steps": 5}, {"n_layer": 2})
    (tmp_path / "bad.toml").write_text("learning_rate = 0.01\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        load_config_file(tmp_path / "bad.toml")


# ---- eval -------------------------------------------------------------------------------------------------
def test_eval_sliding_window_scores_every_token_once(trained, tmp_path):
    import torch

    from slm.checkpoint import load
    from slm.evaluate import evaluate_text, score_tokens

    model, tok = load(trained)
    ids = [tok.eot_id] + tok.encode("Once upon a time there was a little fox named Tom. " * 12)
    assert len(ids) > 2 * model.config.context_length
    nll, count = score_tokens(model, ids, stride=16)
    assert count == len(ids) - 1
    # Stride 1 gives each prediction the longest possible context; a short text equals one plain pass.
    short = ids[:40]
    nll_short, _ = score_tokens(model, short)
    with torch.no_grad():
        logits = model(torch.tensor([short[:-1]]))
    direct = torch.nn.functional.cross_entropy(logits[0], torch.tensor(short[1:]), reduction="sum")
    assert nll_short == pytest.approx(float(direct), rel=1e-5)
    r = evaluate_text(model, tok, ["Once upon a time there was a little fox named Tom."])
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / r["bytes"])
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


def test_hf_dataset_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        match = "needs the `datasets` package"
    else:  # installed: offline mode must refuse at once instead of hanging on retries
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        match = "offline"
    start = time.time()
    with pytest.raises(DataError, match=match):
        prepare([], tmp_path / "out", hf_dataset="roneneldan/TinyStories", progress=False)
    assert time.time() - start < 30


def test_prepare_records_each_input_and_mix_samples_by_weight(tmp_path):
    from slm.data import BatchSampler, mixture, open_tokens

    for name, animal in (("foxes", "fox"), ("owls", "owl")):
        lines = [json.dumps({"text": f"The {animal} number {i} ran to the {animal} house."}) for i in range(300)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    meta = prepare([tmp_path / "foxes.jsonl", tmp_path / "owls.jsonl"], tmp_path / "d", vocab_size=300,
                   val_fraction=0.1, progress=False)
    foxes, owls = meta["sources"]
    assert foxes["train"][0] == 0 and foxes["train"][1] == owls["train"][0]
    assert owls["train"][1] == meta["train"]["tokens"]
    assert owls["val"][1] == meta["val"]["tokens"]
    tokens = open_tokens(tmp_path / "d", "train", meta)

    def share_of_owls(spec: str) -> float:
        offsets = BatchSampler(tokens, 16, 0, mixture(meta, spec)).draw(4000)
        return float(np.mean(offsets >= owls["train"][0]))

    assert share_of_owls("owls=0") == 0.0
    assert 0.45 < share_of_owls("owls=1") < 0.55  # same size, same weight
    assert 0.75 < share_of_owls("owls=4") < 0.85  # 4 : 1
    assert mixture(meta, "") is None
    with pytest.raises(DataError, match="no input file name starts with 'cats'.*foxes.jsonl, owls.jsonl"):
        mixture(meta, "cats=2")
    with pytest.raises(DataError, match="NAME=WEIGHT"):
        mixture(meta, "owls")
