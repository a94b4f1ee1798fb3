"""The `slm` command line: called in-process (conftest.slm_cli: the same parser, commands and error boundary),
and once as the real console entry point in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import run_slm, slm_cli


def test_info_lists_presets_with_parameter_counts():
    r = run_slm("info")  # the real entry point, once
    assert r.returncode == 0
    assert "slm-16m" in r.stdout and "15,764,352" in r.stdout and "seed-16m" in r.stdout and "tiny" in r.stdout
    assert "15,764,352" in slm_cli("generate", "--help").stdout
    assert "llama-16m" in r.stdout and "15,537,792" in r.stdout and "tiny-llama" in r.stdout


def test_generate_json_with_and_without_cache(trained_any):
    outs = []
    for flag in ([], ["--no-kv-cache"], ["--decode-weights", "fp16"]):
        r = slm_cli("generate", "--model", str(trained_any), "--prompt", "Once upon a time", "--temperature", "0",
                    "--max-new-tokens", "30", "--json", *flag)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    a, b, half = outs
    assert a["text"] == b["text"] and a["text"].strip()
    assert a["prompt_tokens"] >= 4
    assert 0 < a["generated_tokens"] <= 30 and a["tokens_per_second"] > 0 and a["seconds"] > 0
    assert a["kv_cache"] is True and b["kv_cache"] is False
    assert a["native_step"] is True and b["native_step"] is False  # the C step decodes when the cache is on
    assert half["decode_weights"] == "fp16" and half["native_step"] and half["text"].strip()


def test_generate_stream_and_seed(trained):
    args = ["generate", "--model", str(trained), "--prompt", "One day", "--max-new-tokens", "25", "--seed", "4",
            "--temperature", "1.0", "--top-k", "40", "--top-p", "0.95"]
    a, b = slm_cli(*args), slm_cli(*args, "--stream")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.startswith("One day")


def test_long_prompt_is_reported(trained):
    r = slm_cli("generate", "--model", str(trained), "--prompt", "the fox ran " * 100, "--max-new-tokens", "3")
    assert r.returncode == 0 and "keeping its last 64" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be 0 (greedy) or between"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be between"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "99999999"], "max_new_tokens must be between"),
    (["generate", "--model", "/nonexistent/dir", "--prompt", "hi"], "checkpoint directory not found"),
    (["train", "--data", "/nonexistent", "--out", "/tmp/x", "--preset", "tiny"], "directory not found"),
    (["prepare", "/nonexistent.txt", "--out", "/tmp/x"], "input not found"),
    (["eval", "--model", "/nonexistent", "x.txt"], "checkpoint directory not found"),
])
def test_user_mistakes_get_one_line_errors(args, message, trained, tmp_path):
    if "--model" not in args and args[0] == "generate":
        args = [*args, "--model", str(trained)]
    args = [str(tmp_path / "out") if a == "/tmp/x" else a for a in args]  # an --out of this test's own
    r = slm_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_a_preset_brings_its_training_recipe_and_flags_override_it(prepared, tmp_path):
    args = ["train", "--data", str(prepared), "--preset", "cpu-7m", "--n-layer", "1", "--context-length", "32",
            "--max-steps", "2", "--batch-size", "2", "--eval-interval", "2", "--eval-windows", "2", "--quiet"]
    for extra, optimizer in (([], "muon"), (["--optimizer", "adamw"], "adamw")):
        out = tmp_path / optimizer
        r = slm_cli(*args, "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        saved = json.loads((out / "best" / "config.json").read_text())["training"]["train_config"]
        assert saved["optimizer"] == optimizer and saved["warmup_steps"] == 40 and saved["muon_lr"] == 0.02
    assert "trains by default with: --optimizer muon" in slm_cli("info").stdout


def test_resume_takes_the_saved_settings_and_flags_override_them(prepared, tmp_path):
    out = tmp_path / "run"
    first = ["train", "--data", str(prepared), "--out", str(out), "--preset", "cpu-7m", "--n-layer", "1",
             "--context-length", "32", "--max-steps", "2", "--batch-size", "3", "--eval-interval", "2",
             "--eval-windows", "2", "--optimizer", "adamw", "--lr", "0.002", "--quiet"]
    assert (r := slm_cli(*first)).returncode == 0, r.stderr
    # Only --resume and the new step count: shape, optimizer, batch size and learning rate come from the run.
    r = slm_cli("train", "--data", str(prepared), "--out", str(out), "--resume", "--max-steps", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    saved = json.loads((out / "last" / "config.json").read_text())
    train_config = saved["training"]["train_config"]
    assert saved["training"]["steps"] == 4 and saved["model"]["n_layer"] == 1
    assert (train_config["optimizer"], train_config["batch_size"], train_config["lr"]) == ("adamw", 3, 0.002)


def test_unknown_preset_on_the_command_line(prepared, tmp_path):
    r = slm_cli("train", "--data", str(prepared), "--out", str(tmp_path / "r"), "--preset", "huge")
    assert r.returncode == 2 and "unknown preset 'huge'; choose one of: seed-16m, slm-16m, llama-16m" in r.stderr


def test_pickle_checkpoint_refused_on_the_command_line(tmp_path):
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    r = slm_cli("generate", "--model", str(tmp_path / "model.pt"), "--prompt", "hi")
    assert r.returncode == 2 and "pickle" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_prepare_train_eval_export_end_to_end(corpus, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    r = slm_cli("prepare", str(corpus), "--out", str(data), "--vocab-size", "400", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "train:" in r.stdout and (data / "train.bin").is_file()
    r = slm_cli("train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "30",
                "--eval-interval", "15", "--log-interval", "10")
    assert r.returncode == 0, r.stderr
    assert "done: 30 steps" in r.stdout
    # Not a terminal: plain log lines, no progress-bar redraws.
    assert [line.split(" |")[0] for line in r.stdout.splitlines() if line.startswith("step ") and "|" in line] == [
        "step 10/30", "step 20/30", "step 30/30"]
    assert "step 15: val loss" in r.stdout and "bits/byte" in r.stdout and "\r" not in r.stderr
    text = tmp_path / "held_out.txt"
    text.write_text("Once upon a time there was a little owl named Sue. Sue lived near the hill.")
    r = slm_cli("eval", "--model", str(run / "best"), str(text), "--json")
    assert r.returncode == 0, r.stderr
    total = json.loads(r.stdout)["total"]
    assert total["bytes"] == len(text.read_bytes()) and total["bits_per_byte"] > 0
    r = slm_cli("export-hf", "--model", str(run / "best"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_bench_prints_a_table_and_writes_json_and_plot(tmp_path, preset):
    r = slm_cli("bench", "--preset", preset, "--lengths", "8,32", "--repeats", "1", "--json",
                str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    assert "kv_speedup_max" in r.stdout and "speedup_vs_hf" in r.stdout
    result = json.loads((tmp_path / "b.json").read_text())
    assert [row["new_tokens"] for row in result["rows"]] == [8, 32]
    assert all(row["cache_equals_uncached"] and row["matches_hf"] for row in result["rows"])
    assert result["kv_speedup_max"] > 0 and result["speedup_vs_hf"] > 0
    # llama.cpp's columns (`make test` builds its tools first): the same weights through llama-bench
    assert all(row["llama_cpp_f32_tok_s"] > 0 and row["llama_cpp_f16_tok_s"] > 0 for row in result["rows"])
    assert (tmp_path / "b.png").stat().st_size > 5000


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the project's own errors (SlmError) become one line; a ValueError from anywhere else is a bug."""
    from slm import cli

    def broken(args):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(cli, "cmd_info", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["info"])


def test_a_closed_pipe_ends_quietly():
    """`slm info | head -1`: the reader is gone before slm writes, so every write fails; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "slm.cli", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()  # the only reader: slm's first write gets EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_bench_settings_mistake_is_one_line(capsys):
    from slm import cli

    assert cli.main(["bench", "--lengths", "0", "--no-hf", "--no-llama-cpp"]) == 2
    assert capsys.readouterr().err.strip() == "slm bench: error: --lengths must be positive integers, e.g. 64,128,512"


def test_flags_are_made_from_the_settings_dataclasses():
    """Every TrainConfig field is a `slm train` flag and every shape field a shape flag; `slm generate`'s sampling
    flags default to SamplingParams' own defaults (nothing given means SamplingParams())."""
    import dataclasses

    from slm.cli import build_parser
    from slm.generation import SamplingParams
    from slm.train_config import TrainConfig

    parser = build_parser()
    train = parser.parse_args(["train", "--data", "d", "--out", "o", "--beta2", "0.99", "--no-compile",
                               "--n-layer", "3", "--loss-on", "story"])
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(vars(train))
    assert (train.beta2, train.compile, train.n_layer, train.loss_on, train.lr) == (0.99, False, 3, "story", None)
    assert "n_layer" in train.model_flags and "vocab_size" not in train.model_flags
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--out", "o", "--loss-on", "headers"])
    gen = parser.parse_args(["generate", "--prompt", "x"])
    given = {k: getattr(gen, k) for k in gen.sampling_flags if getattr(gen, k) is not None}
    assert SamplingParams(**given) == SamplingParams() and SamplingParams().temperature == 0.8
    assert parser.parse_args(["generate", "--top-k", "5"]).top_k == 5
