"""Nothing a user types loses their work: outputs that cannot destroy inputs, one run per directory, a
kill in the middle of a save, a full or read-only disk, damaged files, and one line (exit 2) for every
mistake. Each command is the real `slm` command line (in this process, or a subprocess where the process
itself is the point)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import run_slm, slm_cli
from slm.prepare import piece_ends
from slm.testing import free_port
from slm.tokenizer import Tokenizer


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, no traceback, and the message on one line that says what is wrong."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("model:", "note:"))]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".replaced")))


@pytest.fixture()
def checkpoint_copy(trained, tmp_path) -> Path:
    """A checkpoint of the user's own, to be protected."""
    return Path(shutil.copytree(trained, tmp_path / "ck"))


# ---- outputs that cannot destroy inputs ---------------------------------------------------------------
def test_export_hf_never_writes_over_its_own_checkpoint(checkpoint_copy, trained, tmp_path):
    before = digest(checkpoint_copy)
    one_line_error(slm_cli("export-hf", "--model", str(checkpoint_copy), "--out", str(checkpoint_copy)),
                   "would overwrite", "which this command reads")
    one_line_error(slm_cli("export-hf", "--model", str(checkpoint_copy), "--out", str(checkpoint_copy),
                           "--force"), "would overwrite")
    run = trained.parent  # a run directory: --model run/best with --out run would replace best/ itself
    one_line_error(slm_cli("export-hf", "--model", str(trained), "--out", str(run), "--force"), "would overwrite")
    assert digest(checkpoint_copy) == before
    assert slm_cli("generate", "--model", str(checkpoint_copy), "--prompt", "Once", "--max-new-tokens",
                   "3").returncode == 0


def test_export_hf_refuses_a_full_directory_until_forced(checkpoint_copy, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    one_line_error(slm_cli("export-hf", "--model", str(checkpoint_copy), "--out", str(mine)),
                   "already holds files (notes.txt)", "--force")
    assert (mine / "notes.txt").read_text() == "my notes"
    r = slm_cli("export-hf", "--model", str(checkpoint_copy), "--out", str(mine), "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((mine / "config.json").read_text())["model_type"] == "gpt2"
    assert not (mine / "notes.txt").exists() and leftovers(tmp_path) == []
    one_line_error(slm_cli("export-gguf", "--model", str(checkpoint_copy), "--out",
                           str(checkpoint_copy / "model.safetensors"), "--force"), "would overwrite")
    gguf = tmp_path / "m.gguf"
    assert slm_cli("export-gguf", "--model", str(checkpoint_copy), "--out", str(gguf)).returncode == 0
    one_line_error(slm_cli("export-gguf", "--model", str(checkpoint_copy), "--out", str(gguf)),
                   "already holds a file of")
    assert slm_cli("export-gguf", "--model", str(checkpoint_copy), "--out", str(gguf), "--force").returncode == 0
    assert leftovers(tmp_path) == []


def test_prepare_never_replaces_a_checkpoint_or_an_earlier_prepare(corpus, checkpoint_copy, tmp_path):
    before = digest(checkpoint_copy)
    one_line_error(slm_cli("prepare", str(corpus), "--out", str(checkpoint_copy), "--vocab-size", "300",
                           "--quiet"), "already holds an slm checkpoint", "--force")
    assert digest(checkpoint_copy) == before
    data = tmp_path / "data"
    assert slm_cli("prepare", str(corpus), "--out", str(data), "--vocab-size", "300", "--quiet").returncode == 0
    first = digest(data)
    one_line_error(slm_cli("prepare", str(corpus), "--out", str(data), "--vocab-size", "400", "--quiet"),
                   "already holds an earlier `slm prepare` output")
    assert digest(data) == first
    assert slm_cli("prepare", str(corpus), "--out", str(data), "--vocab-size", "400", "--quiet",
                   "--force").returncode == 0
    assert json.loads((data / "meta.json").read_text())["vocab_size"] == 400 and leftovers(tmp_path) == []
    one_line_error(slm_cli("prepare", str(corpus.parent), "--out", str(corpus.parent), "--force", "--quiet"),
                   "would overwrite")
    assert slm_cli("prepare", str(corpus), "--out", str(tmp_path / "d2"), "--tokenizer", str(data),
                   "--quiet").returncode == 0  # d2 is fine...
    one_line_error(slm_cli("prepare", str(corpus), "--out", str(data), "--tokenizer", str(data), "--force",
                           "--quiet"), "would overwrite")  # ...but not the tokenizer's own directory


def test_the_current_directory_is_not_an_output(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", "..", str(tmp_path), str(Path.home()), "/"):
        one_line_error(slm_cli("prepare", str(corpus), "--out", out, "--quiet", "--force"),
                       "is the current or the home directory")
    assert list(tmp_path.iterdir()) == []


def test_export_gguf_never_replaces_a_directory(trained, tmp_path):
    (tmp_path / "dir").mkdir()
    one_line_error(slm_cli("export-gguf", "--model", str(trained), "--out", str(tmp_path / "dir"), "--force"),
                   "is a directory")
    assert (tmp_path / "dir").is_dir()


def test_serve_refuses_a_taken_port_and_one_out_of_range():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(run_slm("serve", "--port", str(port), timeout=60), f"cannot listen on 127.0.0.1:{port}")
    one_line_error(run_slm("serve", "--port", "99999", timeout=60), "port 99999: choose one from 1 to 65535")


def test_a_failed_prepare_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    out = tmp_path / "new" / "data"
    one_line_error(slm_cli("prepare", str(bad), "--out", str(out), "--quiet"), "bad.jsonl:2: not valid JSON")
    assert not (tmp_path / "new").exists()  # nor the parent it would have made
    assert leftovers(tmp_path) == []


# ---- one run per directory ----------------------------------------------------------------------------
TRAIN = ["--preset", "tiny", "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "5", "--eval-windows", "8",
         "--log-interval", "1", "--seed", "1", "--device", "cpu", "--dtype", "fp32", "--no-compile", "--threads",
         "1", "--quiet"]


def train_args(data: Path, out: Path, steps: int, eval_interval: int, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--eval-interval",
            str(eval_interval), *TRAIN, *extra]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_train_refuses_what_is_not_its_own(prepared, checkpoint_copy, tmp_path):
    one_line_error(slm_cli(*train_args(prepared, prepared, 2, 2, "--force")), "would overwrite")
    before = digest(checkpoint_copy)
    one_line_error(slm_cli(*train_args(prepared, checkpoint_copy, 2, 2)), "holds an slm checkpoint",
                   "not a training run", "--force")
    one_line_error(slm_cli("train", "--data", str(prepared), "--out", str(checkpoint_copy), "--init-from",
                           str(checkpoint_copy), "--max-steps", "2", "--no-compile", "--quiet", "--force"),
                   "would overwrite")  # a fine-tune into the model it starts from
    assert digest(checkpoint_copy) == before
    run = tmp_path / "run"
    assert slm_cli(*train_args(prepared, run, 2, 2)).returncode == 0
    one_line_error(slm_cli(*train_args(prepared, run, 2, 2)), "already holds a run", "--resume", "--force")
    assert slm_cli(*train_args(prepared, run, 3, 3, "--force")).returncode == 0
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == [1, 2, 3]  # a new run, not appended


def test_a_second_train_on_a_live_run_is_refused_naming_the_first(prepared, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "slm.cli", *train_args(prepared, run, 100_000, 100_000)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and len(records(run)) >= 3)  # training, SIGTERM-safe
        assert str(first.pid) in (run / "run.lock").read_text()
        for extra in ([], ["--resume"], ["--force"]):
            one_line_error(slm_cli(*train_args(prepared, run, 5, 5, *extra)), f"process {first.pid}", "in use")
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    assert not (run / "run.lock").exists()
    steps = [r["step"] for r in records(run) if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # one writer only


# The writer of a save over an existing last/, paused where it hurts most: last/ has been moved to last.old/
# and last.new/ is about to take its place (checkpoint.swap_in). The test kills it there with SIGKILL.
PAUSED_TRAIN = """
import pathlib, sys, time
rename = pathlib.Path.rename
saves = 0
def paused(self, target):
    global saves
    if self.name == "last.new":
        saves += 1
        if saves == 2:
            pathlib.Path(sys.argv[1]).write_text("paused")
            time.sleep(600)
    return rename(self, target)
pathlib.Path.rename = paused
from slm.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_inside_a_save_resumes_exactly(prepared, tmp_path):
    straight, killed, flag = tmp_path / "straight", tmp_path / "killed", tmp_path / "paused"
    assert slm_cli(*train_args(prepared, straight, 12, 4)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_TRAIN, str(flag), *train_args(prepared, killed, 12, 4)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: flag.is_file() or proc.poll() is not None)
        assert flag.is_file(), proc.communicate()[0]
        assert not (killed / "last").exists() and (killed / "last.old").is_dir()  # the window of the swap
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    r = slm_cli(*train_args(prepared, killed, 12, 4, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "took over" in r.stderr and "ended without releasing it" in r.stderr  # the dead writer's lock
    assert "resuming" in r.stdout and "at step 4" in r.stdout and "dropped" in r.stdout
    train_records = [(m["step"], m["loss"]) for m in records(killed) if m["kind"] == "train"]
    assert train_records == [(m["step"], m["loss"]) for m in records(straight) if m["kind"] == "train"]
    evals = [m["step"] for m in records(killed) if m["kind"] == "eval"]
    assert evals == [4, 8, 12]  # no step twice
    assert sorted(p.name for p in killed.iterdir()) == ["best", "last", "loss.png", "metrics.jsonl",
                                                        "summary.json"]


# ---- a full disk, a read-only one ---------------------------------------------------------------------
@contextlib.contextmanager
def mounted(path: Path, options: str) -> Iterator[bool]:
    """A tmpfs at ``path`` (as root); yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                              capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], check=False)


def file_size_limit(limit: int):
    """A pre-exec hook: files may not grow past ``limit`` bytes (the fallback where tmpfs cannot be mounted)."""
    def hook() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return hook


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(prepared, corpus, tmp_path):
    disk = tmp_path / "disk"
    with mounted(disk, "size=64m") as ok:
        run = disk / "run"
        assert slm_cli(*train_args(prepared, run, 2, 2)).returncode == 0
        before = digest(run / "last")
        if ok:  # fill the disk, leaving too little for a checkpoint
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(bytes(free - 300_000))
            r = slm_cli(*train_args(prepared, run, 4, 2, "--resume"))
            one_line_error(r, "no space left", "MiB free", "(last/, step 2) is intact", "--resume")
            (disk / "filler2").write_bytes(bytes(max(0, shutil.disk_usage(disk).free - 20_000)))
            one_line_error(slm_cli("prepare", str(corpus), "--out", str(disk / "data"), "--vocab-size", "300",
                                   "--quiet"), "no space left", "nothing was written")
            assert sorted(p.name for p in disk.iterdir()) == ["filler", "filler2", "run"]
            (disk / "filler").unlink()
            (disk / "filler2").unlink()
        else:
            r = subprocess.run([sys.executable, "-m", "slm.cli", *train_args(prepared, run, 4, 2, "--resume")],
                               capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(200_000))
            one_line_error(r, "(last/, step 2) is intact")
        assert digest(run / "last") == before and not (run / "last.new").exists()
        r = slm_cli(*train_args(prepared, run, 4, 2, "--resume"))
        assert r.returncode == 0, r.stderr
        assert json.loads((run / "last" / "train_state.json").read_text())["step"] == 4


def test_a_read_only_output_is_one_line(corpus, checkpoint_copy, prepared, tmp_path):
    ro = tmp_path / "ro"
    with mounted(ro, "ro,size=1m") as ok:
        if not ok:
            ro.chmod(0o555)
        one_line_error(slm_cli("prepare", str(corpus), "--out", str(ro / "data"), "--quiet"), str(ro / "data"))
        one_line_error(slm_cli(*train_args(prepared, ro / "run", 2, 2)), str(ro))
        one_line_error(slm_cli("export-hf", "--model", str(checkpoint_copy), "--out", str(ro / "hf")))
        one_line_error(slm_cli("export-gguf", "--model", str(checkpoint_copy), "--out", str(ro / "m.gguf")))


# ---- damaged inputs -------------------------------------------------------------------------------------
def test_a_truncated_gzip_names_the_file_and_the_line(tmp_path, trained):
    whole = gzip.compress("".join(json.dumps({"text": f"story {i} " * 40}) + "\n" for i in range(2000)).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    one_line_error(slm_cli("prepare", str(cut), "--out", str(tmp_path / "o"), "--quiet"), "cut.jsonl.gz",
                   "damaged or cut short after line")
    assert not (tmp_path / "o").exists()
    one_line_error(slm_cli("eval", "--model", str(trained), str(cut)), "cut.jsonl.gz", "after line")


def test_damaged_token_files_are_named(prepared, tmp_path):
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    train_bin = data / "train.bin"
    with open(train_bin, "r+b") as f:
        f.truncate(train_bin.stat().st_size - 1)  # an odd byte count: half a token
    one_line_error(slm_cli(*train_args(data, tmp_path / "r1", 2, 2)), "train.bin has", "cut short or damaged")
    shutil.copy(prepared / "train.bin", train_bin)
    tokens = np.memmap(train_bin, dtype=np.uint16, mode="r+")
    tokens[10] = 60_000  # past the 512-token vocabulary
    tokens.flush()
    del tokens
    one_line_error(slm_cli(*train_args(data, tmp_path / "r2", 2, 2)), "token id 60,000", "outside the vocabulary")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("toml, message", [
    ('max_steps = "five"\n', "max_steps = 'five' is not a whole number"),
    ('[model]\nn_layer = "two"\n', "[model] n_layer = 'two' is not a whole number"),
    ("batch_size = 4.5\n", "batch_size = 4.5 is not a whole number"),
    ("compile = 1\n", "compile = 1 is not true or false"),
    ("model = 3\n", "[model] must be a table"),
])
def test_config_values_of_the_wrong_type(prepared, tmp_path, toml, message):
    (tmp_path / "c.toml").write_text(toml)
    one_line_error(slm_cli(*train_args(prepared, tmp_path / "r", 2, 2, "--config", str(tmp_path / "c.toml"))),
                   message)


@pytest.mark.parametrize("args, message", [
    (["eval", "--batch-size", "0", "x.txt"], "--batch-size: must be at least 1, got 0"),
    (["eval", "--stride", "-3", "x.txt"], "--stride: must be at least 1"),
    (["generate", "--threads", "two"], "--threads: not a whole number"),
    (["generate", "--prompt", "hi", "--stop", ""], "--stop: an empty string"),
    (["generate", "--prompt", "hi", "--prompt-file", "p.txt"], "give one of them"),
    (["generate", "--prompt-file", "missing.txt"], "--prompt-file missing.txt: not found"),
    (["bench", "--repeats", "0"], "--repeats: must be at least 1"),
    (["train", "--data", "d"], "the following arguments are required: --out"),
])
def test_flag_mistakes_are_one_line(args, message, trained):
    one_line_error(slm_cli(*args, *(["--model", str(trained)] if args[0] in ("eval", "generate") else [])),
                   message)


def broken_checkpoints(good: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    half = Path(shutil.copytree(good, tmp_path / "half"))
    data = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(data[: len(data) // 2])
    yield half, "cut short"
    bad_json = Path(shutil.copytree(good, tmp_path / "json"))
    (bad_json / "config.json").write_text("{not json")
    yield bad_json, "not valid JSON"
    vocab = Path(shutil.copytree(good, tmp_path / "vocab"))
    config = json.loads((vocab / "config.json").read_text())
    v, d = config["model"]["vocab_size"], config["model"]["d_model"]
    config["model"]["vocab_size"] += 64
    (vocab / "config.json").write_text(json.dumps(config))
    yield vocab, f"wte.weight is [{v}, {d}] in the weights but [{v + 64}, {d}] by config.json"


def test_a_broken_checkpoint_is_one_line_everywhere_serve_included(trained, tmp_path):
    for path, message in broken_checkpoints(trained, tmp_path):
        one_line_error(slm_cli("generate", "--model", str(path), "--prompt", "hi"), message)
        one_line_error(slm_cli("export-hf", "--model", str(path), "--out", str(tmp_path / "hf")), message)
        r = run_slm("serve", "--model", str(path), "--port", str(free_port()), timeout=60)  # before it starts
        one_line_error(r, message)


def test_a_symlink_loop_and_utf16_input_are_named(tmp_path):
    (tmp_path / "a.txt").symlink_to(tmp_path / "b.txt")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    one_line_error(slm_cli("prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")),
                   "a loop of symbolic links")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    one_line_error(slm_cli("prepare", str(tmp_path / "gone.txt"), "--out", str(tmp_path / "o")),
                   "a symbolic link to", "which does not exist")
    utf16 = tmp_path / "u.txt"
    utf16.write_text("Once upon a time there was a fox.\n" * 50, encoding="utf-16")
    one_line_error(slm_cli("prepare", str(utf16), "--out", str(tmp_path / "o"), "--quiet"), "UTF-16",
                   "iconv -f utf-16")
    assert not (tmp_path / "o").exists()


def test_a_vocabulary_larger_than_the_corpus_supports_is_said(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the fox ran to the den. " * 200)
    r = slm_cli("prepare", str(text), "--out", str(tmp_path / "o"), "--vocab-size", "10000000", "--quiet")
    assert r.returncode == 0, r.stderr
    vocab = json.loads((tmp_path / "o" / "meta.json").read_text())["vocab_size"]
    assert vocab < 1000 and f"so the tokenizer has {vocab:,}" in r.stderr


# ---- long documents in pieces ---------------------------------------------------------------------------
def test_pieces_cut_before_whitespace_give_the_whole_texts_tokens(trained):
    tok = Tokenizer.load(trained)
    words = ["Once", "upon", "a", "time,", "there's", "x" * 30, "123", "4.5", "héllo", "日本語", "!!", "you'll"]
    spaces = [" ", "", "  ", "\n", " \n ", "\t", "\n\n"]
    text = "".join(words[i % len(words)] + spaces[i % len(spaces)] for i in range(20_000))
    for size in (50, 1000, 7777):
        ends = piece_ends(text, 0, len(text), size)
        assert ends[-1] == len(text) and len(ends) > len(text) // (2 * size)
        starts = [0, *ends[:-1]]
        assert all(b - a <= 2 * size for a, b in zip(starts, ends, strict=True))
        pieces = tok.encode_batch([text[a:b] for a, b in zip(starts, ends, strict=True)])
        assert sum(pieces, []) == tok.encode(text)
    assert piece_ends("y" * 25, 0, 25, 10) == [10, 20, 25]  # no whitespace at all: cut at the size


def test_a_document_longer_than_a_piece_is_one_document(tmp_path, trained):
    from slm.prepare import PIECE_CHARS, tail_cut

    text = " ".join(f"word{i % 997}" for i in range(PIECE_CHARS // 3))  # ~2 pieces, no newline
    (tmp_path / "one.txt").write_text(text)
    out = tmp_path / "o"
    r = slm_cli("prepare", str(tmp_path / "one.txt"), "--out", str(out), "--tokenizer", str(trained), "--quiet")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["split"] == "tail" and meta["train"]["documents"] == meta["val"]["documents"] == 1
    tok = Tokenizer.load(trained)
    cut = tail_cut(text, meta["val_fraction"])
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == tok.encode(text[:cut]) + [tok.eot_id]


# ---- prompts: from a file, and words alone ------------------------------------------------------------
def test_prompt_file_and_stdin(trained, tmp_path):
    prompt = "Once upon a time there was a little fox named Tom. " * 3
    (tmp_path / "p.txt").write_text(prompt)
    base = ["generate", "--model", str(trained), "--max-new-tokens", "5", "--temperature", "0", "--json"]
    from_file = json.loads(slm_cli(*base, "--prompt-file", str(tmp_path / "p.txt")).stdout)
    assert from_file["prompt"] == prompt
    from_stdin = subprocess.run([sys.executable, "-m", "slm.cli", *base, "--prompt-file", "-"], input=prompt,
                                capture_output=True, text=True, timeout=120)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert json.loads(from_stdin.stdout)["text"] == from_file["text"]


def test_words_without_a_prompt(story_model):
    from helpers import app_server

    r = slm_cli("generate", "--model", str(story_model), "--words", "fox,cake", "--max-new-tokens", "5",
                "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt"] == "Words: fox, cake\nStory:\n"
    with app_server(story_model) as (url, _):
        for path, body in (("/v1/completions", {"prompt": "", "max_tokens": 4}),
                           ("/predict", {"input_text": "", "max_new_tokens": 4})):
            ok = httpx.post(f"{url}{path}", json={**body, "words": ["fox", "cake"], "temperature": 0})
            assert ok.status_code == 200, ok.text
            shown = ok.json()["choices"][0]["prompt"] if path == "/v1/completions" else ok.json()["prompt"]
            assert shown == "Words: fox, cake\nStory:\n"
            refused = httpx.post(f"{url}{path}", json=body)
            field = "prompt" if path == "/v1/completions" else "input_text"
            assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == field, refused.text
            assert "give text to continue, or words" in refused.json()["detail"]
