"""Shared fixtures: a small corpus the tests write themselves, prepared data, a briefly trained tiny model."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Two threads, or one each when pytest-xdist runs two workers on a 2-core machine (make test-fast).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))

ROOT = Path(__file__).resolve().parents[1]
ANIMALS = ["rabbit", "fox", "bear", "duck", "mouse", "cat", "dog", "owl"]
NAMES = ["Tom", "Lily", "Max", "Anna", "Ben", "Sue"]
PLACES = ["woods", "garden", "river", "hill", "house", "field"]
THINGS = ["a red ball", "a big cake", "a blue hat", "an old key", "a small boat", "a shiny stone"]
FEELINGS = ["happy", "sad", "scared", "proud", "tired"]
TINY_PRESETS = {"gpt2": "tiny", "llama": "tiny-llama"}  # one tiny shape per model family
TINY_STEPS = 150  # enough for both to end their stories with "The end." and <|endoftext|> (~12 s each)


def make_story(rng: random.Random) -> str:
    """A short, regular children's story: structure a tiny model learns in TINY_STEPS steps."""
    animal, name, place, thing, feel = (rng.choice(x) for x in (ANIMALS, NAMES, PLACES, THINGS, FEELINGS))
    friend = rng.choice([a for a in ANIMALS if a != animal])
    return (
        f"Once upon a time there was a little {animal} named {name}. {name} lived near the {place}.\n\n"
        f"One day {name} found {thing} in the {place}. {name} was very {feel}. "
        f"{name} showed {thing} to a {friend}. The {friend} said, \"What a nice thing!\"\n\n"
        f"They played in the {place} until the sun went down. The end."
    )


def write_corpus(directory: Path, n_docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "stories.txt"
    # One .txt file is one document, so the stories go to a JSONL file (one story a line) instead.
    import json

    path = directory / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": make_story(rng)}) + "\n" for _ in range(n_docs)), encoding="utf-8")
    return path


def slm_cli(*args: str) -> subprocess.CompletedProcess:
    """The `slm` command line called in this process (slm.cli.main): the same parser, commands and error
    boundary as the console script, without a new Python and torch start-up (~3 s) per call. Returns what
    run_slm returns; torch's thread count, which commands set, is put back."""
    from slm import cli

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse's own errors (2) and --help (0)
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["slm", *args], code, out.getvalue(), err.getvalue())


def run_slm(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path | None = None):
    """Run the real `slm` command line in a subprocess (where the process itself is the point: the entry
    point, environment variables, a working directory)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "slm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd)


def made_once(tmp_path_factory, name: str, make: Callable[[Path], Path]) -> Path:
    """``make(directory)``, once per test run. Under pytest-xdist (`make test-fast` runs two workers) the
    workers share it: the first makes it under a file lock, the others wait for it and reuse it, so each tiny
    model is trained once, not once per worker."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / name  # the run's temp root, above each worker's own
    with FileLock(f"{shared}.lock"):
        done = shared / ".made"
        if not done.is_file():
            result = make(shared / "made")
            done.write_text(str(result))
        return Path(done.read_text())


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "corpus", write_corpus)


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory) -> Path:
    from slm.prepare import prepare

    def make(out: Path) -> Path:
        prepare([corpus], out, vocab_size=512, val_fraction=0.1, seed=0, progress=False)
        return out

    return made_once(tmp_path_factory, "prepared", make)


def train_tiny(prepared: Path, out: Path, preset: str, optimizer: str) -> Path:
    from slm.train import train
    from slm.train_config import TrainConfig

    cfg = TrainConfig(preset=preset, batch_size=16, max_steps=TINY_STEPS, lr=3e-3, warmup_steps=20,
                      eval_interval=TINY_STEPS // 3, eval_windows=16, log_interval=20, seed=0, device="cpu",
                      dtype="fp32", optimizer=optimizer)
    train(prepared, out, cfg, progress=False)
    return out / "best"


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory) -> Path:
    """The tiny preset (GPT-2) trained for TINY_STEPS steps with AdamW: a real checkpoint directory (best/)."""
    return made_once(tmp_path_factory, "run", lambda out: train_tiny(prepared, out, "tiny", "adamw"))


@pytest.fixture(scope="session")
def trained_llama(prepared, tmp_path_factory) -> Path:
    """The tiny-llama preset trained for TINY_STEPS steps with Muon."""
    return made_once(tmp_path_factory, "run-llama", lambda out: train_tiny(prepared, out, "tiny-llama", "muon"))


@pytest.fixture(scope="session")
def story_model(trained, tmp_path_factory) -> Path:
    """The tiny trained model saved as if it had been trained on the instruct format (its template set), for
    the paths that take words; what it writes is not the point."""
    from slm import checkpoint, instruct

    model, tokenizer = checkpoint.load(trained)
    return checkpoint.save(model, tokenizer, tmp_path_factory.mktemp("story") / "ck", template=instruct.TEMPLATE)


@pytest.fixture(params=list(TINY_PRESETS))
def trained_any(request) -> Path:
    """Each family's briefly trained checkpoint in turn."""
    return request.getfixturevalue("trained" if request.param == "gpt2" else "trained_llama")


@pytest.fixture(params=list(TINY_PRESETS))
def tiny_model(request):
    """A randomly initialised tiny model of each family (the test runs once per family)."""
    from slm.config import get_preset
    from slm.model import GPT

    torch.manual_seed(0)
    return GPT(get_preset(TINY_PRESETS[request.param]).config).eval()
